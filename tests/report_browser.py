"""Open a report in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's
Python package, which ships its driver but no browser), recording every request and console
message. Used by tests/test_report_browser.py and bench/report.py."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = os.environ.get("NEURONMAP_CHROMIUM", "/usr/bin/chromium")
# Without these, Chromium phones home at start-up (refused on a closed network, which shows up
# as failed requests and noise); the profile is a fresh empty directory every time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def unavailable_reason() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (Debian package chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[test]')"
    return None


@dataclass
class OpenedReport:
    page: object
    url: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    seconds_to_render: float = 0.0

    @property
    def foreign_requests(self) -> list[str]:
        return [u for u in self.requests if u != self.url]


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright
    profile = tempfile.mkdtemp(prefix="neuronmap-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1000})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def open_report(context, path: Path, timeout_ms: int = 30_000):
    """Load the report and wait until its script says every figure and the atlas are drawn."""
    page = context.new_page()
    url = Path(path).resolve().as_uri()
    opened = OpenedReport(page, url)
    page.on("request", lambda request: opened.requests.append(request.url))
    page.on("console", lambda message: opened.console_errors.append(message.text)
            if message.type in ("error", "assert") else None)
    page.on("pageerror", lambda error: opened.console_errors.append(f"uncaught: {error}"))
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("body[data-rendered]", state="attached", timeout=timeout_ms)
    opened.seconds_to_render = time.perf_counter() - start
    try:
        yield opened
    finally:
        page.close()
