"""Issue 23 end to end on loopback, with real processes: the API server on one server home, client homes for alice
and bob (workspace ml), carol (vision) and an admin. Who sees, cancels and reads what; tokens; secrets that never
leave the server; a killed server that loses nothing while a `jobs logs` follow resumes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e import ROOT, SORTIE, one_line_error, write
from tests.support.team import SERVER_CONFIG, Team

pytestmark = pytest.mark.e2e
SECRET = "s3cr3t-value-of-alice-7f1c"


@pytest.fixture
def team(sortie_cli, tmp_path: Path) -> Iterator[Team]:
    server = sortie_cli(SERVER_CONFIG)
    found = Team(server=server, root=tmp_path)
    for name, extra in (("alice", ()), ("bob", ()), ("carol", ())):
        found.add(name, *extra)
    found.start()
    found.tokens["admin"] = (server.home / "secrets" / "admin.token").read_text().strip()
    assert oct((server.home / "secrets" / "admin.token").stat().st_mode & 0o777) == "0o600"
    for name in ("alice", "bob", "carol", "admin"):
        found.client(name)
    try:
        yield found
    finally:
        server.run("api", "stop", check=False)


def test_who_sees_cancels_and_reads_what(team: Team, tmp_path: Path) -> None:
    alice, bob, carol, admin = (team.clients[n] for n in ("alice", "bob", "carol", "admin"))
    yaml = write(tmp_path, "a.yaml", "name: train\nsecrets:\n  TOKEN: null\nrun: |\n  echo started\n  "
                 "test \"${#TOKEN}\" = " + str(len(SECRET)) + " && test \"${TOKEN%7f1c}\" != \"$TOKEN\" && "
                 "echo token-ok\n  sleep 60\n")
    job = alice.launch("--secret", f"TOKEN={SECRET}", yaml)
    alice.wait_for_log(job, "token-ok")  # the secret reached the job's node
    # bob (same workspace) sees it in `queue -u`, but may not cancel it or read its logs or events
    assert any(r["id"] == job and r["user"] == "alice"
               for r in json.loads(bob.run("jobs", "queue", "-u", "--json").stdout))
    assert "only its owner or an admin" in one_line_error(bob.run("jobs", "cancel", "-y", str(job), check=False))
    assert bob.run("jobs", "cancel", "-y", str(job), check=False).returncode == 2
    assert "only its owner" in one_line_error(bob.run("jobs", "logs", "--no-follow", str(job), check=False))
    assert "only its owner" in one_line_error(bob.run("jobs", "events", str(job), check=False))
    # carol (another workspace) does not see it at all: not found, as a job that does not exist
    assert "train" not in carol.run("jobs", "queue", "-u", "-a").stdout
    assert f"no managed job with id {job}" in one_line_error(carol.run("jobs", "logs", "--no-follow", str(job),
                                                                       check=False))
    assert f"no managed job with id {job}" in one_line_error(carol.run("jobs", "cancel", "-y", str(job),
                                                                       check=False))
    # the admin sees and reads it, and cancels it
    assert "token-ok" in admin.logs(job)
    assert "submitted" in admin.run("jobs", "events", str(job)).stdout
    assert f"Job {job}: cancelling" in admin.run("jobs", "cancel", "-y", str(job)).stdout
    assert alice.wait(job)["status"] == "CANCELLED"
    # every job and event names the authenticated user, and the audit log the user and the request
    events = admin.run("jobs", "events", str(job), "--json").stdout
    assert '"who": "alice"' in events and '"who": "admin"' in events
    audit = admin.run("api", "audit", "--json").stdout
    assert '"action": "launch"' in audit and '"action": "cancel"' in audit and '"request_id"' in audit
    # alice's secret is in no answer, log, event or audit line, and nowhere in a client home
    outputs = [alice.run("jobs", "queue", "-a", "--json").stdout, admin.run("jobs", "queue", "-u", "-v").stdout,
               alice.logs(job), events, audit, alice.run("jobs", "launch", "--dryrun", "--json", "--secret",
                                                          f"TOKEN={SECRET}", yaml).stdout,
               (team.server.home / "logs" / "api-server.log").read_text()]
    assert not [o for o in outputs if SECRET in o]
    client_files = [p for c in team.clients.values() for p in c.home.rglob("*") if p.is_file()]
    text = "\n".join(p.read_text(errors="replace") for p in client_files)
    key = (team.server.home / "secrets" / "state.key").read_text().strip()
    passphrase = (team.server.home / "secrets" / "pulumi-passphrase").read_text().strip()
    for leaked in (SECRET, key, passphrase, "sqlite:", "postgresql", "state.key", "AWS_SECRET", "passphrase"):
        assert leaked not in text, leaked
    assert {p.name for p in client_files} == {"config.yaml"}


def test_tokens_workspaces_and_roles(team: Team) -> None:
    bob, admin = team.clients["bob"], team.clients["admin"]
    # missing, wrong, revoked and expired tokens: 401
    assert team.http("GET", "/api/v1/jobs/queue", None)[0] == 401
    assert team.http("GET", "/api/v1/jobs/queue", "sortie_not-a-token")[0] == 401
    assert team.http("GET", "/api/v1/jobs/queue", team.tokens["bob"])[0] == 200
    old = team.tokens["bob"]
    new = admin.run("users", "token", "rotate", "bob", "-o", "json").stdout
    assert team.http("GET", "/api/v1/jobs/queue", old)[0] == 401  # revoked at once
    assert team.http("GET", "/api/v1/jobs/queue", json.loads(new)["token"])[0] == 200
    short = team.add("dave", "--expires-in", "2s")
    assert team.http("GET", "/api/v1/info", short)[0] == 200
    time.sleep(2.5)
    status, answer = team.http("GET", "/api/v1/info", short)
    assert status == 401 and "expired" in answer["detail"]
    # a CLI with a bad token says so in one line
    assert "not valid" in one_line_error(bob.run("jobs", "queue", check=False))
    bob.run("api", "login", "--endpoint", team.url, "--token", json.loads(new)["token"])
    # another user's job id from another workspace: 404; a user's pool apply: 403; bob in vision: refused
    job = team.clients["carol"].launch("--infra", "local/region-b", "echo hi")
    assert team.http("GET", f"/api/v1/jobs/{job}/events", team.tokens["alice"])[0] == 404
    status, answer = team.http("POST", "/api/v1/pools/p1/apply", team.tokens["alice"], {"pipeline": {"tasks": []}})
    assert status == 403 and "only an admin" in answer["detail"]
    refused = one_line_error(bob.run("jobs", "launch", "-y", "-d", "--workspace", "vision", "echo x", check=False))
    assert "not in workspace vision" in refused
    # allowed_infra: carol's workspace runs only on local/region-b
    refused = one_line_error(team.clients["carol"].run("jobs", "launch", "-y", "-d", "--infra", "local/region-a",
                                                       "echo x", check=False))
    assert "allowed_infra" in refused and "vision" in refused
    assert "only an admin" in one_line_error(bob.run("users", "ls", check=False))
    assert "carol" in admin.run("users", "ls").stdout
    team.clients["carol"].wait(job)


def test_a_killed_server_loses_nothing_and_a_follow_resumes(team: Team, tmp_path: Path) -> None:
    alice = team.clients["alice"]
    job = alice.launch("for i in $(seq 1 40); do echo line-$i; sleep 0.25; done")
    alice.wait_for_log(job, "line-2")
    follow = subprocess.Popen([*SORTIE, "jobs", "logs", str(job)], env=alice.env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        team.kill()
        time.sleep(1.0)
        team.start()  # same port: the client's endpoint is unchanged
        out, err = follow.communicate(timeout=120)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    lines = [line for line in out.splitlines() if "line-" in line]
    assert [line.rsplit("line-", 1)[1] for line in lines] == [str(i) for i in range(1, 41)], out  # once each
    assert alice.wait(job)["status"] == "SUCCEEDED"
    assert job in [r["id"] for r in json.loads(alice.run("jobs", "queue", "-a", "--json").stdout)]
