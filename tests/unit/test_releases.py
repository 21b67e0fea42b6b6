"""Installing binaries the way a user's machine does (issue 27): the official release first, verified, over real
HTTP from a local mirror laid out as GitHub's release downloads; the Go module proxy build (a fake `go`) only when
the release cannot be had or does not verify; and progress shown on a terminal or not."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from cli.output import InstallProgress
from orchestrator.infra import releases
from orchestrator.infra.engine import PINNED_VERSION, engine_root, engine_version, find_engine, install_engine
from orchestrator.infra.releases import ReleaseUnavailable, engine_asset, expected_sha256, plugin_answers
from tests.support.s3 import free_port
from tests.unit.test_engine import FakeGo, _fake_go_script, _script

TARBALL, SUMS = engine_asset(PINNED_VERSION)


def _tarball(version_printed: str) -> bytes:
    """A release tarball as Pulumi lays it out: pulumi/pulumi and its language hosts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in (("pulumi/pulumi", f'[ "$1" = version ] && echo v{version_printed}'),
                           ("pulumi/pulumi-language-python", "exit 0")):
            data = f"#!/bin/sh\n{body}\n".encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """A real HTTP server for `SORTIE_RELEASE_URL`; the factory writes its release (good unless told otherwise)."""
    root = tmp_path / "mirror"
    (root / f"v{PINNED_VERSION}").mkdir(parents=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SORTIE_RELEASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("SORTIE_ENGINE_SOURCE", raising=False)

    def release(version_printed: str = PINNED_VERSION, corrupt: bool = False) -> Path:
        data = _tarball(version_printed)
        digest = hashlib.sha256(data).hexdigest()
        folder = root / f"v{PINNED_VERSION}"
        (folder / TARBALL).write_bytes(data + (b"x" if corrupt else b""))
        (folder / SUMS).write_text(f"{'0' * 64}  pulumi-v{PINNED_VERSION}-windows-x64.zip\n{digest}  {TARBALL}\n")
        return folder

    yield release
    server.shutdown()
    server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SORTIE_ENGINE_ROOT", raising=False)
    return tmp_path / "cache" / "sortie"


@pytest.fixture
def go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGo:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "go").write_text(_fake_go_script(tmp_path / "go-calls.log", (), False, True))
    (bin_dir / "go").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return FakeGo(bin_dir, tmp_path / "go-calls.log")


def test_the_official_release_is_downloaded_verified_and_used(cache: Path, mirror, go: FakeGo) -> None:
    mirror()
    told: list[str] = []
    info, how = install_engine(progress=told.append)
    assert how == "official" and info.version == PINNED_VERSION
    assert engine_version(info.path) == PINNED_VERSION
    assert (info.bin_dir / "pulumi-language-python").is_file()  # the release's language hosts came too
    assert go.calls() == []  # nothing built
    assert any("verified" in line and TARBALL in line for line in told), told
    assert not (engine_root() / "release.partial").exists()
    assert find_engine() == info


def test_a_release_that_fails_its_checksum_is_not_used(cache: Path, mirror, go: FakeGo) -> None:
    mirror(corrupt=True)
    _info, how = install_engine()
    assert how == "built"  # fell back to the Go module proxy
    assert len(go.calls_of("build")) == 1
    log = (engine_root() / "install.log").read_text()
    assert "does not match the release's" in log
    assert not (engine_root() / "release.partial").exists()


def test_a_release_reporting_another_version_is_removed_and_built_instead(cache: Path, mirror, go: FakeGo) -> None:
    mirror(version_printed="3.1.0")
    info, how = install_engine()
    assert how == "built" and engine_version(info.path) == PINNED_VERSION
    assert "reports version '3.1.0'" in (engine_root() / "install.log").read_text()


