"""Issue 24, section 6: a preemption notice reaches the job (SIGTERM and the notice file), and the controller starts
the recovery at the notice, not at the loss. On the local cloud: `sortie local preempt --job ID --notice 20s`."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from state.store import StateStore
from tests.support.e2e import Sortie, path_view_works, write

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here")]
FAST = "controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  grace_misses: 2\n"

# Checkpoints only on SIGTERM: a resume from a step above 0 proves the notice reached the job in time.
TRAIN = """\
name: train-on-notice
resources:
  use_spot: true
file_mounts:
  /checkpoint:
    name: {bucket}
    mode: MOUNT
run: |
  step=$(cat /checkpoint/step 2>/dev/null || echo 0)
  echo "resuming from step $step"
  on_term() {{
    echo "$step" > /checkpoint/step
    echo "checkpointed step $step: $(head -1 "$SORTIE_PREEMPTION_NOTICE_FILE")"
    exit 143
  }}
  trap on_term TERM
  pause=0.2; [ -e {marker} ] || {{ touch {marker}; pause=3; }}
  while [ "$step" -lt 8 ]; do
    step=$((step + 1))
    echo "step $step"
    sleep $pause & wait $!
  done
  echo "trained to step $step"
"""


@pytest.fixture
def cli(sortie_cli) -> Sortie:
    return sortie_cli(FAST)


def test_job_checkpoints_on_the_notice_and_resumes_from_it(cli: Sortie, tmp_path: Path) -> None:
    bucket = f"notice-{secrets.token_hex(4)}"
    job_id = cli.launch(write(tmp_path, "train.yaml", TRAIN.format(bucket=bucket, marker=tmp_path / "first")))
    cli.wait_for_log(job_id, "step 2\n", timeout=90)
    noticed = cli.run("local", "preempt", "--job", str(job_id), "--notice", "25s", check=False)
    assert noticed.returncode == 0, (noticed.stderr, cli.job(job_id), cli.logs(job_id, "--controller"))
    said = noticed.stdout
    assert "notice given to" in said and "preempted in 25s" in said, said
    job = cli.wait(job_id, timeout=150)
    assert job["status"] == "SUCCEEDED", cli.logs(job_id, "--controller")
    assert job["tasks"][0]["recoveries"] == 1
    log = cli.logs(job_id)
    points = [int(n) for n in re.findall(r"resuming from step (\d+)", log)]
    assert len(points) == 2 and points[0] == 0 and points[1] >= 2, log
    assert re.search(r"checkpointed step \d+: SORTIE_PREEMPTION_NOTICE=\d{10}", log), log
    assert "trained to step 8" in log
    events = {e.what: e for e in StateStore(cli.home).events(job_id)}
    assert "preemption-notice" in events and "local" in events["preemption-notice"].why
    # Recovery began at the notice: the attempt was failed as preempted well before the node's deadline.
    assert events["preempted"].at - events["preemption-notice"].at < 20, cli.logs(job_id, "--controller")


def test_notice_refuses_a_bad_duration(cli: Sortie) -> None:
    result = cli.run("local", "preempt", "some-cluster", "--notice", "soon", check=False)
    assert result.returncode == 2 and "--notice" in result.stderr + result.stdout
