"""The HTML pages through the Flask test client: forms generated from the schema,
errors kept by field, CSRF, prefilled resubmits, uploads from the form, the models
page and the cancel/retry buttons. tests/browser/ drives the same pages in Chromium.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from tests.web.test_api import submit, total_jobs


def field_block(html: str, name: str) -> str:
    """The `<div class="field">` that holds the input named `name`."""
    start = html.rindex('<div class="field', 0, html.index(f'id="f-{name}"'))
    end = html.find('<div class="field', start + 1)
    return html[start:end if end != -1 else len(html)]


def test_index_redirects_to_the_submit_page(client):
    resp = client.get("/")
    assert resp.status_code == 302
    assert resp.headers["Location"].endswith("/submit")
    html = client.get("/submit").get_data(as_text=True)
    from shared.specs import KINDS

    for kind in KINDS:  # every kind's form is one click away
        assert f'href="/submit/{kind}"' in html


def test_submit_page_has_the_fields(client):
    resp = client.get("/submit/ddpm.train")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert 'name="max_steps"' in html
    assert 'name="learning_rate"' in html
    assert 'name="preset"' in html
    assert "invalid" not in field_block(html, "max_steps")

    html = client.get("/submit/ddpm.sample").get_data(as_text=True)
    assert 'name="model"' in html and 'name="num_images"' in html


def test_submit_page_unknown_kind(client):
    resp = client.get("/submit/nope")
    assert resp.status_code == 404
    assert "nope" in resp.get_data(as_text=True)


def test_submit_form_invalid_shows_the_error_by_the_field(client):
    resp = client.post("/submit/ddpm.train", data={"preset": "tiny", "max_steps": "0", "learning_rate": "0.002"})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    block = field_block(html, "max_steps")
    assert "greater than or equal to 1" in block
    assert 'value="0"' in block
    assert 'class="field invalid"' in block
    assert 'value="0.002"' in field_block(html, "learning_rate")  # other input kept too
    assert "greater than or equal to 1" not in field_block(html, "learning_rate")
    assert total_jobs(client) == 0


def test_submit_form_valid_redirects_to_the_job_page(client):
    resp = client.post("/submit/ddpm.train", data={"preset": "tiny", "max_steps": "7", "class_conditional": "on"})
    assert resp.status_code == 302
    match = re.search(r"/jobs/([0-9a-f]{32})$", resp.headers["Location"])
    assert match, resp.headers["Location"]
    job_id = match.group(1)
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["params"]["max_steps"] == 7 and job["params"]["class_conditional"] is True

    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert job_id in html and "queued" in html

    listing = client.get("/jobs")
    assert listing.status_code == 200 and job_id in listing.get_data(as_text=True)


def test_submit_form_takes_nested_params_as_json(client):
    from html import unescape

    # The form shows a list of objects as JSON; sent back unchanged, it is the default.
    html = client.get("/submit/ddpm.schedule_plot").get_data(as_text=True)
    shown = re.search(r'<textarea id="f-schedules" name="schedules"[^>]*>([^<]*)</textarea>', html).group(1)
    resp = client.post("/submit/ddpm.schedule_plot", data={"schedules": unescape(shown)})
    assert resp.status_code == 302, resp.get_data(as_text=True)
    job_id = resp.headers["Location"].rsplit("/", 1)[1]
    assert [s["label"] for s in client.get(f"/api/v1/jobs/{job_id}").get_json()["params"]["schedules"]] == [
        "linear", "cosine", "low beta_end=0.003", "high beta_end=0.1"]

    resp = client.post("/submit/ddpm.sample", data={"model": "m", "guidance": '{"color": [0.1, 0.5]}'})
    assert resp.status_code == 400
    assert "must have 3 values" in resp.get_data(as_text=True)
    resp = client.post("/submit/ddpm.sample", data={"model": "m", "guidance": '{"color": [0.1, 0.5, 0.9]}'})
    assert resp.status_code == 302


def test_missing_job_page_is_html_404(client):
    resp = client.get("/jobs/" + "0" * 32)
    assert resp.status_code == 404
    assert resp.mimetype == "text/html"


def test_csrf_protects_forms_but_not_the_json_api(sqlite_settings):
    from web import create_app

    client = create_app(replace(sqlite_settings, csrf_enabled=True)).test_client()
    resp = client.post("/submit/ddpm.train", data={"preset": "tiny", "max_steps": "5"})
    assert resp.status_code == 400
    assert "CSRF" in resp.get_data(as_text=True)
    assert total_jobs(client) == 0

    # With the token from the form page, the same post goes through.
    html = client.get("/submit/ddpm.train").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    resp = client.post("/submit/ddpm.train", data={"preset": "tiny", "max_steps": "5", "csrf_token": token})
    assert resp.status_code == 302

    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.train", "params": {"max_steps": 5}})
    assert resp.status_code == 202
    assert total_jobs(client) == 2


def test_submit_page_shows_the_default_preset_values(client):
    html = client.get("/submit/ddpm.train").get_data(as_text=True)
    assert 'value="300"' in field_block(html, "max_steps")  # the tiny preset's max_steps
    assert 'value="16"' in field_block(html, "image_size")


@pytest.mark.parametrize("priority", ["abc", "10", "-1"])
def test_submit_form_bad_priority_is_a_field_error(client, priority):
    before = client.get("/api/v1/jobs").get_json()["total"]
    resp = client.post("/submit/ddpm.train", data={"max_steps": "5", "priority": priority})
    assert resp.status_code == 400
    block = field_block(resp.get_data(as_text=True), "priority")
    assert "must be in [0, 9]" in block
    assert client.get("/api/v1/jobs").get_json()["total"] == before
