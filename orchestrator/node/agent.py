"""Node side, the node agent's entry point: runs commands on one node and keeps their logs and exit codes on disk.

Standard library only, like every module it imports (`agent_files`, `watch`, `container`, `runs`, `agent_http`,
`node_view`), so one zipapp of them (`orchestrator.infra.agent_bundle`) ships to a cloud VM or a pod unchanged:

    python3 agent.pyz --sandbox DIR [--host 127.0.0.1] [--port 0] [--node-id ID]
    python3 -m orchestrator.node.agent --sandbox DIR ...      (the local cloud, with Sortie installed)

Preemption notices (issue 24, `notices.py`): `--notices local|aws|gcp|azure|kubernetes` watches for that cloud's
notice (`--metadata-url` replaces the metadata endpoint's base, for tests; `--notice-grace`: kubernetes, seconds from
SIGTERM to the agent's stop). `notices.py` is not in the zipapp yet (EC2's 16 KiB of user data): only agents run
from source (the local cloud) take the flag.

The bearer token comes from the first line of stdin (`--token-stdin`, what Sortie uses: it never
shows in /proc/<pid>/environ), `--token-file`, or `$SORTIE_AGENT_TOKEN` (removed from the
environment before anything runs). Every request must carry `Authorization: Bearer <token>`.

HTTP API (JSON):
    GET  /health                    node id, pid, uptime, runs in progress
    POST /runs                      {"command", "env"?, "cwd"?, "run_id"?, "view"?, "user"?} -> {"run_id"}
                                    user (node users only): a pool job's key; the run is its own user's
                                    view false (--confine only): run in the node's own mount namespace,
                                    without the path view, so that what the run mounts under mounts/
                                    (a FUSE mount of a bucket) is there for the runs after it
    GET  /runs                      every run's status
    GET  /runs/<id>                 {"state": running|exited|cancelled, "exit_code", ...}
    GET  /runs/<id>/log?offset=N    raw log bytes from offset N (header X-Next-Offset)
    POST /users/<key>/remove        a pool job's end: its user, files and account removed
    POST /runs/<id>/cancel          SIGTERM to the run's process group, SIGKILL after a grace period
    GET  /watch?since=N&timeout=S&epoch=E
                                    long poll: {"epoch", "seq", "events": [...], "reset"} with every change after
                                    seq N (run started, exited or cancelled with its exit code, log grown to an
                                    offset), at once if there is one, else when one happens or after S seconds
                                    (at most 300). reset true (with "runs", every run's status): the events after N
                                    are no longer all kept, or E is not this node's journal; start again from "seq"
    POST /files?dest=PATH           a tar stream, extracted at PATH (relative: under workdir/; `~/x`: under
                                    home/; absolute: as is, or under mounts/ when started with --confine).
                                    400 for a PATH with `..`, NUL or ~user, or that leads out of its root; 409
                                    when PATH holds something the agent did not place (never removed); 507 when
                                    the node's disk is full
    POST /links                     {"dest", "target"} -> {"path"}: a symlink at dest (placed as uploads are)
                                    to `target`, replacing what was there; target null: only declare dest (a
                                    path whose content a later run writes). 400 unless `target` is an existing
                                    directory under the sandbox's workdir/, home/ or mounts/ or a --link-root,
                                    reached from there through no symlink (issue 28); a node user gets ACLs on
                                    it, resolved the same way, never on a symlink's target or a hard link's

Runs get only the environment the controller sends (the task's envs and secrets, SkyPilot's variables), the
agent's own SORTIE_NODE_SANDBOX, and RUN_ENV_PASSTHROUGH of the agent's environment. An ended run's exit code is
kept in memory and written to exit.json, retried while the disk is full; meanwhile its status (and /health) carry
"node_error". With --hide DIR (repeatable; the local cloud passes the Sortie home), confined runs see DIR empty,
but for their own sandbox and the targets of links.

Path view (--confine only): runs see each absolute upload or link destination P at P, showing mounts/P,
and the rest of the machine unchanged (a private mount namespace: node_view.py, run as a script from beside these
files, so only where the agent runs from a directory, not from the zipapp). Where mount namespaces fail the probe
at start, or SORTIE_NO_MOUNT_NAMESPACE=1, runs get no view and a first log line saying so. Runs get
SORTIE_MOUNTS_ROOT=<sandbox>/mounts either way.

Layout in the sandbox (it survives agent and controller restarts):
    agent.json                      {"pid", "port", "host", "node_id"} once listening
    runs/<id>/meta.json             command, cwd, pid, pgid, started_at
    runs/<id>/output.log            stdout and stderr together
    runs/<id>/exit.json             {"exit_code", "ended_at"} when the run ends (128+N for signal N)
    runs/<id>/cancelled             present if the run was cancelled
    watch.jsonl, watch.json         the change journal (one JSON event a line, its last WATCH_KEEP events kept) and
                                    its epoch: sequence numbers go on across agent restarts
    workdir/                        default cwd of runs
    home/, mounts/                  where `~/...` and (with --confine) absolute upload paths land; with
                                    --confine, home/ is also $HOME of runs
    views.json                      {"views": [P, ...]}: the paths a confined agent's runs see from mounts/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchestrator.node.agent_files import (
    SANDBOX_ENV,
    destination_parts,
    place_destination,
    probe_path_view,
    write_json_atomic,
)
from orchestrator.node.agent_http import serve
from orchestrator.node.container import container_name
from orchestrator.node.runs import Agent
from orchestrator.node.watch import WatchJournal

__all__ = ["SANDBOX_ENV", "Agent", "WatchJournal", "container_name", "destination_parts", "main",
           "place_destination", "probe_path_view", "serve", "write_json_atomic"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sortie node agent")
    parser.add_argument("--sandbox", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--node-id", default="")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--token-stdin", action="store_true", help="read the token from the first line of stdin")
    parser.add_argument("--confine", action="store_true", help="absolute upload paths land under <sandbox>/mounts")
    parser.add_argument("--hide", action="append", default=[],
                        help="with --confine: a directory runs see empty (the Sortie home); repeatable")
    parser.add_argument("--link-root", action="append", default=[],
                        help="a directory POST /links targets may lie under, besides the sandbox's workdir, home "
                        "and mounts (the local store's directory); repeatable")
    parser.add_argument("--container-image", help="run setup and run in a container of this image")
    parser.add_argument("--container-engine", default="docker", help="docker or podman")
    parser.add_argument("--container-option", action="append", default=[], help="an engine run option")
    parser.add_argument("--notices", default="none")
    parser.add_argument("--metadata-url")
    parser.add_argument("--notice-grace", type=float, default=30.0)
    args = parser.parse_args(argv)
    token = os.environ.pop("SORTIE_AGENT_TOKEN", "")
    if args.token_file:
        token = args.token_file.read_text().strip()
    if args.token_stdin:
        token = sys.stdin.readline().strip()
    if not token:
        parser.error("a token is required: pass --token-stdin, --token-file or set SORTIE_AGENT_TOKEN")
    args.sandbox.mkdir(parents=True, exist_ok=True)
    container = ({"engine": args.container_engine, "image": args.container_image, "options": args.container_option}
                 if args.container_image else None)
    serve(args.sandbox.resolve(), token, args.host, args.port, args.node_id or args.sandbox.name, args.confine,
          args.hide, container, args.link_root,
          {"source": args.notices, "base": args.metadata_url, "grace": args.notice_grace})


if __name__ == "__main__":
    main()
