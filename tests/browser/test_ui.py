"""The web UI in a real browser, against real web and worker processes.

Each test says what the user does and what they must see. The tests share one
service and run in order: the model trained in the first is sampled in the second.
"""
from __future__ import annotations

import re
import time

import pytest

from shared.specs import KINDS

JOB_URL = re.compile(r"/jobs/([0-9a-f]{32})$")
TRAIN_STEPS = 90


def job_id_from(page) -> str:
    page.wait_for_url(JOB_URL)
    return JOB_URL.search(page.url).group(1)


def wait_status(page, selector: str, status: str, timeout_s: float = 120) -> None:
    page.locator(selector).filter(has_text=re.compile(rf"^{status}$")).wait_for(timeout=timeout_s * 1000)


def mark_document(page) -> None:
    """A marker that a reload would wipe: the page must update itself, not be reloaded."""
    page.evaluate("window.__sameDocument = true")


def assert_same_document(page) -> None:
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"


def image_loaded(page, selector: str, timeout_s: float = 15) -> bool:
    """The image has loaded (waiting for it: the last poll may have just swapped its src)."""
    try:
        page.wait_for_function(f"(() => {{ const img = document.querySelector({selector!r}); "
                               "return img && img.complete && img.naturalWidth > 0; })()", timeout=timeout_s * 1000)
    except Exception:  # playwright's TimeoutError: not loaded in time
        return False
    return True


@pytest.fixture(scope="module")
def trained(ui):
    """The model the first test trains through the form (or one trained here, when that
    test was deselected)."""
    if not getattr(ui, "trained_job_id", None):
        job = ui.api("POST", "/jobs", json={"kind": "ddpm.train", "params": {"preset": "tiny", "max_steps": 30}}).json()
        assert ui.wait_finished(job["id"])["status"] == "succeeded"
        ui.trained_job_id = job["id"]
    return ui.trained_job_id


def test_train_from_the_form_and_watch_it_run(ui, page, screenshots):
    # 1. From the submit page, choose ddpm.train, pick the tiny preset, submit.
    page.goto(ui.url + "/")
    page.get_by_role("link", name="ddpm.train", exact=True).click()
    page.wait_for_url("**/submit/ddpm.train")
    page.wait_for_load_state()  # app.js has attached its handlers (a loaded machine is slow to)
    # Choosing a preset fills in its values.
    page.select_option("#f-preset", "digits")
    assert (page.input_value("#f-max_steps"), page.is_checked("#f-use_ema")) == ("700", True)
    page.select_option("#f-preset", "tiny")
    assert (page.input_value("#f-max_steps"), page.is_checked("#f-use_ema")) == ("300", False)
    page.fill("#f-max_steps", str(TRAIN_STEPS))
    page.fill("#f-sample_every", "30")
    page.get_by_role("button", name="Submit job").click()

    # 2. Land on the job page; the progress bar advances with no reload.
    job_id = job_id_from(page)
    mark_document(page)
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + 180
    while page.text_content("#status") != "succeeded" and time.monotonic() < deadline:
        value, maximum = page.eval_on_selector("#bar", "bar => [bar.value, bar.max]")
        if maximum == TRAIN_STEPS and (not seen or seen[-1][0] != value):
            seen.append((value, maximum))
        assert page.text_content("#status") not in ("failed", "cancelled"), page.text_content("#error")
        time.sleep(0.1)
    train_values = [v for v, _ in seen]
    assert len(set(train_values)) >= 3, f"the bar moved through {train_values} only"
    assert train_values == sorted(train_values), train_values
    assert page.text_content("#status") == "succeeded"
    assert_same_document(page)

    # 3. The loss curve, the final grid and the per-checkpoint grids appear, loaded.
    for name in ("loss.png", "samples.png", "samples/step-000030.png", "samples/step-000090.png"):
        selector = f'img[data-name="{name}"]'
        page.wait_for_selector(selector)
        page.wait_for_function(f"document.querySelector('{selector}').naturalWidth > 0")
    assert page.get_attribute('img[data-name="loss.png"]', "alt") == "Training loss per step"
    assert page.locator("#model-zip").get_attribute("href").endswith(f"/api/v1/jobs/{job_id}/archive?prefix=model/")
    assert page.is_visible("#sample-model")
    assert page.is_hidden("#cancel-form")

    # Click to enlarge, by keyboard: Enter opens the lightbox, Escape closes it.
    page.focus('a.enlarge:has(img[data-name="loss.png"])')
    page.keyboard.press("Enter")
    page.wait_for_selector("#lightbox[open]")
    assert page.text_content("#lightbox-caption") == "loss.png"
    page.wait_for_function("document.getElementById('lightbox-img').naturalWidth > 0")
    page.screenshot(path=screenshots / "train-job-lightbox.png")
    page.keyboard.press("Escape")
    page.wait_for_function("!document.getElementById('lightbox').open")
    page.screenshot(path=screenshots / "train-job.png", full_page=True)
    ui.trained_job_id = job_id


