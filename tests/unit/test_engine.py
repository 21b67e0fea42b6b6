"""The engine installer, driven by fake `go` scripts: never the real Go build, never the network."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.errors import EngineError
from orchestrator.infra import engine as engine_mod
from orchestrator.infra.engine import (
    ANALYZER_SHIM,
    FALLBACK_VERSIONS,
    PINNED_VERSION,
    PKG_MODULE,
    PROVIDER_SHIM,
    SDK_MODULE,
    EngineInfo,
    engine_env,
    engine_root,
    engine_version,
    find_engine,
    install_engine,
    write_provider_shim,
)

SORTIE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "sortie"
ALL_VERSIONS = (PINNED_VERSION, *FALLBACK_VERSIONS)
LDFLAG = "-X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v"


@pytest.fixture
def engine_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty engine cache; the official installer is never probed. Returns `<cache>/sortie/engine`."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("SORTIE_ENGINE_ROOT", raising=False)
    monkeypatch.setenv("SORTIE_ENGINE_SOURCE", "build")
    return cache / "sortie" / "engine"


class FakeGo:
    """A `go` shell script first on PATH that logs each call (with $CGO_ENABLED) as one line."""

    def __init__(self, bin_dir: Path, log: Path) -> None:
        self.bin_dir = bin_dir
        self.log = log

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split("|") for line in self.log.read_text().splitlines()]

    def calls_of(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls() if c[1:1 + len(prefix)] == list(prefix)]


def _fake_go_script(log: Path, fail_download: tuple[str, ...], fail_build: bool, version_output: bool) -> str:
    download_cases = "".join(
        f'    {pattern}) echo "go: $3: reading https://proxy.golang.org/$3/@v/list: 404 Not Found" >&2; exit 1;;\n'
        for pattern in fail_download
    )
    if version_output:
        pulumi_script = r"""printf '#!/bin/sh\nif [ "$1" = version ]; then echo %s; fi\n' "$ver" > "$out" """
    else:
        pulumi_script = r"""printf '#!/bin/sh\nexit 0\n' > "$out" """
    build_failure = 'echo "cmd/pulumi: compile: something broke" >&2; exit 1\n' if fail_build else ""
    return f"""#!/bin/sh
{{ printf 'CGO_ENABLED=%s' "$CGO_ENABLED"; for a in "$@"; do printf '|%s' "$a"; done; printf '\\n'; }} >> '{log}'
if [ "$1" = mod ] && [ "$2" = download ]; then
  case "$3" in
{download_cases}    *) exit 0;;
  esac
fi
if [ "$1" = mod ] && [ "$2" = tidy ]; then
  exit 0
fi
if [ "$1" = build ]; then
  {build_failure}out=""; ver=""; prev=""
  for a in "$@"; do
    if [ "$prev" = "-o" ]; then out="$a"; fi
    case "$a" in *version.Version=*) ver="${{a##*version.Version=}}";; esac
    prev="$a"
  done
  {pulumi_script}
  chmod +x "$out"
  exit 0
fi
echo "fake go: unexpected call: $*" >&2
exit 2
"""


@pytest.fixture
def fake_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeGo]:
    def factory(fail_download: tuple[str, ...] = (), fail_build: bool = False,
                version_output: bool = True) -> FakeGo:
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir(exist_ok=True)
        log = tmp_path / "go-calls.log"
        go = bin_dir / "go"
        go.write_text(_fake_go_script(log, fail_download, fail_build, version_output))
        go.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        assert shutil.which("go") == str(go)
        return FakeGo(bin_dir, log)

    return factory


def _path_without_go() -> str:
    """The current PATH without any directory holding a `go`, keeping /usr/bin and /bin."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for extra in ("/usr/bin", "/bin"):
        if extra not in dirs:
            dirs.append(extra)
    kept = [d for d in dirs if shutil.which("go", path=d) is None]
    return os.pathsep.join(kept)


# --- engine_version / find_engine / write_provider_shim --------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_engine_version_strips_v_and_rejects_silent_failing_or_missing(tmp_path: Path) -> None:
    assert engine_version(_script(tmp_path / "ok", 'echo "v3.259.0"')) == "3.259.0"
    assert engine_version(_script(tmp_path / "silent", "exit 0")) is None
    assert engine_version(_script(tmp_path / "fails", 'echo "v3.259.0"; exit 3')) is None
    assert engine_version(tmp_path / "missing") is None


