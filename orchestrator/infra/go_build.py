"""Infra, building Go binaries from the Go module proxy in a throwaway main module, the way the engine is built.

Shared by the provider plugins (`orchestrator/infra/provider_plugins.py`) and the test cluster's Kubernetes binaries
(`orchestrator/infra/kube_binaries.py`): each writes a `go.mod` of its own under the cache (`~/.cache/sortie/...`,
keyed by version), resolves it with `go mod tidy` and builds with `CGO_ENABLED=0` into a temporary name, moved
into place only when the build succeeded (a half-built binary is never found).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from orchestrator.errors import EngineError
from orchestrator.infra.engine import Progress, _run_logged


def go_binary(what: str) -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise EngineError(f"Go is not on PATH: {what} is built from the Go module proxy; install Go 1.26+ "
                          "and run the command again")
    return go


def go_env() -> dict[str, str]:
    return {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false", "GOTOOLCHAIN": "local"}


def run_go(args: list[str], build_dir: Path, log: Path, progress: Progress, label: str, what: str,
           extra_env: dict[str, str] | None = None) -> str:
    """Run `go ARGS` in the build dir, logged; raises EngineError naming the last line of output on failure."""
    go = go_binary(what)
    rc, tail = _run_logged([go, *args], build_dir, {**go_env(), **(extra_env or {})}, log, progress, label)
    if rc != 0:
        last = tail.splitlines()[-1] if tail else "no output"
        raise EngineError(f"{what}: `go {' '.join(args[:2])}` failed: {last} (log: {log})")
    return tail


def module_file(module: str, version: str, build_dir: Path, log: Path, progress: Progress, what: str) -> Path:
    """Download a module from the proxy; returns its extracted directory."""
    go = go_binary(what)
    with log.open("a") as fh:
        fh.write(f"\n$ go mod download -json {module}@{version}\n")
    progress(f"fetching {module}@{version}")
    # Without -mod=mod: the download works inside a wrapper module and outside any module alike.
    out = subprocess.run([go, "mod", "download", "-json", f"{module}@{version}"], cwd=build_dir,
                         env={**go_env(), "GOFLAGS": "-buildvcs=false"},
                         capture_output=True, text=True, timeout=1800)
    with log.open("a") as fh:
        fh.write(out.stdout + out.stderr)
    try:
        info = json.loads(out.stdout)
    except ValueError:
        info = {}
    if out.returncode != 0 or "Dir" not in info:
        reason = info.get("Error") or (out.stderr.strip().splitlines() or ["refused"])[-1]
        raise EngineError(f"{what}: the Go module proxy did not serve {module}@{version}: {reason} (log: {log})")
    return Path(info["Dir"])


def install_atomically(built: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    built.chmod(0o755)
    os.replace(built, target)