def test_sample_from_the_models_button_shows_changing_previews(ui, trained, page, screenshots):
    # 4. The models page lists the trained model; its button opens the sampling form pre-filled.
    page.goto(ui.url + "/models")
    row = page.locator(f'tr[data-ref="job:{trained}"]')
    row.get_by_role("link", name="Sample from this model").click()
    page.wait_for_url(re.compile(r"/submit/ddpm\.sample\?"))
    assert page.input_value("#f-model") == f"job:{trained}"
    page.fill("#f-num_images", "16")
    page.select_option("#f-scheduler", "ddpm")
    page.fill("#f-steps", "400")  # about 10 s here: a poll a second sees several previews
    page.fill("#f-preview_every", "20")
    page.get_by_role("button", name="Submit job").click()

    job_id = job_id_from(page)
    mark_document(page)
    wait_status(page, "#status", "succeeded", timeout_s=180)
    shown = page.evaluate("window.__previews")
    while_running = {src for src, status in shown if status == "running"}
    assert len(while_running) >= 2, f"previews shown while running: {shown}"
    assert image_loaded(page, "#preview")
    assert page.locator("#images img").count() == 16
    assert ui.api("GET", f"/jobs/{job_id}").json()["params"]["model"] == f"job:{trained}"
    assert_same_document(page)
    page.screenshot(path=screenshots / "sample-job.png", full_page=True)


def test_cancel_a_running_job_from_the_list(ui, page, screenshots):
    # 5. A long job runs; its Cancel button in the list stops it, and the row says so.
    job = ui.api("POST", "/jobs", json={"kind": "ddpm.train", "params": {"preset": "tiny", "max_steps": 100000}}).json()
    page.goto(ui.url + "/jobs")
    mark_document(page)
    row = f'tr[data-id="{job["id"]}"]'
    wait_status(page, f"{row} .status", "running")
    page.wait_for_function(f"document.querySelector('{row} progress').value > 0")
    page.screenshot(path=screenshots / "jobs-running.png", full_page=True)
    page.click(f"{row} button[data-action=cancel]")
    wait_status(page, f"{row} .status", "cancelled", timeout_s=60)
    assert page.locator(f"{row} button[data-action=retry]").is_visible()
    assert ui.api("GET", f"/jobs/{job['id']}").json()["status"] == "cancelled"
    assert_same_document(page)
    page.screenshot(path=screenshots / "jobs-cancelled.png", full_page=True)


def broken_model(ui) -> str:
    """An empty folder in the models dir: accepted at submit, and its job fails on the worker."""
    (ui.settings.models_dir / "broken-model").mkdir(parents=True, exist_ok=True)
    return "broken-model"


def test_a_failed_job_shows_its_error_and_retries_from_its_page(ui, page):
    job = ui.api("POST", "/jobs", json={"kind": "ddpm.sample", "params": {"model": broken_model(ui)}}).json()
    page.goto(f"{ui.url}/jobs/{job['id']}")
    mark_document(page)
    wait_status(page, "#status", "failed", timeout_s=60)
    error = ui.api("GET", f"/jobs/{job['id']}").json()["error"]
    assert "broken-model" in error
    assert page.is_visible("#error-box") and page.text_content("#error") == error
    assert page.is_visible("#retry") and page.is_hidden("#cancel")

    page.click("#retry")  # runs again, and fails again: the page follows it with no reload
    page.wait_for_function("document.getElementById('attempt').textContent === '2'", timeout=60_000)
    wait_status(page, "#status", "failed", timeout_s=60)
    assert_same_document(page)


def test_pin_a_finished_job_from_its_page(ui, page):
    job = ui.api("POST", "/jobs", json={"kind": "ddpm.sample", "params": {"model": broken_model(ui)}}).json()
    page.goto(f"{ui.url}/jobs/{job['id']}")
    mark_document(page)
    wait_status(page, "#status", "failed", timeout_s=60)
    page.locator("#retention").filter(has_text=re.compile(r"^kept until ")).wait_for()  # 30 days, local time
    assert page.is_visible("#pin") and page.is_hidden("#unpin")

    page.click("#pin")
    page.locator("#retention").filter(has_text=re.compile(r"^pinned: kept$")).wait_for()
    assert page.is_visible("#unpin") and page.is_hidden("#pin")
    assert ui.api("GET", f"/jobs/{job['id']}").json()["pinned"] is True
    page.click("#unpin")
    page.locator("#retention").filter(has_text=re.compile(r"^kept until ")).wait_for()
    assert ui.api("GET", f"/jobs/{job['id']}").json()["pinned"] is False
    assert_same_document(page)


