"""Chromium, driven by Playwright, against real `web` and `worker` processes on the
embedded default (SQLite, the SQLite broker, local artifacts).

Chromium is Debian's /usr/bin/chromium (no downloaded browser builds); where it or
Playwright is missing the tests skip with the reason, and with DIFFQUEUE_TEST_SERVICES=1
(CI) they fail instead. Screenshots go to $DIFFQUEUE_SCREENSHOTS, or a temp dir
printed at the end of the run.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from shared.config import Settings
from shared.db import upgrade
from tests.conftest import Services, service_unavailable

CHROMIUM = os.environ.get("DIFFQUEUE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
# Records every preview the job page shows, with the status shown beside it, from before
# the page's own script runs: the test reads what the user saw, not what it polled itself.
WATCH_PREVIEWS = """
window.__previews = [];
new MutationObserver((mutations) => {
  for (const m of mutations) {
    if (m.target.id === 'preview' && m.attributeName === 'src') {
      const status = document.getElementById('status');
      window.__previews.push([m.target.getAttribute('src'), status ? status.textContent : '']);
    }
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ['src'] });
"""


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A persistent Chromium context on an empty user-data dir."""
    if not Path(CHROMIUM).exists():
        service_unavailable("Chromium", f"{CHROMIUM} not found (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("Playwright", "the playwright package is not installed (pip install playwright)")
    playwright = sync_playwright().start()
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(30_000)
    context.add_init_script(WATCH_PREVIEWS)
    yield context
    context.close()
    playwright.stop()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory, request) -> Path:
    root = os.environ.get("DIFFQUEUE_SCREENSHOTS")
    path = Path(root) if root else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    request.config.add_cleanup(lambda: print(f"\nbrowser screenshots: {path}"))
    return path


@pytest.fixture(scope="module")
def ui(tmp_path_factory, browser):
    """Real web, worker and beat processes on the embedded default (as `diffqueue up`
    runs them), CSRF on as in production."""
    root = tmp_path_factory.mktemp("ui")
    settings = replace(Settings.embedded(root / "data"), progress_interval_s=0.2, cancel_check_interval_s=0.2)
    upgrade(settings.database_url)
    svc = Services(settings, root)
    svc.start_worker()  # first: its imports (torch) overlap the web's start-up
    svc.start("beat", ["beat"])
    svc.start_web()
    yield svc
    svc.stop()


@pytest.fixture
def page(browser):
    """A tab; JavaScript errors on it fail the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert not errors, f"JavaScript errors: {errors}"
