"""Infra, the Pulumi engine: where it lives, how it is installed, and the environment Sortie runs it in.

The engine root is a cache outside any checkout, keyed by version
(`$SORTIE_ENGINE_ROOT`, else `${XDG_CACHE_HOME:-~/.cache}/sortie/engine/v<version>`), so a second
clone, a second install and CI on the same machine reuse one build.

Install order: an engine of the pinned version already at the root; the official release, verified against its
published SHA-256 and by the version it reports (`orchestrator/infra/releases.py`; a site that does not answer fails
within seconds); else a build from the Go module proxy (the air-gapped path).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import SortieConfig, load_config, passphrase_file, sortie_home
from orchestrator.errors import EngineError

PINNED_VERSION = "3.259.0"
# Served pairs of sdk/pkg modules to try, in order, when the pinned one is not served by the proxy.
FALLBACK_VERSIONS = ("3.261.0", "3.263.0")
SDK_MODULE = "github.com/pulumi/pulumi/sdk/v3"
PKG_MODULE = "github.com/pulumi/pulumi/pkg/v3"
OFFICIAL_SITE = "https://get.pulumi.com"
PROVIDER_SHIM = "pulumi-resource-pulumi-python"
ANALYZER_SHIM = "pulumi-analyzer-policy-python"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EngineInfo:
    """An installed engine."""

    path: Path
    version: str

    @property
    def bin_dir(self) -> Path:
        return self.path.parent


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sortie"


def engine_root(version: str = PINNED_VERSION) -> Path:
    override = os.environ.get("SORTIE_ENGINE_ROOT")
    if override:
        return Path(override).expanduser().resolve()
    return cache_dir() / "engine" / f"v{version}"


def engine_version(binary: Path) -> str | None:
    """What `pulumi version` prints, without the leading v; None if it does not run or prints nothing."""
    try:
        out = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=30,
            env={**os.environ, "PULUMI_SKIP_UPDATE_CHECK": "true"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip()
    return text.removeprefix("v") if out.returncode == 0 and text else None


def find_engine() -> EngineInfo | None:
    """The installed engine of the pinned version (or a fallback pair), if any."""
    roots: list[tuple[Path, str]] = [(engine_root(v), v) for v in (PINNED_VERSION, *FALLBACK_VERSIONS)]
    for root, version in dict.fromkeys(roots):
        binary = root / "bin" / "pulumi"
        if binary.is_file() and engine_version(binary) == version:
            return EngineInfo(path=binary, version=version)
    return None


def require_engine() -> EngineInfo:
    info = find_engine()
    if info is None:
        raise EngineError(
            f"the Pulumi engine v{PINNED_VERSION} is not installed at {engine_root()}; run `sortie engine install`"
        )
    return info


def write_provider_shim(bin_dir: Path) -> Path:
    """The plugins the engine launches for Python: `pulumi-resource-pulumi-python` hosts dynamic providers (the
    local cloud's nodes); `pulumi-analyzer-policy-python` runs Python policy packs (`pulumi.policy_packs`).

    They run `$SORTIE_PYTHON` (set by Sortie for every engine run, so several checkouts can share one engine
    root), else the interpreter that installed the engine. Returns the provider shim.
    """
    for name, module, what in ((PROVIDER_SHIM, "pulumi.dynamic", "host Python dynamic providers"),
                               (ANALYZER_SHIM, "pulumi.policy", "run Python policy packs")):
        shim = bin_dir / name
        content = (
            "#!/bin/sh\n"
            f"# Written by `sortie engine install`: Pulumi runs this to {what}.\n"
            f'exec "${{SORTIE_PYTHON:-{sys.executable}}}" -u -m {module} "$@"\n'
        )
        if not shim.exists() or shim.read_text() != content:
            tmp = shim.with_suffix(".tmp")
            tmp.write_text(content)
            tmp.chmod(0o755)
            os.replace(tmp, shim)
    return bin_dir / PROVIDER_SHIM


def _install_official(root: Path, version: str, progress: Progress) -> None:
    """The official release into `root/bin`, verified; ReleaseUnavailable when it cannot be had or is wrong."""
    from orchestrator.infra.releases import ReleaseUnavailable, install_engine_release

    install_engine_release(root, version, progress)
    binary = root / "bin" / "pulumi"
    got = engine_version(binary)
    if got != version:
        binary.unlink(missing_ok=True)
        raise ReleaseUnavailable(f"the released engine reports version {got!r}, not {version}")


_GO_MOD = """module sortie.local/enginebuild

go 1.24

require (
\t{sdk} v{version}
\t{pkg} v{version}
)
"""

_TOOLS_GO = """//go:build tools

package enginebuild

import _ "{pkg}/cmd/pulumi"
"""


class _ModuleUnavailable(Exception):
    """The proxy did not serve one module of a version pair."""


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, progress: Progress,
                label: str, quiet_every: float = 10.0) -> tuple[int, str]:
    """Run a command, appending its output to the log and reporting progress (each line, and every `quiet_every`
    seconds while it prints nothing: a module download can be silent for minutes); returns (rc, tail)."""
    started = time.monotonic()
    tail: list[str] = []
    count = 0
    done = threading.Event()

    def still_running() -> None:
        while not done.wait(quiet_every):
            progress(f"{label}: {count} lines, {time.monotonic() - started:.0f}s - still running")

    progress(f"{label}: started")
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        ticker = threading.Thread(target=still_running, name="install-progress", daemon=True)
        ticker.start()
        try:
            for line in proc.stdout:
                fh.write(line)
                count += 1
                tail = [*tail[-19:], line.rstrip()]
                progress(f"{label}: {count} lines, {time.monotonic() - started:.0f}s - {line.strip()[:80]}")
            rc = proc.wait()
        finally:
            done.set()
            ticker.join()
    return rc, "\n".join(tail)


def _failing_module(output: str, version: str) -> str:
    match = re.search(r"(github\.com/[\w./-]+)@(v[\w.+-]+)", output)
    return f"{match.group(1)}@{match.group(2)}" if match else f"{PKG_MODULE}@v{version}"


def _build_from_proxy(root: Path, version: str, log: Path, progress: Progress) -> None:
    go = shutil.which("go")
    if go is None:
        raise EngineError(
            "Go is not on PATH: the engine is built from the Go module proxy; install Go 1.24+ "
            f"(or put pulumi v{version} at {root / 'bin' / 'pulumi'}) and run `sortie engine install` again"
        )
    build_dir = cache_dir() / "engine-build" / f"v{version}"
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "go.mod").write_text(_GO_MOD.format(sdk=SDK_MODULE, pkg=PKG_MODULE, version=version))
    (build_dir / "tools.go").write_text(_TOOLS_GO.format(pkg=PKG_MODULE))
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    for module in (SDK_MODULE, PKG_MODULE):
        rc, out = _run_logged([go, "mod", "download", f"{module}@v{version}"], build_dir, env, log, progress,
                              f"fetching {module}@v{version}")
        if rc != 0:
            raise _ModuleUnavailable(f"{module}@v{version}: {out.splitlines()[-1] if out else 'refused'}")
    rc, out = _run_logged([go, "mod", "tidy"], build_dir, env, log, progress, "resolving dependencies")
    if rc != 0:
        raise _ModuleUnavailable(f"{_failing_module(out, version)} (a dependency of {PKG_MODULE}@v{version})")
    binary = root / "bin" / "pulumi"
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name("pulumi.building")
    ldflags = f"-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v{version}"
    cmd = [go, "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), f"{PKG_MODULE}/cmd/pulumi"]
    rc, out = _run_logged(cmd, build_dir, env, log, progress, "compiling the engine")
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"go build of {PKG_MODULE}/cmd/pulumi@v{version} failed: "
                          f"{out.splitlines()[-1] if out else 'no output'} (log: {log})")
    os.replace(tmp, binary)


def install_engine(force: bool = False, progress: Progress | None = None) -> tuple[EngineInfo, str]:
    """Install the engine if needed. Returns the engine and how it got there (present/official/built). Several
    installs at once (checkouts sharing the cache, parallel test runs) take turns: the second waits for the first
    build and finds its engine, instead of building it again beside it."""
    report = progress or (lambda _msg: None)
    existing = None if force else find_engine()
    if existing is not None:
        write_provider_shim(existing.bin_dir)
        return existing, "present"
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / "engine-install.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report("another `sortie engine install` is building the engine; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        existing = None if force else find_engine()
        if existing is not None:
            write_provider_shim(existing.bin_dir)
            return existing, "present"
        return _install_engine(report)


def _official_or_built(root: Path, version: str, log: Path, report: Progress) -> str:
    """The official release when it can be had and verifies; else a build from the Go module proxy."""
    from orchestrator.infra.releases import ReleaseUnavailable

    try:
        _install_official(root, version, report)
        return "official"
    except ReleaseUnavailable as exc:
        with log.open("a") as fh:
            fh.write(f"official release: {exc}\n")
        report(f"no official release ({exc}); building v{version} from the Go module proxy (about 6 minutes)")
    _build_from_proxy(root, version, log, report)
    return "built"


def _install_engine(report: Progress) -> tuple[EngineInfo, str]:
    failures: list[str] = []
    for version in (PINNED_VERSION, *FALLBACK_VERSIONS):
        root = engine_root(version)
        root.mkdir(parents=True, exist_ok=True)
        log = root / "install.log"
        log.write_text(f"sortie engine install v{version}\n")
        try:
            how = _official_or_built(root, version, log, report)
        except _ModuleUnavailable as exc:
            failures.append(f"{exc} (log: {log})")
            report(f"not served: {exc}; trying the next version pair")
            continue
        binary = root / "bin" / "pulumi"
        got = engine_version(binary)
        if got != version:
            raise EngineError(f"the engine at {binary} reports version {got!r}, expected {version} (log: {log})")
        write_provider_shim(binary.parent)
        return EngineInfo(path=binary, version=version), how
    raise EngineError("the Go module proxy served no usable engine: " + "; ".join(failures))


def default_backend_url(home: Path) -> str:
    return f"file://{home / 'pulumi-backend'}"


def backend_url(config: SortieConfig, home: Path) -> str:
    return config.pulumi.backend_url or default_backend_url(home)


def _plugin_dirs() -> list[str]:
    """Provider plugins Sortie built (`sortie engine install --plugin kubernetes`): found by the engine on PATH."""
    from orchestrator.infra.provider_plugins import plugin_path_dirs

    return plugin_path_dirs()


def engine_env(home: Path | None = None, config: SortieConfig | None = None,
               engine: EngineInfo | None = None) -> dict[str, str]:
    """Environment variables Sortie sets for every engine run (never set by hand)."""
    home = home or sortie_home()
    config = config or load_config(home)
    engine = engine or require_engine()
    env = {
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_HOME": os.environ.get("PULUMI_HOME") or str(home / "pulumi-home"),
        "PATH": os.pathsep.join([str(engine.bin_dir), *_plugin_dirs(), os.environ.get("PATH", "")]),
        "SORTIE_PYTHON": sys.executable,
        "SORTIE_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    if config.pulumi.secrets_provider == "passphrase":
        env["PULUMI_CONFIG_PASSPHRASE_FILE"] = str(passphrase_file(home))
    if (config.pulumi.backend_url or "").startswith("postgres://"):
        # The engine's PostgreSQL backend lists stacks with 10 workers over a pool of 2 x GOMAXPROCS connections, and
        # deadlocks (`stack ls` hangs for good) once the workers are as many as the connections: 4 on 2 cores here
        # (measured with 8 stacks: 4 workers hang, 3 list them in 0.2 s). One worker is safe on any machine.
        env["PULUMI_DIY_BACKEND_PARALLEL"] = os.environ.get("PULUMI_DIY_BACKEND_PARALLEL") or "1"
    return env