def test_invalid_value_shows_the_field_error_and_keeps_the_input(ui, page, screenshots):
    # 6. A bad value comes back next to its field, with everything typed kept, and no job.
    before = ui.api("GET", "/jobs").json()["total"]
    page.goto(ui.url + "/submit/ddpm.train")
    page.select_option("#f-preset", "tiny")
    page.fill("#f-max_steps", "0")
    page.fill("#f-learning_rate", "0.002")
    page.fill("#f-sample_every", "7")
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_selector("#form-errors")
    error = page.text_content('[data-field="max_steps"] .field-error')
    assert "greater than or equal to 1" in error
    assert page.get_attribute("#f-max_steps", "aria-invalid") == "true"
    assert page.input_value("#f-max_steps") == "0"
    assert page.input_value("#f-learning_rate") == "0.002"
    assert page.input_value("#f-sample_every") == "7"
    assert page.input_value("#f-preset") == "tiny"
    assert page.locator('[data-field="learning_rate"] .field-error').count() == 0
    assert ui.api("GET", "/jobs").json()["total"] == before
    page.screenshot(path=screenshots / "submit-invalid.png", full_page=True)


def test_schedule_a_job_from_its_page_then_run_it_now(ui, trained, page, screenshots):
    # "Schedule this job" opens the schedule form with the job's kind and params.
    page.goto(f"{ui.url}/jobs/{trained}")
    page.get_by_role("link", name="Schedule this job").click()
    page.wait_for_url(re.compile(r"/schedules/new\?from="))
    assert page.input_value("#f-kind") == "ddpm.train"
    assert '"max_steps"' in page.input_value("#f-params")
    page.fill("#f-name", "nightly digits")
    page.fill("#f-cron", "0 2 * *")  # four fields: refused by the field, input kept
    page.fill("#f-timezone", "Europe/Berlin")
    page.get_by_role("button", name="Save schedule").click()
    assert "must have 5 fields" in page.text_content('[data-field="cron"] .field-error')
    assert (page.input_value("#f-cron"), page.input_value("#f-name")) == ("0 2 * *", "nightly digits")
    page.fill("#f-cron", "0 2 * * *")
    page.get_by_role("button", name="Save schedule").click()

    # Listed with its next run on Berlin's wall clock; "Run now" starts a job from it.
    page.wait_for_url(re.compile(r"/schedules#s-"))
    row = page.locator("#schedules tbody tr", has_text="nightly digits")
    assert re.search(r"02:00 CES?T", row.locator('[data-label="Next run"]').text_content())
    page.screenshot(path=screenshots / "schedules.png", full_page=True)
    row.get_by_role("button", name="Run now nightly digits").click()
    page.wait_for_url(JOB_URL)
    assert "from a schedule" in page.text_content(".summary")
    wait_status(page, "#status", "running")  # the worker took it; cancel, to leave the worker free
    page.click("#cancel")
    wait_status(page, "#status", "cancelled", timeout_s=60)


def test_every_page_is_labelled_and_fits_a_phone(ui, trained, browser, screenshots):
    # Forms for every kind, the lists and a job page: every control has a label, every
    # image has alt text, and nothing is wider than a phone's screen.
    phone = browser.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    shown = [name for name, kind in KINDS.items() if kind.enabled_by is None]  # noop is off here
    paths = [f"/submit/{kind}" for kind in shown] + ["/submit", "/jobs", "/models", "/schedules", "/schedules/new",
                                                     f"/jobs/{trained}"]
    for path in paths:
        phone.goto(ui.url + path)
        phone.wait_for_load_state("networkidle")
        unlabelled = phone.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter((el) => el.type !== 'hidden' && el.offsetParent !== null)
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                            && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
            .map((el) => el.outerHTML.slice(0, 80))""")
        assert not unlabelled, f"{path}: unlabelled controls {unlabelled}"
        no_alt = phone.evaluate("() => [...document.querySelectorAll('img')].filter((i) => !i.alt).map((i) => i.src)")
        assert not no_alt, f"{path}: images without alt text {no_alt}"
        overflow = phone.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{path} is {overflow} px wider than the phone"
    phone.screenshot(path=screenshots / "job-phone.png", full_page=True)
    # The first Tab reaches the skip link, which jumps to the content.
    phone.keyboard.press("Tab")
    assert phone.evaluate("document.activeElement.className") == "skip"
    phone.close()
