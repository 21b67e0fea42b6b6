"""Infra, official release downloads: what a user's machine does first, before building anything from source.

`sortie engine install` tries the Pulumi engine's official release tarball (and `--plugin kubernetes` the engine's
own `pulumi plugin install`) before the Go module proxy. A download here is verified before it is used: its
SHA-256 must match the release's published checksums file, and the binary must then report the pinned version.
A site that does not answer fails within a short connect timeout (`SORTIE_RELEASE_TIMEOUT`, default 5 s), so a
machine without internet access (CI here) reaches the proxy build at once. `SORTIE_ENGINE_SOURCE=build` skips the
release altogether; `SORTIE_RELEASE_URL` points at a mirror laid out as GitHub's release downloads.
"""

from __future__ import annotations

import hashlib
import os
import platform
import selectors
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]

RELEASE_URL = "https://github.com/pulumi/pulumi/releases/download"
CHUNK = 1 << 16
MAX_DOWNLOAD = 1 << 30  # no release tarball is near 1 GiB: a bigger answer is not one


class ReleaseUnavailable(Exception):
    """The official release could not be fetched or did not verify; the caller builds from source instead."""


def release_timeout() -> float:
    try:
        return max(0.5, float(os.environ.get("SORTIE_RELEASE_TIMEOUT", "5")))
    except ValueError:
        return 5.0


def releases_wanted() -> bool:
    return os.environ.get("SORTIE_ENGINE_SOURCE") != "build"


def engine_asset(version: str) -> tuple[str, str]:
    """(tarball, checksums file) names of the engine's release for this machine."""
    system = platform.system().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    if system not in ("linux", "darwin") or arch is None:
        raise ReleaseUnavailable(f"no official release for {platform.system()}/{platform.machine()}")
    return f"pulumi-v{version}-{system}-{arch}.tar.gz", f"pulumi-{version}-checksums.txt"


def _open(url: str) -> Any:
    try:
        return urllib.request.urlopen(url, timeout=release_timeout())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ReleaseUnavailable(f"{url}: {reason}") from None


def fetch_text(url: str, limit: int = 1 << 20) -> str:
    with _open(url) as resp:
        return resp.read(limit).decode("utf-8", "replace")


def download(url: str, dest: Path, progress: Progress, label: str, every: float = 2.0) -> str:
    """Download `url` to `dest`, reporting progress at most every `every` seconds; returns the SHA-256 (hex)."""
    digest = hashlib.sha256()
    done, started, told = 0, time.monotonic(), 0.0
    with _open(url) as resp, dest.open("wb") as fh:
        total = int(resp.headers.get("Content-Length") or 0)
        of = f" of {total / 1e6:.1f} MB" if total else ""
        while True:
            try:
                chunk = resp.read(CHUNK)
            except OSError as exc:
                raise ReleaseUnavailable(f"{url}: {exc}") from None
            if not chunk:
                break
            done += len(chunk)
            if done > MAX_DOWNLOAD:
                raise ReleaseUnavailable(f"{url}: over {MAX_DOWNLOAD >> 20} MiB; not a release tarball")
            digest.update(chunk)
            fh.write(chunk)
            now = time.monotonic()
            if now - told >= every:
                told = now
                progress(f"{label}: {done / 1e6:.1f} MB{of}, {now - started:.0f}s")
    if total and done != total:
        raise ReleaseUnavailable(f"{url}: {done} of {total} bytes")
    return digest.hexdigest()


def expected_sha256(checksums: str, name: str) -> str:
    """The SHA-256 of `name` in a `sha256sum`-style checksums file."""
    for line in checksums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name and len(parts[0]) == 64:
            return parts[0].lower()
    raise ReleaseUnavailable(f"the release's checksums do not list {name}")