def test_find_engine_needs_the_right_version_at_the_root(engine_cache: Path) -> None:
    assert find_engine() is None
    binary = engine_root(PINNED_VERSION) / "bin" / "pulumi"
    assert binary == engine_cache / f"v{PINNED_VERSION}" / "bin" / "pulumi"
    _script(binary, 'echo "v9.9.9"')
    assert find_engine() is None
    _script(binary, f'echo "v{PINNED_VERSION}"')
    assert find_engine() == EngineInfo(path=binary, version=PINNED_VERSION)


def test_find_engine_accepts_a_fallback_pair(engine_cache: Path) -> None:
    binary = engine_cache / f"v{FALLBACK_VERSIONS[0]}" / "bin" / "pulumi"
    _script(binary, f'echo "v{FALLBACK_VERSIONS[0]}"')
    assert find_engine() == EngineInfo(path=binary, version=FALLBACK_VERSIONS[0])


def test_write_provider_shim_is_executable_and_idempotent(tmp_path: Path) -> None:
    shim = write_provider_shim(tmp_path)
    assert shim == tmp_path / PROVIDER_SHIM
    text = shim.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "-u -m pulumi.dynamic" in text
    assert "SORTIE_PYTHON" in text
    assert sys.executable in text
    assert os.access(shim, os.X_OK)
    mtime = shim.stat().st_mtime_ns
    assert write_provider_shim(tmp_path) == shim
    assert shim.stat().st_mtime_ns == mtime
    assert shim.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [ANALYZER_SHIM, PROVIDER_SHIM]
    analyzer = (tmp_path / ANALYZER_SHIM).read_text()  # runs Python policy packs
    assert "-u -m pulumi.policy" in analyzer and "SORTIE_PYTHON" in analyzer
    assert os.access(tmp_path / ANALYZER_SHIM, os.X_OK)


def test_provider_shim_runs_sortie_python(tmp_path: Path) -> None:
    shim = write_provider_shim(tmp_path)
    fake_python = _script(tmp_path / "fake-python", 'echo "args: $*"')
    out = subprocess.run([str(shim), "--flag"], capture_output=True, text=True, check=True,
                         env={**os.environ, "SORTIE_PYTHON": str(fake_python)})
    assert out.stdout.strip() == "args: -u -m pulumi.dynamic --flag"


# --- install_engine ---------------------------------------------------------------------------------------


