"""Node side, preemption notices: the agent watches for its cloud's warning that a spot node is about to be taken
back, and then tells the job and the controller (issue 24, section 6). Standard library only (in the zipapp).

Where the notice comes from (`--notices`):
    aws         instance metadata `spot/instance-action` (IMDSv2: a token first), {"action", "time"}: 2 minutes
    gcp         metadata `instance/preempted` (Metadata-Flavor: Google) says TRUE: about 30 s
    azure       Scheduled Events, an event of EventType `Preempt`, its NotBefore the deadline
    kubernetes  the agent's own SIGTERM (the pod is deleted or evicted): the pod's termination grace period
    local       the local cloud's `<sandbox>/cloud-notice.json` ({"deadline"}), written by `sortie local preempt
                --notice`
The endpoints are the real metadata addresses; `--metadata-url` replaces the base (tests serve a fake there).

On a notice (`deliver`), once: the file NOTICE_FILE in the sandbox is written (a shell-sourceable `KEY=value` file:
SORTIE_PREEMPTION_NOTICE and SKYPILOT_PREEMPTION_NOTICE, the deadline in epoch seconds, SORTIE_PREEMPTION_DEADLINE
as ISO 8601 UTC, SORTIE_PREEMPTION_SOURCE); a `notice` event goes in the watch journal (the controller starts the
recovery from it); every running run's process group gets SIGTERM (the controller's graceful stop then waits out
the grace, copies the last logs and uploads MOUNT_CACHED writes). Runs are told the file's path in
$SORTIE_PREEMPTION_NOTICE_FILE when they start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.node.agent_files import NOTICE_FILE, NOTICE_FILE_ENV

__all__ = ["NOTICE_FILE", "NOTICE_FILE_ENV", "check", "deliver", "start"]

SOURCES = ("none", "local", "aws", "gcp", "azure", "kubernetes")
LOCAL_NOTICE = "cloud-notice.json"  # the local cloud's notice, in the node's sandbox
POLL_SECONDS = 2.0  # AWS asks for a look every 5 s; 2 s leaves the job more of its grace
REQUEST_TIMEOUT = 2.0
GCP_NOTICE_SECONDS = 30.0
DEFAULT_BASE = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                "azure": "http://169.254.169.254"}
MAX_ANSWER = 1 << 16

Notice = dict[str, Any]  # {"source", "deadline" (epoch seconds), "detected_at"}


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, bytes]:
    """One metadata request: (status, body); 404 is an answer (no notice), a connection error raises OSError."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as answer:
            return answer.status, answer.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _notice(source: str, deadline: float) -> Notice:
    return {"source": source, "deadline": round(deadline, 3), "detected_at": round(time.time(), 3)}


def _iso_epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def aws_notice(base: str) -> Notice | None:
    """AWS: IMDSv2 token, then `spot/instance-action` (404 until a notice)."""
    status, token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")
    headers = {"X-aws-ec2-metadata-token": token.decode()} if status == 200 else {}
    status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
    if status != 200:
        return None
    action = json.loads(body)
    if action.get("action") not in ("terminate", "stop", "hibernate"):
        return None
    return _notice("aws", _iso_epoch(str(action["time"])))


def gcp_notice(base: str) -> Notice | None:
    """GCP: `instance/preempted` says TRUE once the VM is being preempted (about 30 s left)."""
    status, body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
    if status != 200 or body.strip().upper() != b"TRUE":
        return None
    return _notice("gcp", time.time() + GCP_NOTICE_SECONDS)


def azure_notice(base: str) -> Notice | None:
    """Azure: a Scheduled Event of type Preempt; its NotBefore (RFC 1123) is the deadline."""
    status, body = _get(f"{base}/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"})
    if status != 200:
        return None
    for event in json.loads(body).get("Events") or []:
        if event.get("EventType") == "Preempt":
            not_before = str(event.get("NotBefore") or "")
            deadline = email.utils.parsedate_to_datetime(not_before).timestamp() if not_before else time.time() + 30
            return _notice("azure", deadline)
    return None


def local_notice(sandbox: Path) -> Notice | None:
    """The local cloud: `sortie local preempt --notice` wrote the deadline in the sandbox."""
    try:
        return _notice("local", float(json.loads((sandbox / LOCAL_NOTICE).read_text())["deadline"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check(source: str, base: str | None, sandbox: Path) -> Notice | None:
    """One look for a notice (None: none yet, or the endpoint did not answer)."""
    if source == "local":
        return local_notice(sandbox)
    look = {"aws": aws_notice, "gcp": gcp_notice, "azure": azure_notice}[source]
    try:
        return look((base or DEFAULT_BASE[source]).rstrip("/"))
    except (OSError, ValueError, KeyError, TypeError):  # no answer, or one we cannot read: look again later
        return None


def notice_file_text(notice: Notice) -> str:
    deadline = int(notice["deadline"])
    iso = dt.datetime.fromtimestamp(deadline, dt.UTC).isoformat().replace("+00:00", "Z")
    return (f"SORTIE_PREEMPTION_NOTICE={deadline}\nSKYPILOT_PREEMPTION_NOTICE={deadline}\n"
            f"SORTIE_PREEMPTION_DEADLINE={iso}\nSORTIE_PREEMPTION_SOURCE={notice['source']}\n")


def deliver(agent: Any, notice: Notice) -> bool:
    """Tell the job and the controller, once: the notice file, the `notice` watch event, SIGTERM to every running
    run's process group. False if a notice was delivered already."""
    with agent._lock:
        if getattr(agent, "notice", None) is not None:
            return False
        agent.notice = notice
    path = agent.sandbox / NOTICE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):  # a full disk: the job still gets SIGTERM, the controller the event
        tmp.write_text(notice_file_text(notice))
        tmp.chmod(0o644)
        os.replace(tmp, path)
    agent.watch.record("notice", "", **notice)
    for status in agent.all_status():
        if status["state"] == "running":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(status["pid"], signal.SIGTERM)
    return True


def _poll(agent: Any, source: str, base: str | None, every: float) -> None:
    while getattr(agent, "notice", None) is None:
        notice = check(source, base, agent.sandbox)
        if notice is not None:
            deliver(agent, notice)
            return
        time.sleep(every)


def _stop_when_done(agent: Any, at: float, stop: Callable[[], None]) -> None:
    """Stop the agent once its runs have ended (the controller copied their logs meanwhile) or at `at`."""
    while time.time() < at and any(s["state"] == "running" for s in agent.all_status()):
        time.sleep(0.2)
    stop()


def start(agent: Any, source: str, base: str | None = None, grace: float = 30.0, every: float = POLL_SECONDS,
          stop: Callable[[], None] | None = None) -> None:
    """Watch for notices from `source` in a daemon thread; `kubernetes`: the agent's SIGTERM is the notice, and the
    agent stops (`stop`) `grace` seconds later (the pod's termination grace period, less a margin)."""
    if source not in SOURCES:
        raise SystemExit(f"--notices: {source!r} is not one of {', '.join(SOURCES)}")
    if source == "none":
        return
    if source == "kubernetes":
        def on_term(_signum: int, _frame: object) -> None:
            if deliver(agent, _notice("kubernetes", time.time() + grace)) and stop is not None:
                threading.Thread(target=_stop_when_done, args=(agent, time.time() + grace - 2.0, stop),
                                 daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        return
    threading.Thread(target=_poll, args=(agent, source, base, every), daemon=True, name="notices").start()