def test_an_unreachable_release_site_fails_fast_to_the_build(cache: Path, go: FakeGo,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SORTIE_ENGINE_SOURCE", raising=False)
    monkeypatch.setenv("SORTIE_RELEASE_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens
    started = time.monotonic()
    _info, how = install_engine()
    assert how == "built" and time.monotonic() - started < 10
    assert "official release: http://127.0.0.1" in (engine_root() / "install.log").read_text()


def test_build_source_skips_the_release_without_any_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SORTIE_ENGINE_SOURCE", "build")

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the network was used")

    monkeypatch.setattr(releases.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(releases.socket, "create_connection", no_network)
    with pytest.raises(ReleaseUnavailable, match="SORTIE_ENGINE_SOURCE=build"):
        releases.install_engine_release(tmp_path, PINNED_VERSION, print)
    with pytest.raises(ReleaseUnavailable, match="SORTIE_ENGINE_SOURCE=build"):
        releases.install_plugin_release(tmp_path / "pulumi", "kubernetes", "4.0.0", "p", tmp_path / "p",
                                        tmp_path / "log", print)


def test_checksums_name_the_exact_asset() -> None:
    sums = f"{'a' * 64}  {TARBALL}.sig\n{'b' * 64} *{TARBALL}\n"
    assert expected_sha256(sums, TARBALL) == "b" * 64
    with pytest.raises(ReleaseUnavailable, match="do not list"):
        expected_sha256(f"{'a' * 64}  other.tar.gz\n", TARBALL)


def test_a_plugin_is_verified_by_its_handshake(tmp_path: Path) -> None:
    assert plugin_answers(_script(tmp_path / "good", "echo 41234; sleep 30"))
    assert not plugin_answers(_script(tmp_path / "wrong", "echo 'not a plugin'"))
    assert not plugin_answers(_script(tmp_path / "silent", "sleep 30"), timeout=1.0)


def test_an_unreachable_plugin_host_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SORTIE_ENGINE_SOURCE", raising=False)
    monkeypatch.setattr(releases, "PLUGIN_HOST", ("127.0.0.1", free_port()))
    started = time.monotonic()
    with pytest.raises(ReleaseUnavailable, match="does not answer"):
        releases.install_plugin_release(tmp_path / "pulumi", "kubernetes", "4.0.0", "p", tmp_path / "p",
                                        tmp_path / "log", print)
    assert time.monotonic() - started < 5


def test_progress_off_a_terminal_is_lines_each_step_and_every_so_often() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with InstallProgress(console, "Pulumi engine", every=0.2) as progress:
        progress("fetching sdk: 1 lines, 0s - a")
        progress("fetching sdk: 2 lines, 0s - b")  # same step, too soon: not shown
        progress("compiling the engine: 1 lines, 0s - c")
        time.sleep(0.3)
        progress("compiling the engine: 900 lines, 1s - d")
    lines = out.getvalue().splitlines()
    assert lines == ["Pulumi engine: fetching sdk: 1 lines, 0s - a", "Pulumi engine: compiling the engine: 1 lines, "
                     "0s - c", "Pulumi engine: compiling the engine: 900 lines, 1s - d"]


def test_a_silent_build_step_still_reports_progress(tmp_path: Path) -> None:
    from orchestrator.infra.engine import _run_logged

    told: list[str] = []
    rc, _tail = _run_logged(["sh", "-c", "sleep 1.2; echo done"], tmp_path, dict(os.environ), tmp_path / "log",
                            told.append, "fetching a module", quiet_every=0.3)
    assert rc == 0
    quiet = [line for line in told if line.endswith("still running")]
    assert len(quiet) >= 2, told  # while it printed nothing
    assert told[-1].startswith("fetching a module: 1 lines") and told[-1].endswith("done")


def test_engine_install_off_a_terminal_prints_its_progress(tmp_path: Path, cache: Path, go: FakeGo) -> None:
    """The CLI under `make` or CI (stdout not a terminal): a line per step of the build, not silence."""
    import subprocess
    import sys

    env = {**os.environ, "SORTIE_ENGINE_SOURCE": "build", "SORTIE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "cli.main", "engine", "install"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    steps = [line for line in lines if line.startswith("Pulumi engine: ")]
    assert any("fetching" in line for line in steps) and any("compiling the engine" in line for line in steps), lines
    assert lines[-1].startswith(f"Pulumi engine v{PINNED_VERSION} built from the Go module proxy")


def test_the_kubernetes_plugin_comes_from_pulumi_plugin_install_when_it_can(cache: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own download (a stand-in `pulumi` that lays the plugin out as `pulumi plugin install` does),
    checked by the handshake and kept; no Go build."""
    import socket

    from orchestrator.infra import provider_plugins

    version = provider_plugins.sdk_version("kubernetes")
    assert version is not None
    _script(engine_root() / "bin" / "pulumi", f"""[ "$1" = version ] && {{ echo v{PINNED_VERSION}; exit 0; }}
[ "$1 $2 $3 $4" = "plugin install resource kubernetes" ] || exit 3
dir="$PULUMI_HOME/plugins/resource-kubernetes-v$5"; mkdir -p "$dir"
printf '#!/bin/sh\\necho 40123\\nsleep 30\\n' > "$dir/pulumi-resource-kubernetes"
chmod +x "$dir/pulumi-resource-kubernetes"
echo "[resource plugin kubernetes-$5] installing"
""")
    monkeypatch.delenv("SORTIE_ENGINE_SOURCE", raising=False)
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    monkeypatch.setattr(releases, "PLUGIN_HOST", host.getsockname())
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no go: a build would fail
    try:
        info, how = provider_plugins.install_plugin("kubernetes")
    finally:
        host.close()
    assert how == "official" and info.version == version
    assert info.path == cache / "plugins" / "kubernetes" / f"v{version}" / "pulumi-resource-kubernetes"
    assert provider_plugins.find_plugin("kubernetes") == info
    assert plugin_answers(info.path)


def test_the_test_clusters_build_prints_lines_into_a_log(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m orchestrator.infra.kube_binaries` under make or CI: a line per build step, no carriage returns."""
    from orchestrator.infra import kube_binaries

    def build(progress: Callable[[str], None]) -> tuple[object, float]:
        for msg in ("fetching k8s.io/kubernetes: started", "fetching k8s.io/kubernetes: 3 lines, 1s - x",
                    "compiling kube-apiserver: started"):
            progress(msg)
        return kube_binaries.KubeBinaries(Path("/k/bin"), Path("/kwok/bin/kwok"), Path("/usr/bin/etcd")), 42.0

    monkeypatch.setattr(kube_binaries, "install_kube_binaries", build)
    monkeypatch.setattr(kube_binaries, "install_kubelet", lambda say: say("compiling the kubelet: started"))
    kube_binaries.main()
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines()[:3] == ["kubernetes binaries: fetching k8s.io/kubernetes: started",
                                    "kubernetes binaries: compiling kube-apiserver: started",
                                    "kubernetes binaries: compiling the kubelet: started"]
