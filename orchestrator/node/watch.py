"""Node side, the agent's change journal behind GET /watch: sequence-numbered events kept on disk, so a
watcher (the controller) resumes after its own or the agent's restart. Standard library only."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import threading
import time
import uuid
from pathlib import Path

from orchestrator.node.agent_files import write_json_atomic

WATCH_KEEP = 4096  # events a watcher can resume from; the journal file is compacted past twice that
WATCH_BATCH = 1000  # events in one /watch answer at most (the rest in the next)
WATCH_MAX_TIMEOUT = 300.0


class WatchJournal:
    """The node's changes, numbered in order and kept on disk, so that a watcher (GET /watch) that comes back,
    or a restarted agent, goes on from a sequence number without losing a change. One condition: a held
    watch is a thread waiting on it, nothing more."""

    def __init__(self, sandbox: Path) -> None:
        self.path = sandbox / "watch.jsonl"
        self._cond = threading.Condition()
        self._events: collections.deque[dict] = collections.deque(maxlen=WATCH_KEEP)
        self._lines = 0
        if self.path.exists():
            lines = self.path.read_text().splitlines()  # bounded: compacted past 2 * WATCH_KEEP lines
            self._lines = len(lines)
            for line in lines[-WATCH_KEEP:]:
                with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
                    event = json.loads(line)
                    if not self._events or event["seq"] == self._events[-1]["seq"] + 1:
                        self._events.append(event)
        self.seq = self._events[-1]["seq"] if self._events else 0
        epoch_file = sandbox / "watch.json"
        try:
            self.epoch = str(json.loads(epoch_file.read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            self.epoch = uuid.uuid4().hex
            write_json_atomic(epoch_file, {"epoch": self.epoch})

    def record(self, kind: str, run_id: str, **data: object) -> None:
        with self._cond:
            self.seq += 1
            event = {"seq": self.seq, "kind": kind, "run_id": run_id, "time": time.time(), **data}
            self._events.append(event)
            try:  # on disk for a restarted agent; a full disk keeps it in memory (a restart then sends a reset)
                if self._lines >= 2 * WATCH_KEEP:  # compact: keep what a watcher can still resume from
                    tmp = self.path.with_name(".watch.jsonl.tmp")
                    tmp.write_text("".join(json.dumps(e) + "\n" for e in self._events))
                    os.replace(tmp, self.path)
                    self._lines = len(self._events)
                else:
                    with self.path.open("a") as fh:
                        fh.write(json.dumps(event) + "\n")
                    self._lines += 1
            except OSError:
                pass
            finally:
                self._cond.notify_all()

    def since(self, seq: int, timeout: float, epoch: str | None = None) -> tuple[list[dict], int, bool]:
        """The events after `seq` (waiting up to `timeout` seconds for one), the seq to go on from, and whether
        the watcher must reset (take every run's status afresh): events after `seq` were dropped, `seq` is ahead
        of this journal, or `epoch` is another journal's."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self._events[0]["seq"] if self._events else self.seq + 1
                if seq > self.seq or seq < first - 1 or (epoch and epoch != self.epoch):
                    return [], self.seq, True
                if seq < self.seq:
                    start = seq - first + 1
                    events = list(itertools.islice(self._events, start, start + WATCH_BATCH))
                    return events, events[-1]["seq"], False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return [], seq, False
                self._cond.wait(remaining)
