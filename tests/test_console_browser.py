"""The console in a real headless browser: Debian's chromium driven by selenium through the
system chromedriver (nothing downloads a browser; .ci/run installs both with apt).

One operator's afternoon: sign in, watch a failing job arrive on the overview without
reloading, open it, retry it, watch it complete.  Then what an attacker's browser gets:
a wrong token and no cookie get nothing, a POST without the CSRF token is refused and
changes nothing.  Each step saves a screenshot under the test's tmp dir (and into
$KYRIE_CONSOLE_SCREENSHOTS when set: that is how docs/console-*.png were made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from queue_support import FAST, running, wait_until
from test_api_support import build, served

from kyrie_engine import queue
from kyrie_engine.worker import JobContext, Worker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no system chromium + chromedriver (apt-get install chromium chromium-driver; .ci/run does)",
)

TOKEN = "browser-console-token-" + "b" * 24
KIND = "console.flaky"


class Flaky:
    """A handler that fails while `broken`, and completes once it is mended."""

    def __init__(self) -> None:
        self.broken = True

    async def __call__(self, job: JobContext) -> dict[str, Any]:
        await job.progress("checking", 50)
        if self.broken:
            raise RuntimeError("the ledger service answered 502 Bad Gateway")
        return {"ok": True, "attempt": job.attempt}


async def quick(job: JobContext) -> dict[str, Any]:
    return {"done": job.payload.get("n")}


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium's manager must never fetch a driver or a browser
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="kyrie-chromium-", dir=tmp_path)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1440,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


@dataclass
class Console:
    url: str
    db: asyncpg.Connection
    flaky: Flaky
    browser: Any
    shots: Path

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Selenium blocks: off the loop that serves the console."""
        return await asyncio.to_thread(fn, *args)

    async def go(self, path: str) -> None:
        await self.run(self.browser.get, self.url + path)

    async def shot(self, name: str) -> Path:
        path = self.shots / f"console-{name}.png"
        await self.run(self.browser.save_screenshot, str(path))
        published = os.environ.get("KYRIE_CONSOLE_SCREENSHOTS")
        if published:
            shutil.copy(path, Path(published) / path.name)
        return path

    async def until(self, check: Callable[[Any], Any], within: float = 20) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return await self.run(lambda: WebDriverWait(self.browser, within, 0.1).until(check))

    async def sign_in(self, token: str = TOKEN, who: str = "ana") -> None:
        from selenium.webdriver.common.by import By

        await self.go("/console/login")

        def fill() -> None:
            self.browser.find_element(By.ID, "who").send_keys(who)
            self.browser.find_element(By.ID, "token").send_keys(token)
            self.browser.find_element(By.ID, "signin").click()

        await self.run(fill)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.browser.find_element(By.TAG_NAME, "body").text)


@pytest.fixture
async def console(db: asyncpg.Connection, db_dsn: str, driver: Any, tmp_path: Path) -> AsyncIterator[Console]:
    flaky = Flaky()
    worker = Worker(db_dsn, {KIND: flaky, "console.quick": quick}, concurrency=2, pool_size=3, **FAST)
    app = build(db_dsn, console_token=TOKEN)
    async with served(app) as url, running(worker):
        yield Console(url, db, flaky, driver, tmp_path)


async def test_sign_in_see_a_failure_arrive_live_open_it_retry_it_and_see_it_complete(
    console: Console,
) -> None:
    from selenium.webdriver.common.by import By

    # Some ordinary traffic first, so the overview has something to chart.
    for n in range(30):
        await queue.enqueue(console.db, "console.quick", {"n": n})
    await console.sign_in()
    await console.until(lambda b: "Queue overview" in b.page_source)
    assert "all workspaces" in await console.run(console.text)
    # A mark on this page: still there later means the page was never reloaded.
    await console.run(console.browser.execute_script, "window.kyrieMark = 'same page';")
    await console.until(lambda b: "live" == b.find_element(By.ID, "live-state").text)
    await console.shot("signed-in")

    job = await queue.enqueue(console.db, KIND, {"invoice": "INV-2041"}, max_attempts=1)
    link = f'a.job-link[data-job="{job.id}"]'
    await console.until(lambda b: b.find_elements(By.CSS_SELECTOR, link))
    assert await console.run(console.browser.execute_script, "return window.kyrieMark;") == "same page"
    assert "502 Bad Gateway" in await console.run(console.text)
    await console.shot("overview")

    await console.run(lambda: console.browser.find_element(By.CSS_SELECTOR, link).click())
    await console.until(lambda b: b.find_elements(By.ID, "retry"))
    page = await console.run(console.text)
    assert "attempt 1 failed" in page and "502 Bad Gateway" in page
    assert (await console.run(lambda: console.browser.find_element(By.ID, "job-status").text)) == "failed"
    await console.shot("job-failed")

    console.flaky.broken = False
    await console.run(lambda: console.browser.find_element(By.ID, "retry").click())
    await console.until(lambda b: "Retried" in b.page_source)
    await console.until(lambda b: b.find_element(By.ID, "job-status").text == "completed")
    page = await console.run(console.text)
    assert "attempt 1 completed" in page and '"ok": true' in page
    await console.shot("job")
    finished = await queue.get_job(console.db, job.id)
    assert finished is not None and finished.status == "completed"


async def test_a_wrong_token_and_a_missing_cookie_get_nothing(console: Console) -> None:
    job = await queue.enqueue(console.db, KIND, {"invoice": "INV-7"}, max_attempts=1)
    await wait_until(lambda: console.db.fetchval("select status = 'failed' from jobs where id = $1", job.id))

    await console.sign_in(token="not-the-token-" + "z" * 30)
    await console.until(lambda b: "not the console token" in b.page_source)
    await console.shot("wrong-token")
    assert await console.run(console.browser.get_cookies) == []
    for path in ("/console", f"/console/jobs/{job.id}", "/console/jobs?status=failed"):
        await console.go(path)
        await console.until(lambda b: b.current_url.endswith("/console/login"))
        assert str(job.id) not in console.browser.page_source
        assert "INV-7" not in console.browser.page_source
    await console.shot("no-cookie")


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(console: Console) -> None:
    from selenium.webdriver.common.by import By

    job = await queue.enqueue(console.db, KIND, {}, max_attempts=1)
    await wait_until(lambda: console.db.fetchval("select status = 'failed' from jobs where id = $1", job.id))
    await console.sign_in()
    await console.until(lambda b: "Queue overview" in b.page_source)
    await console.go(f"/console/jobs/{job.id}")
    await console.until(lambda b: b.find_elements(By.ID, "retry"))
    before = await console.db.fetchrow("select status, attempts, updated_at from jobs where id = $1", job.id)
    # The page's own form, its CSRF field taken out (what a forged form would lack).
    await console.run(console.browser.execute_script, """
        const form = document.getElementById('retry').form;
        form.querySelector('input[name=csrf]').remove();
        form.submit();""")
    await console.until(lambda b: "CSRF" in b.page_source)
    assert '"message"' in console.browser.page_source
    await console.shot("csrf-refused")
    after = await console.db.fetchrow("select status, attempts, updated_at from jobs where id = $1", job.id)
    assert after == before
    assert uuid.UUID(str(job.id))  # the job is still the failed one
