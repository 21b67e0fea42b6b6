"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser download),
over the real engine, controller and local cloud. Screenshots are kept under test-artifacts/dashboard/ (or
$SORTIE_TEST_ARTIFACTS); the path is printed."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_pool_e2e import FAST, take_down, wait_ready
from tests.support.e2e import ROOT, Sortie, write

pytestmark = pytest.mark.e2e
pytest.importorskip("fastapi", reason="the dashboard extra is not installed (pip install 'sortie[dashboard]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")

CHROMIUM = os.environ.get("SORTIE_CHROMIUM") or next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p
     and Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("no chromium binary (apt-get install -y chromium, or set SORTIE_CHROMIUM)", allow_module_level=True)

SHOTS = Path(os.environ.get("SORTIE_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "dashboard"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {SHOTS}")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def cli(sortie_cli) -> Iterator[Sortie]:
    cli = sortie_cli(FAST)
    yield cli
    cli.run("dashboard", "stop", check=False)


@pytest.fixture
def page(browser, cli: Sortie) -> Iterator[tuple[object, str]]:
    out = cli.run("dashboard", "--port", "0").stdout
    url = re.search(r"Dashboard: (http://\S+)", out).group(1)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab, url
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def shot(tab, name: str) -> None:
    tab.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_jobs_filter_live_log_and_cancel(cli: Sortie, page, tmp_path: Path) -> None:
    tab, url = page
    expect = sync_api.expect
    slow = cli.launch("-n", "ticker", "for i in $(seq 1 600); do echo tick-$i; sleep 0.3; done")
    quick = cli.launch("-n", "quick", "echo quick-done")
    broken = cli.launch("-n", "broken", "exit 3")
    assert cli.wait(quick)["status"] == "SUCCEEDED"
    assert cli.wait(broken)["status"] == "FAILED"
    cli.wait(slow, {"RUNNING"})

    # The jobs page lists all three; a filter on several statuses narrows it.
    tab.goto(f"{url}/jobs")
    expect(tab.locator(f"#job-{slow}")).to_be_visible()
    expect(tab.locator(f"#job-{quick} .st")).to_have_text("SUCCEEDED")
    expect(tab.locator("#total")).to_have_text("3")
    shot(tab, "01-jobs")
    tab.click("#f-status summary")
    tab.check("#f-status input[value=SUCCEEDED]")
    tab.check("#f-status input[value=FAILED]")
    shot(tab, "02-status-filter-open")
    tab.click("#f-status-apply")
    expect(tab.locator("#total")).to_have_text("2")
    expect(tab.locator(f"#job-{slow}")).to_have_count(0)
    expect(tab.locator(f"#job-{quick}")).to_be_visible()
    expect(tab.locator(f"#job-{broken}")).to_be_visible()
    expect(tab.locator("#f-status summary")).to_have_text("SUCCEEDED, FAILED")
    # A group pick: "in progress" ticks every status that has not ended, and only those.
    tab.click("#f-status summary")
    tab.click("#f-status button[data-check-group=active]")
    assert not tab.is_checked("#f-status input[value=SUCCEEDED]")
    tab.click("#f-status-apply")
    expect(tab.locator("#total")).to_have_text("1")
    expect(tab.locator(f"#job-{slow}")).to_be_visible()
    tab.goto(f"{url}/jobs")
    tab.fill("#f-q", "tick")
    tab.press("#f-q", "Enter")
    expect(tab.locator("#total")).to_have_text("1")
    expect(tab.locator(f"#job-{slow}")).to_be_visible()
    shot(tab, "03-jobs-searched")

    # The job page streams the running job's lines as they are written.
    tab.goto(f"{url}/jobs/{slow}")
    log = tab.locator("#log")
    expect(log).to_contain_text("(ticker) tick-")
    first = max(map(int, re.findall(r"tick-(\d+)", log.inner_text())))
    expect(log).to_contain_text(f"tick-{first + 5}", timeout=30_000)
    expect(tab.locator("#attempts")).to_contain_text("local")
    shot(tab, "04-job-log-streaming")
    tab.check("#controller-log-switch")
    expect(log).to_contain_text("[placed]")
    shot(tab, "05-controller-log")

    # Cancel with the button: a confirmation, then the status changes without a reload.
    tab.evaluate("window.notReloaded = true")
    dialogs: list[str] = []
    tab.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    tab.click("#job-live button.cancel")
    expect(tab.locator("#job-status")).to_have_text(re.compile("CANCELLING|CANCELLED"))
    expect(tab.locator("#job-status")).to_have_text("CANCELLED", timeout=60_000)
    assert dialogs == [f"Cancel job {slow}?"]
    assert tab.evaluate("window.notReloaded") is True
    shot(tab, "06-job-cancelled")
    assert cli.job(slow)["status"] == "CANCELLED"


def test_a_job_named_like_a_script_is_text_in_the_browser(cli: Sortie, page) -> None:
    """The CLI refuses such a name, so it is written into the state directly (no controller runs it)."""
    from orchestrator.spec import load_yaml_text
    from state.store import StateStore

    tab, url = page
    pipeline = load_yaml_text("run: echo hi\n")
    (job_id,) = StateStore(cli.home).submit({**pipeline.to_json(), "is_pipeline": False}, [{}], user="mallory",
                                            name="<img src=x onerror=alert(1)>")
    dialogs: list[str] = []
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    tab.goto(f"{url}/jobs/{job_id}")
    sync_api.expect(tab.locator("h1 .name")).to_have_text("<img src=x onerror=alert(1)>")
    tab.goto(f"{url}/jobs")
    sync_api.expect(tab.locator(f"#job-{job_id} td.name a")).to_have_text("<img src=x onerror=alert(1)>")
    assert tab.locator("img").count() == 0 and dialogs == []


def test_the_pool_page_shows_its_workers(cli: Sortie, page, tmp_path: Path) -> None:
    tab, url = page
    yaml = write(tmp_path, "pool.yaml", "pool:\n  workers: 1\nresources:\n  cpus: 1+\nsetup: echo set up\n"
                 "run: echo ignored\n")
    cli.run("jobs", "pool", "apply", "-y", "-p", "web", yaml, timeout=180)
    try:
        found = wait_ready(cli, "web", 1)
        stack = found["workers"][0]["stack"]
        tab.goto(f"{url}/pools")
        tab.click("text=web")
        expect = sync_api.expect
        expect(tab.locator("#workers tr.worker")).to_have_count(1)
        expect(tab.locator("#workers")).to_contain_text(stack)
        expect(tab.locator("#workers")).to_contain_text("READY")
        expect(tab.locator("#policy")).to_have_text("1 worker(s)")
        expect(tab.locator("#plan-mode")).to_contain_text("pool created")
        shot(tab, "07-pool")
    finally:
        take_down(cli, "web")