def test_install_without_go_is_one_line_error_from_the_cli(engine_cache: Path, tmp_path: Path) -> None:
    path = _path_without_go()
    assert shutil.which("go", path=path) is None
    env = {k: v for k, v in os.environ.items() if k not in ("SORTIE_ENGINE_ROOT", "SORTIE_DEBUG")}
    env.update(PATH=path, SORTIE_HOME=str(tmp_path / "home"))
    out = subprocess.run([str(SORTIE), "engine", "install"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Go" in lines[0]
    assert "PATH" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not [p for p in tmp_path.rglob("pulumi*") if p.is_file() and p.name != "install.log"]
    assert (engine_cache / f"v{PINNED_VERSION}" / "install.log").is_file()  # the cache was the one used


def test_install_without_go_in_process(engine_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_without_go())
    with pytest.raises(EngineError) as err:
        install_engine()
    assert "Go is not on PATH" in str(err.value)
    assert not (engine_root(PINNED_VERSION) / "bin" / "pulumi").exists()


def test_install_names_every_unserved_version_pair(engine_cache: Path, fake_go: Callable[..., FakeGo]) -> None:
    go = fake_go(fail_download=("*",))
    with pytest.raises(EngineError) as err:
        install_engine()
    message = str(err.value)
    for version in ALL_VERSIONS:
        assert f"{SDK_MODULE}@v{version}" in message
    assert "404 Not Found" in message
    assert "\n" not in message
    assert [c[3] for c in go.calls_of("mod", "download")] == [f"{SDK_MODULE}@v{v}" for v in ALL_VERSIONS]
    assert not go.calls_of("build")
    assert find_engine() is None


def test_install_falls_back_to_the_next_served_pair(engine_cache: Path, fake_go: Callable[..., FakeGo]) -> None:
    go = fake_go(fail_download=("*3.259.0*",))
    info, how = install_engine()
    assert how == "built"
    assert info.version == "3.261.0"
    assert info.path == engine_cache / "v3.261.0" / "bin" / "pulumi"
    assert engine_version(info.path) == "3.261.0"
    assert not (info.bin_dir / "pulumi.building").exists()

    shim = info.bin_dir / PROVIDER_SHIM
    assert shim.is_file()
    assert shim.stat().st_mode & stat.S_IXUSR
    assert "-u -m pulumi.dynamic" in shim.read_text()
    assert "SORTIE_PYTHON" in shim.read_text()

    downloads = [c[3] for c in go.calls_of("mod", "download")]
    assert downloads == [f"{SDK_MODULE}@v3.259.0", f"{SDK_MODULE}@v3.261.0", f"{PKG_MODULE}@v3.261.0"]
    assert len(go.calls_of("mod", "tidy")) == 1
    go_mod = (engine_cache.parent / "engine-build" / "v3.261.0" / "go.mod").read_text()
    assert f"{SDK_MODULE} v3.261.0" in go_mod
    assert f"{PKG_MODULE} v3.261.0" in go_mod

    calls_before = len(go.log.read_text().splitlines())
    again, how_again = install_engine()
    assert how_again == "present"
    assert again == info
    assert len(go.log.read_text().splitlines()) == calls_before


def test_build_passes_version_ldflag_and_disables_cgo(engine_cache: Path, fake_go: Callable[..., FakeGo]) -> None:
    go = fake_go(fail_download=("*3.259.0*",))
    install_engine()
    builds = go.calls_of("build")
    assert len(builds) == 1
    build = builds[0]
    assert build[0] == "CGO_ENABLED=0"
    ldflags = build[build.index("-ldflags") + 1]
    assert f"{LDFLAG}3.261.0" in ldflags
    assert ldflags.split() == ["-s", "-w", "-X", f"{LDFLAG[3:]}3.261.0"]
    assert build[-1] == f"{PKG_MODULE}/cmd/pulumi"
    assert all(c[0] == "CGO_ENABLED=0" for c in go.calls())


def test_force_rebuilds_a_present_engine(engine_cache: Path, fake_go: Callable[..., FakeGo]) -> None:
    go = fake_go()
    info, how = install_engine()
    assert (info.version, how) == (PINNED_VERSION, "built")
    assert len(go.calls_of("build")) == 1
    assert install_engine()[1] == "present"
    assert len(go.calls_of("build")) == 1
    info2, how2 = install_engine(force=True)
    assert (info2, how2) == (info, "built")
    assert len(go.calls_of("build")) == 2


def test_binary_printing_no_version_is_rejected(engine_cache: Path, fake_go: Callable[..., FakeGo]) -> None:
    fake_go(version_output=False)
    with pytest.raises(EngineError) as err:
        install_engine()
    message = str(err.value)
    assert f"expected {PINNED_VERSION}" in message
    assert "None" in message
    assert find_engine() is None


def test_failed_build_leaves_no_partial_binary(engine_cache: Path, fake_go: Callable[..., FakeGo]) -> None:
    fake_go(fail_build=True)
    with pytest.raises(EngineError) as err:
        install_engine()
    assert "go build" in str(err.value)
    assert "compile: something broke" in str(err.value)
    bin_dir = engine_root(PINNED_VERSION) / "bin"
    assert not (bin_dir / "pulumi").exists()
    assert not (bin_dir / "pulumi.building").exists()


# --- engine_env -------------------------------------------------------------------------------------------


def test_engine_env(sortie_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PULUMI_HOME", raising=False)
    info = EngineInfo(path=tmp_path / "engine" / "bin" / "pulumi", version=PINNED_VERSION)
    env = engine_env(home=sortie_home, engine=info)
    assert env["PULUMI_SKIP_UPDATE_CHECK"] == "true"
    assert env["PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION"] == "true"
    passphrase = Path(env["PULUMI_CONFIG_PASSPHRASE_FILE"])
    assert passphrase.is_file()
    assert passphrase.is_relative_to(sortie_home)
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    assert passphrase.read_text().strip()
    assert env["PATH"].split(os.pathsep)[0] == str(info.bin_dir)
    assert env["SORTIE_PYTHON"] == sys.executable
    assert env["SORTIE_HOME"] == str(sortie_home)
    assert env["PULUMI_HOME"] == str(sortie_home / "pulumi-home")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(engine_mod.PROJECT_ROOT)


def test_engine_env_without_passphrase_provider(sortie_home: Path, tmp_path: Path) -> None:
    (sortie_home / "config.yaml").write_text("pulumi:\n  secrets_provider: awskms://alias/sortie\n")
    info = EngineInfo(path=tmp_path / "bin" / "pulumi", version=PINNED_VERSION)
    env = engine_env(home=sortie_home, engine=info)
    assert "PULUMI_CONFIG_PASSPHRASE_FILE" not in env
    assert not (sortie_home / "secrets").exists()