def install_engine_release(root: Path, version: str, progress: Progress) -> None:
    """Download the engine's release tarball, verify its SHA-256 against the release's checksums, and put its
    binaries under `root/bin` (each moved into place whole). Raises ReleaseUnavailable on any failure."""
    if not releases_wanted():
        raise ReleaseUnavailable("SORTIE_ENGINE_SOURCE=build")
    tarball, sums = engine_asset(version)
    base = f"{os.environ.get('SORTIE_RELEASE_URL', RELEASE_URL).rstrip('/')}/v{version}"
    progress(f"fetching the official release {base}/{tarball}")
    wanted = expected_sha256(fetch_text(f"{base}/{sums}"), tarball)
    staging = root / "release.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        got = download(f"{base}/{tarball}", staging / tarball, progress, f"downloading {tarball}")
        if got != wanted:
            raise ReleaseUnavailable(f"{tarball}: SHA-256 {got} does not match the release's {wanted}")
        progress(f"verified {tarball} (SHA-256 {got[:12]}...); unpacking")
        try:
            with tarfile.open(staging / tarball) as tar:
                tar.extractall(staging / "x", filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ReleaseUnavailable(f"{tarball}: {exc}") from None
        unpacked = staging / "x" / "pulumi"
        if not (unpacked / "pulumi").is_file():
            raise ReleaseUnavailable(f"{tarball} holds no pulumi/pulumi")
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for binary in sorted(unpacked.iterdir(), key=lambda b: b.name == "pulumi"):  # the engine last
            if binary.is_file():
                binary.chmod(0o755)
                os.replace(binary, bin_dir / binary.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PLUGIN_HOST = ("get.pulumi.com", 443)  # where `pulumi plugin install` fetches Pulumi's own providers


def _reachable(host: tuple[str, int]) -> None:
    try:
        socket.create_connection(host, timeout=release_timeout()).close()
    except OSError as exc:
        raise ReleaseUnavailable(f"{host[0]}:{host[1]} does not answer ({exc})") from None


def _run_reporting(cmd: list[str], env: dict[str, str], progress: Progress, label: str, log: Path,
                   timeout: float = 900.0) -> None:
    """Run `cmd`, appending its output to `log` and reporting each line; ReleaseUnavailable when it fails."""
    deadline = time.monotonic() + timeout
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        last = ""
        for line in proc.stdout:
            fh.write(line)
            last = line.strip() or last
            progress(f"{label}: {last[:100]}")
            if time.monotonic() > deadline:
                proc.kill()
        if proc.wait() != 0:
            raise ReleaseUnavailable(f"`{' '.join(cmd[1:4])}` failed: {last or 'no output'}")


def plugin_answers(binary: Path, timeout: float = 30.0) -> bool:
    """A provider plugin starts and completes the plugin handshake: its first line is the port it serves on."""
    proc = subprocess.Popen([str(binary), "127.0.0.1:1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        with selectors.DefaultSelector() as sel:
            assert proc.stdout is not None
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return False
            return proc.stdout.readline().strip().isdigit()
    finally:
        proc.kill()
        proc.wait()


def install_plugin_release(engine: Path, name: str, version: str, binary_name: str, target: Path, log: Path,
                           progress: Progress) -> None:
    """`pulumi plugin install resource NAME VERSION` (the engine's own download, into a throwaway PULUMI_HOME),
    verified by its handshake, then moved to `target`. Raises ReleaseUnavailable on any failure."""
    if not releases_wanted():
        raise ReleaseUnavailable("SORTIE_ENGINE_SOURCE=build")
    _reachable(PLUGIN_HOST)
    with tempfile.TemporaryDirectory(prefix="sortie-plugin-") as tmp:
        env = {**os.environ, "PULUMI_HOME": tmp, "PULUMI_SKIP_UPDATE_CHECK": "true"}
        _run_reporting([str(engine), "plugin", "install", "resource", name, version, "--non-interactive"], env,
                       progress, f"pulumi plugin install resource {name} v{version}", log)
        found = Path(tmp) / "plugins" / f"resource-{name}-v{version}" / binary_name
        if not found.is_file():
            raise ReleaseUnavailable(f"`pulumi plugin install` left no {found.name}")
        progress(f"checking that {binary_name} v{version} starts")
        if not plugin_answers(found):
            raise ReleaseUnavailable(f"the downloaded {binary_name} did not complete the plugin handshake")
        building = target.with_name(target.name + ".building")
        shutil.copy2(found, building)
        building.chmod(0o755)
        os.replace(building, target)
