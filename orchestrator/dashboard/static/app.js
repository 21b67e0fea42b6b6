// Sortie dashboard: live fragments (polled), the cancel button, and a job's log over server-sent events.
"use strict";

function csrf() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

function pollUrl(el) {
  const base = el.dataset.poll;
  return el.dataset.keepQuery ? base + window.location.search : base;
}

async function refresh(el) {
  try {
    const resp = await fetch(pollUrl(el), { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (resp.ok) {
      el.innerHTML = await resp.text();
    }
  } catch (err) {
    // the next poll retries
  }
}

function startPolling() {
  document.querySelectorAll("[data-poll]").forEach((el) => {
    const every = parseInt(el.dataset.every || "2000", 10);
    if (el.id === "status") {
      refresh(el);
    }
    setInterval(() => refresh(el), every);
  });
}

async function cancelJob(id) {
  if (!window.confirm("Cancel job " + id + "?")) {
    return;
  }
  const resp = await fetch("/api/jobs/" + encodeURIComponent(id) + "/cancel", {
    method: "POST",
    credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf() },
  });
  if (!resp.ok) {
    window.alert("cancel failed: " + resp.status);
  }
  document.querySelectorAll("[data-poll]").forEach((el) => refresh(el));
}

function startLog() {
  const pre = document.getElementById("log");
  if (!pre) {
    return;
  }
  const state = document.getElementById("log-state");
  let source = null;

  function open(controller) {
    if (source) {
      source.close();
    }
    pre.textContent = "";
    state.textContent = "streaming…";
    source = new EventSource("/api/jobs/" + pre.dataset.job + "/logs/stream?controller=" + controller);
    source.onmessage = (event) => {
      const lines = JSON.parse(event.data);
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(document.createTextNode(lines.join("\n") + "\n"));
      if (atBottom) {
        pre.scrollTop = pre.scrollHeight;
      }
    };
    source.addEventListener("end", () => {
      state.textContent = "the job has ended; this is the whole log";
      source.close();
    });
  }

  document.querySelectorAll('input[name="logsrc"]').forEach((radio) => {
    radio.addEventListener("change", () => open(radio.value === "controller"));
  });
  open(false);
}

function autoSubmitFilters() {
  const form = document.getElementById("filters");
  if (!form) {
    return;
  }
  form.querySelectorAll("select").forEach((el) => el.addEventListener("change", () => form.submit()));
  // The status filter takes several statuses: tick them (or pick a group), then Apply.
  form.querySelectorAll("button[data-check-group]").forEach((button) => button.addEventListener("click", () => {
    const group = button.dataset.checkGroup;
    form.querySelectorAll("input[name=status]").forEach((box) => { box.checked = box.dataset.group === group; });
  }));
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-cancel]");
  if (button) {
    event.preventDefault();
    cancelJob(button.dataset.cancel);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  startPolling();
  startLog();
  autoSubmitFilters();
});
