"""The real `sortie` command line, run as a subprocess against a temporary Sortie home."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from orchestrator.infra.engine import PINNED_VERSION, find_engine
from tests.support.e2e import one_line_error

SORTIE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "sortie"


def sortie(home: Path, *args: str, **env_overrides: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SORTIE_DEBUG", "COLUMNS", "LINES")}
    env["SORTIE_HOME"] = str(home)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([str(SORTIE), *args], capture_output=True, text=True, env=env, timeout=120)



def test_help_lists_the_command_groups(sortie_home: Path) -> None:
    out = sortie(sortie_home, "--help")
    assert out.returncode == 0, out.stderr
    for group in ("engine", "local", "stacks", "check", "show-gpus", "catalog"):
        assert re.search(rf"\b{group}\b", out.stdout), out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("group", "commands"), [
    ("engine", ("install", "status")),
    ("local", ("nodes", "regions", "preempt")),
    ("stacks", ("ls", "gc", "destroy", "unlock")),
    ("stack", ("ls", "gc", "destroy", "unlock")),  # the earlier name still works
    ("catalog", ("update", "show")),
])
def test_group_help_lists_its_commands(sortie_home: Path, group: str, commands: tuple[str, ...]) -> None:
    out = sortie(sortie_home, group, "--help")
    assert out.returncode == 0, out.stderr
    for command in commands:
        assert re.search(rf"\b{command}\b", out.stdout), out.stdout


def test_preempt_unknown_cluster_is_one_line_error(sortie_home: Path) -> None:
    out = sortie(sortie_home, "local", "preempt", "no-such-cluster")
    line = one_line_error(out)
    assert "no-such-cluster" in line
    assert line.startswith("error:")


@pytest.mark.parametrize("cluster", ["x[/]", "[bold]gpu"])
def test_error_message_with_brackets_is_printed_verbatim(sortie_home: Path, cluster: str) -> None:
    out = sortie(sortie_home, "local", "preempt", cluster)
    line = one_line_error(out)
    assert cluster in line


def _table_rows(stdout: str) -> dict[str, list[str]]:
    lines = [line.split() for line in stdout.splitlines() if line.strip()]
    assert lines and lines[0] == ["REGION", "NODES", "IN", "USE", "CAPACITY", "ACCELERATORS"], stdout
    return {cells[0]: cells[1:] for cells in lines[1:]}


def test_local_regions_defaults(sortie_home: Path) -> None:
    out = sortie(sortie_home, "local", "regions")
    assert out.returncode == 0, out.stderr
    rows = _table_rows(out.stdout)
    assert set(rows) == {"local/region-a", "local/region-b"}
    for cells in rows.values():
        assert cells == ["0", "16", "-"]  # finite by default (issue 17)


def test_local_regions_from_config(sortie_home: Path) -> None:
    (sortie_home / "config.yaml").write_text(
        "local:\n  regions:\n    - name: gpu-east\n      capacity: 3\n      accelerators: {H100: 8}\n"
        "    - name: region-b\n    - name: big\n      capacity: null\n"
    )
    out = sortie(sortie_home, "local", "regions")
    assert out.returncode == 0, out.stderr
    rows = _table_rows(out.stdout)
    assert set(rows) == {"local/gpu-east", "local/region-b", "local/big"}
    assert rows["local/gpu-east"] == ["0", "3", "H100:8"]
    assert rows["local/region-b"] == ["0", "16", "-"]  # the finite default (issue 17)
    assert rows["local/big"] == ["0", "unlimited", "-"]  # only when asked for


def test_bad_config_is_one_line_error_naming_the_field(sortie_home: Path) -> None:
    (sortie_home / "config.yaml").write_text("local:\n  regions:\n    - name: region-a\n      capacity: -2\n")
    line = one_line_error(sortie(sortie_home, "local", "regions"))
    assert "local.regions.0.capacity" in line
    assert "config.yaml" in line


def test_invalid_yaml_config_is_one_line_error(sortie_home: Path) -> None:
    (sortie_home / "config.yaml").write_text("local: [unclosed\n")
    line = one_line_error(sortie(sortie_home, "local", "regions"))
    assert "not valid YAML" in line


def _field(stdout: str, name: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(f"{name}:")]
    assert len(lines) == 1, stdout
    return lines[0].removeprefix(f"{name}:").strip()


def test_engine_status(sortie_home: Path) -> None:
    # A wide terminal: without one the lines wrap at 80 columns (see test_engine_status_lines_do_not_wrap).
    out = sortie(sortie_home, "engine", "status", COLUMNS="1000")
    assert "Traceback" not in out.stderr + out.stdout
    assert _field(out.stdout, "backend") == f"file://{sortie_home.resolve() / 'pulumi-backend'}"
    assert _field(out.stdout, "home") == str(sortie_home.resolve())
    info = find_engine()  # the same engine cache the subprocess sees
    if info is not None:
        assert out.returncode == 0, out.stderr
        assert _field(out.stdout, "engine") == str(info.path)
        assert _field(out.stdout, "version") == f"v{info.version} (pinned v{PINNED_VERSION})"
    else:
        line = one_line_error(out)
        assert "sortie engine install" in line
        assert _field(out.stdout, "engine").startswith("not installed")
        assert _field(out.stdout, "version") == f"- (pinned v{PINNED_VERSION})"


def test_engine_status_without_engine(sortie_home: Path, tmp_path: Path) -> None:
    empty_cache = tmp_path / "empty-cache"
    out = sortie(sortie_home, "engine", "status", COLUMNS="1000", XDG_CACHE_HOME=str(empty_cache),
                 SORTIE_ENGINE_ROOT=None)
    line = one_line_error(out)
    assert "not installed" in line
    assert "sortie engine install" in line
    assert str(empty_cache) in _field(out.stdout, "engine")
    assert _field(out.stdout, "backend") == f"file://{sortie_home.resolve() / 'pulumi-backend'}"


def test_engine_status_lines_do_not_wrap(tmp_path: Path) -> None:
    home = tmp_path / ("a-long-directory-name-" * 3) / "sortie-home"
    home.mkdir(parents=True)
    out = sortie(home, "engine", "status")
    assert "Traceback" not in out.stderr + out.stdout
    assert _field(out.stdout, "backend") == f"file://{home.resolve() / 'pulumi-backend'}"
    assert _field(out.stdout, "home") == str(home.resolve())
