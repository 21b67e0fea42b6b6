"""`sortie jobs ...` in-process: bad input gives one-line errors, exit 2, and writes nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import main

KEYS = ["name", "run", "setup", "num_nodes", "resources", "envs", "secrets", "workdir", "file_mounts", "cpus",
        "accelerators", "infra", "use_spot", "job_recovery", "any_of", "ordered", "memory", "bogus", "labels"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=False, width=16),
                    st.text(max_size=12), st.sampled_from(["4+", "H100:8", "local", "aws/us-east-1", "V100:x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["sortie", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out.out, out.err


def job_count(home: Path) -> int:
    if not (home / "state.db").exists():
        return 0
    from state.store import StateStore

    return len(StateStore(home).list_jobs())


@pytest.fixture
def no_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Submitting must not start a daemon in these tests."""
    import orchestrator.controller.daemon as daemon
    import orchestrator.controller_service as controller_service

    for module in (daemon, controller_service):  # the services reach the daemon through controller_service
        monkeypatch.setattr(module, "ensure_controller", lambda home=None: None)


@pytest.mark.parametrize(("text", "expected"), [
    ("resources:\n  cpus: four\nrun: x\n", 'resources.cpus: "four" is not a number or a range like 4+'),
    ("envs:\n  NEED: null\nrun: x\n", "envs.NEED: no value; pass --env NEED=... or set it in the YAML"),
    ("resources:\n  job_recovery:\n    max_restarts_on_errors: -1\nrun: x\n",
     "resources.job_recovery.max_restarts_on_errors: must be >= 0"),
    ("runn: echo\n", "runn: unknown field"),
    ("run: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_is_exit_2_one_line_per_problem_and_writes_nothing(
        text: str, expected: str, sortie_home: Path, tmp_path: Path, no_controller: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    code, _out, err = run_cli(["jobs", "launch", "-y", str(path)], monkeypatch, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (sortie_home / "state.db").exists()


def test_null_env_is_filled_from_the_command_line(sortie_home: Path, tmp_path: Path, no_controller: None,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("envs:\n  NEED: null\nrun: echo $NEED\n")
    code, out, _ = run_cli(["jobs", "launch", "-y", "-d", "--env", "NEED=42", str(path)], monkeypatch, capsys)
    assert code == 0 and "submitted: ID 1" in out
    from state.store import StateStore

    job = StateStore(sortie_home).job(1)
    assert job is not None and job.spec["tasks"][0]["envs"]["NEED"] == "42"


def test_dryrun_json_redacts_secrets_and_writes_nothing(sortie_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["jobs", "launch", "--dryrun", "--json", "--secret", "TOK=s3cret", "--cpus", "2",
                            "--num-nodes", "2", "echo hi"], monkeypatch, capsys)
    assert code == 0
    plan = json.loads(out)
    task = plan["tasks"][0]
    assert task["secrets"] == {"TOK": "<redacted>"} and "s3cret" not in out
    assert task["num_nodes"] == 2 and task["run"] == "echo hi"
    assert task["resources"][0]["cpus"] == "2"
    assert not (sortie_home / "state.db").exists()


def test_secrets_never_reach_the_state_in_clear(sortie_home: Path, no_controller: None,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli(["jobs", "launch", "-y", "-d", "--secret", "TOK=hunter2-secret", "echo hi"],
                         monkeypatch, capsys)
    assert code == 0
    assert b"hunter2-secret" not in (sortie_home / "state.db").read_bytes()
    wal = sortie_home / "state.db-wal"
    assert not wal.exists() or b"hunter2-secret" not in wal.read_bytes()
    code, out, _ = run_cli(["jobs", "queue", "--json"], monkeypatch, capsys)
    assert "hunter2" not in out


def test_queue_rejects_an_unknown_status(sortie_home: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["jobs", "queue", "-s", "DONE"], monkeypatch, capsys)
    assert code == 2 and "--status DONE: not a job status" in err


def test_cancel_needs_exactly_one_selector(sortie_home: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["jobs", "cancel", "-y"], monkeypatch, capsys)
    assert code == 2 and "exactly one" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents)
def test_random_yaml_never_tracebacks_and_bad_yaml_writes_no_row(
        doc: dict, sortie_home: Path, tmp_path: Path, no_controller: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(doc))
    before = job_count(sortie_home)
    code, _out, err = run_cli(["jobs", "launch", "-y", "-d", str(path)], monkeypatch, capsys)
    assert "Traceback" not in err
    if code == 0:
        assert job_count(sortie_home) == before + 1
    else:
        assert code == 2, err
        assert err.strip(), "an error must say what is wrong"
        assert job_count(sortie_home) == before


DRYRUN_AND_LAUNCH_REFUSE = [  # issue 28: each passed --dryrun, or was refused at launch with exit 1
    ("file_mounts:\n  /x: local://BAD_NAME\n", "bucket name 'BAD_NAME' is not valid"),
    ("file_mounts:\n  /x: local://missing-bucket\n", "bucket missing-bucket does not exist"),
    ("file_mounts:\n  /x: local://../../etc\n", "bucket name '..' is not valid"),
    ("file_mounts:\n  /x: local://okbucket/../../etc\n", "has a '.' or '..' part"),
    ("file_mounts:\n  /x: local://${A}\n", "bucket name '${A}' is not valid"),
    ("envs:\n  A: BAD\nfile_mounts:\n  /x:\n    name: ${A}\n", "bucket name 'BAD' is not valid"),
    ("envs:\n  A: ''\nfile_mounts:\n  /x:\n    name: ${A}\n", "the bucket name is empty"),
    ("file_mounts:\n  /x:\n    name: okbucket\n    source: /dev/zero\n", "/dev/zero is neither a file nor"),
    ("file_mounts:\n  /x:\n    name: okbucket\n    source: [/dev/zero]\n", "/dev/zero is neither a file nor"),
    ("file_mounts:\n  /x:\n    source: local://missing-bucket\n    mode: MOUNT\n", "does not exist"),
    ("file_mounts:\n  /x: /dev/zero\n", "/dev/zero is neither a file nor"),
]


@pytest.mark.parametrize("flags", [["--dryrun"], ["--dryrun", "--json"], ["-d"]])
@pytest.mark.parametrize(("text", "expected"), DRYRUN_AND_LAUNCH_REFUSE)
def test_dryrun_refuses_what_launch_refuses_with_exit_2_and_nothing_written(
        text: str, expected: str, flags: list[str], sortie_home: Path, tmp_path: Path, no_controller: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("run: echo hi\n" + text)
    code, _out, err = run_cli(["jobs", "launch", "-y", *flags, str(path)], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and expected in err, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert job_count(sortie_home) == 0
