"""Jobs on the local cloud are kept apart (issue 17, item 8): a job that tries to read the Sortie home, another
job's sandbox and the controller's environment finds nothing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.support.e2e import Sortie, path_view_works, write

pytestmark = pytest.mark.e2e


@pytest.fixture
def sortie(sortie_cli) -> Sortie:
    return sortie_cli("controller:\n  poll_interval_seconds: 0.3\n  tick_seconds: 0.2\n  autostop_idle_minutes: 5\n")


@pytest.mark.skipif(not path_view_works(), reason="no mount namespaces here: runs cannot be kept from the Sortie "
                    "home (sortie check says so)")
def test_a_job_finds_nothing_of_the_home_other_jobs_or_the_controller(sortie: Sortie, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = sortie.home
    sortie.env.update({"AWS_SECRET_ACCESS_KEY": "controller-secret", "PYTHONPATH": "/controller/path"})
    victim = sortie.launch(write(tmp_path, "victim.yaml", "secrets:\n  API_KEY: victim-secret\n"
                                 "run: echo mine > victim-file.txt; echo ready; sleep 60\n"))
    sortie.wait_for_log(victim, "ready", timeout=120)
    sandboxes = list((home / "local" / "nodes").iterdir())
    assert sandboxes and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in sandboxes)  # not 0755
    assert stat.S_IMODE((home / "state.db").stat().st_mode) == 0o600
    logs = [p for p in (home / "logs").rglob("*") if p.is_file()]
    assert logs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in logs), logs
    probe = f"""
ls -A {home} | tr '\\n' ' '; echo "<- home"
ls {home}/local/nodes | wc -l | sed 's/$/ <- sandboxes/'
cat {home}/secrets/state.key 2>/dev/null && echo KEY-READ
cat {home}/state.db 2>/dev/null | head -c 16 | grep -q SQLite && echo DB-READ
find / -name victim-file.txt 2>/dev/null | sed 's/^/FOUND /'
env | grep -E '^(SORTIE_HOME|SORTIE_DB_URL|PYTHONPATH|AWS_|API_KEY)' | sed 's/^/ENV /'
echo probe-done
"""
    attacker = sortie.launch(write(tmp_path, "attacker.yaml", "run: |\n" + "".join(
        f"  {line}\n" for line in probe.strip().splitlines())))
    job = sortie.wait(attacker, timeout=180)
    out = sortie.logs(attacker)
    sortie.run("jobs", "cancel", "-y", str(victim))
    assert sortie.wait(victim, timeout=180)["status"] == "CANCELLED"  # its cluster is gone before the test ends
    assert job["status"] == "SUCCEEDED", out
    assert "probe-done" in out
    home_line = next(line for line in out.splitlines() if "<- home" in line)
    assert home_line.split(")", 1)[-1].split() == ["local", "<-", "home"], home_line  # only the way to its own
    assert "1 <- sandboxes" in out  # its own sandbox, not the victim's
    for leak in ("KEY-READ", "DB-READ", "FOUND ", "ENV ", "victim-secret", "controller-secret"):
        assert leak not in out, out
