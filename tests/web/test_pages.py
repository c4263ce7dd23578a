"""The HTML pages through the Flask test client: forms generated from the schema,
errors kept by field, CSRF, prefilled resubmits, uploads from the form, the models
page and the cancel/retry buttons. tests/browser/ drives the same pages in Chromium.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from html import unescape
from html.parser import HTMLParser

import pytest

from shared.specs import KINDS, validate_params
from tests.upload_files import class_zip, png_bytes
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

    for kind in KINDS:  # every kind's form is one click away, but noop, off by default
        assert (f'href="/submit/{kind}"' in html) == (kind != "noop")


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

    (client.application.extensions["diffqueue"].settings.models_dir / "m").mkdir(parents=True)
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


# ------------------------------------------------------------------ every kind's form
class FormValues(HTMLParser):
    """The values a browser would post for #submit-form untouched."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, str] = {}
        self._field: tuple[str, str] | None = None  # (tag, name) whose text is being read
        self._select: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        name = a.get("name")
        if tag == "input" and name and a.get("type") not in ("file",):
            if a.get("type") == "checkbox":
                if "checked" in a:
                    self.values[name] = "on"
            else:
                self.values[name] = a.get("value", "")
        elif tag == "textarea" and name:
            self._field = ("textarea", name)
            self.values[name] = ""
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and ("selected" in a or self._select not in self.values):
            self.values[self._select] = a.get("value", "")

    def handle_data(self, data):
        if self._field:
            self.values[self._field[1]] += data

    def handle_endtag(self, tag):
        if tag == "textarea":
            self._field = None
        if tag == "select":
            self._select = None


def form_values(html: str) -> dict[str, str]:
    parser = FormValues()
    parser.feed(html[html.index('id="submit-form"'):])
    return parser.values


# What the user must type into a kind's form before it can be sent, as typed and as params.
REQUIRED_INPUT = {
    "ddpm.sample": ({"model": "my-model"}, {"model": "my-model"}),
    "sd.txt2img": ({"prompts": "a red fox"}, {"prompts": ["a red fox"]}),
    "sd.img2img": ({"init_image": "upload:" + "a" * 32, "prompts": "a red fox"}, {"prompts": ["a red fox"]}),
    "sd.sweep": ({"prompt": "a red fox"}, {"prompt": "a red fox"}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_form_sent_back_unchanged_gives_the_default_params(sqlite_settings, kind):
    from web import create_app

    client = create_app(replace(sqlite_settings, enable_noop=True)).test_client()  # noop's form too
    (sqlite_settings.models_dir / "my-model").mkdir(parents=True)
    typed, params = REQUIRED_INPUT.get(kind, ({}, {}))
    values = {**form_values(client.get(f"/submit/{kind}").get_data(as_text=True)), **typed}
    values.pop("csrf_token", None)
    resp = client.post(f"/submit/{kind}", data=values)
    if kind == "sd.img2img":  # the init image must be a real upload: refused by name, nothing made
        assert resp.status_code == 400 and "upload:aaaa" in field_block(resp.get_data(as_text=True), "init_image")
        values["init_image"] = params["init_image"] = upload_png(client)
        resp = client.post(f"/submit/{kind}", data=values)
    assert resp.status_code == 302, resp.get_data(as_text=True)[:3000]
    job = client.get("/api/v1/jobs/" + resp.headers["Location"].rsplit("/", 1)[1]).get_json()
    assert job["params"] == validate_params(kind, params).model_dump(mode="json")


def upload_png(client) -> str:
    resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(png_bytes(16, 16)), "init.png")},
                       content_type="multipart/form-data")
    assert resp.status_code == 201
    return resp.get_json()["ref"]


def test_main_fields_come_first_and_the_rest_wait_behind_more_settings(client):
    html = client.get("/submit/ddpm.train").get_data(as_text=True)
    more = html.index('id="more-settings"')
    assert html.index('id="f-preset"') < html.index('id="f-max_steps"') < more < html.index('id="f-adam_beta1"')
    assert re.search(r'id="more-settings"\s*>', html)  # closed

    # An error in one of the more settings opens them.
    resp = client.post("/submit/ddpm.train", data={"adam_beta1": "2"})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert re.search(r'id="more-settings"\s*open', html)
    assert "less than 1" in field_block(html, "adam_beta1")


def test_a_select_of_numbers_posts_a_number(client):
    resp = client.post("/submit/ddpm.train", data={"preset": "tiny", "channels": "1"})
    assert resp.status_code == 302, resp.get_data(as_text=True)
    job = client.get("/api/v1/jobs/" + resp.headers["Location"].rsplit("/", 1)[1]).get_json()
    assert job["params"]["channels"] == 1


# ------------------------------------------------------------------ pre-filled forms
def test_submit_again_with_changes_prefills_the_jobs_params(client):
    job = submit(client, {"preset": "tiny", "max_steps": 17, "learning_rate": 0.003, "block_out_channels": [16, 32]},
                 priority=6)
    html = client.get(f"/submit/ddpm.train?from={job['id']}").get_data(as_text=True)
    values = form_values(html)
    assert (values["max_steps"], values["learning_rate"], values["priority"]) == ("17", "0.003", "6")
    assert values["block_out_channels"] == "16, 32"

    # Posting it unchanged makes a second job with the same params.
    values.pop("csrf_token", None)
    resp = client.post("/submit/ddpm.train", data=values)
    again = client.get("/api/v1/jobs/" + resp.headers["Location"].rsplit("/", 1)[1]).get_json()
    assert again["params"] == job["params"] and again["priority"] == 6 and again["id"] != job["id"]

    # The job page links to it; a job of another kind redirects to its own form.
    assert f"/submit/ddpm.train?from={job['id']}" in client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    resp = client.get(f"/submit/ddpm.sample?from={job['id']}")
    assert resp.status_code == 302 and f"/submit/ddpm.train?from={job['id']}" in resp.headers["Location"]
    assert client.get("/submit/ddpm.train?from=" + "0" * 32).status_code == 404


def test_query_args_prefill_a_field(client):
    html = client.get("/submit/ddpm.sample?model=job:" + "b" * 32).get_data(as_text=True)
    assert form_values(html)["model"] == "job:" + "b" * 32


# ------------------------------------------------------------------ files from the form
def uploads_total(client) -> int:
    return client.get("/api/v1/uploads").get_json()["total"]


def test_a_file_chosen_in_the_form_becomes_an_upload_the_job_names(client):
    (client.application.extensions["diffqueue"].settings.models_dir / "tiny-sd").mkdir(parents=True)
    resp = client.post("/submit/sd.img2img", content_type="multipart/form-data", data={
        "model": "tiny-sd", "prompts": "a red fox",
        "init_image__file": (io.BytesIO(png_bytes(24, 24)), "fox.png"),
    })
    assert resp.status_code == 302, resp.get_data(as_text=True)[:2000]
    job = client.get("/api/v1/jobs/" + resp.headers["Location"].rsplit("/", 1)[1]).get_json()
    upload = client.get("/api/v1/uploads").get_json()["uploads"][0]
    assert job["params"]["init_image"] == upload["ref"]
    assert (upload["filename"], upload["kind"], upload["meta"]["width"]) == ("fox.png", "image", 24)

    resp = client.post("/submit/ddpm.train", content_type="multipart/form-data", data={
        "preset": "tiny", "dataset__file": (io.BytesIO(class_zip()), "digits.zip"),
    })
    assert resp.status_code == 302
    job = client.get("/api/v1/jobs/" + resp.headers["Location"].rsplit("/", 1)[1]).get_json()
    assert job["params"]["dataset"] == client.get("/api/v1/uploads?kind=dataset").get_json()["uploads"][0]["ref"]


def test_a_refused_form_stores_no_file(client):
    # Another field is bad: the file is not stored, and the user is told to choose it again.
    resp = client.post("/submit/sd.img2img", content_type="multipart/form-data", data={
        "model": "tiny-sd", "prompts": "a red fox", "strength": "7",
        "init_image__file": (io.BytesIO(png_bytes(24, 24)), "fox.png"),
    })
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert "less than or equal to 1" in field_block(html, "strength")
    assert "Choose your file again" in html
    # A file of the wrong kind for its field: refused by that field, nothing stored.
    resp = client.post("/submit/ddpm.train", content_type="multipart/form-data", data={
        "preset": "tiny", "dataset__file": (io.BytesIO(png_bytes()), "one.png"),
    })
    assert resp.status_code == 400
    assert "is an image upload, expected a dataset upload" in field_block(resp.get_data(as_text=True), "dataset")
    assert uploads_total(client) == 0 and total_jobs(client) == 0


def test_upload_fields_offer_recent_uploads_and_model_fields_the_models(client, sqlite_settings):
    ref = upload_png(client)
    html = client.get("/submit/sd.img2img").get_data(as_text=True)
    assert f'<option value="{ref}">init.png</option>' in html
    assert 'type="file" id="f-init_image__file" name="init_image__file" accept="image/*"' in html
    (sqlite_settings.models_dir / "org" / "sd-local").mkdir(parents=True)
    (sqlite_settings.models_dir / "org" / "sd-local" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline"}')
    html = client.get("/submit/sd.txt2img").get_data(as_text=True)
    assert '<option value="org/sd-local">' in html


def test_sd_forms_offer_local_models_first_not_the_hub_default(client, sqlite_settings, tiny_ddpm_dir):
    """Offline, the hub id the spec defaults to cannot load, and a filled-in value hides
    the datalist's other entries: with local models there, the form starts on one, and
    lists only the models the kind can load."""
    def model_input(kind: str) -> str:
        html = client.get(f"/submit/{kind}").get_data(as_text=True)
        return re.search(r'<input[^>]*id="f-model"[^>]*>', html).group(0), html

    field, html = model_input("sd.txt2img")
    assert 'value="stable-diffusion-v1-5/stable-diffusion-v1-5"' in field  # none local yet: the default
    for name in ("b-sd", "a-sd"):
        (sqlite_settings.models_dir / name).mkdir()
        (sqlite_settings.models_dir / name / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for kind in ("sd.txt2img", "sd.img2img", "sd.sweep"):
        field, html = model_input(kind)
        assert 'value="a-sd"' in field, field
        listed = re.search(r'<datalist id="l-model">(.*?)</datalist>', html, re.S).group(1)
        assert re.findall(r'value="([^"]+)"', listed) == ["a-sd", "b-sd"]  # not the DDPM tiny-ddpm
    field, _ = model_input("ddpm.sample")
    assert 'value="tiny-ddpm"' in field
    field, _ = model_input("sd.txt2img?model=stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert 'value="stable-diffusion-v1-5/stable-diffusion-v1-5"' in field  # asked for: kept


# ------------------------------------------------------------------ models page
def test_models_page_links_each_model_to_its_sampling_form(client, sqlite_settings, tiny_ddpm_dir):
    (sqlite_settings.models_dir / "sd-local").mkdir()
    (sqlite_settings.models_dir / "sd-local" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    html = client.get("/models").get_data(as_text=True)
    assert 'href="/submit/ddpm.sample?model=tiny-ddpm"' in html
    assert 'href="/submit/sd.txt2img?model=sd-local"' in html
    assert html.count("Sample from this model") == 2


def test_models_page_empty(client):
    html = client.get("/models").get_data(as_text=True)
    assert "No models yet" in html


# ------------------------------------------------------------------ lists and buttons
def test_jobs_page_filters_by_status_and_kind(client):
    (client.application.extensions["diffqueue"].settings.models_dir / "m").mkdir(parents=True)
    train, sample = submit(client, {"max_steps": 5}), submit(client, {"model": "m"}, kind="ddpm.sample")
    client.post(f"/api/v1/jobs/{train['id']}/cancel")
    html = client.get("/jobs?status=cancelled").get_data(as_text=True)
    assert train["id"] in html and sample["id"] not in html
    html = client.get("/jobs?kind=ddpm.sample").get_data(as_text=True)
    assert sample["id"] in html and train["id"] not in html
    html = client.get("/jobs?status=bogus&kind=nope&offset=x").get_data(as_text=True)  # ignored, not an error
    assert sample["id"] in html and train["id"] in html


def test_cancel_and_retry_buttons_need_the_csrf_token(sqlite_settings):
    from web import create_app

    client = create_app(replace(sqlite_settings, csrf_enabled=True)).test_client()
    job = submit(client, {"max_steps": 5})
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 400  # no token: refused
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["status"] == "queued"

    html = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    token = re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)
    # The page's script: the header token, a JSON answer.
    resp = client.post(f"/jobs/{job['id']}/cancel", headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert resp.status_code == 202 and resp.get_json()["status"] == "cancelled"
    # A plain form post (no script): the token field, then back to the page it came from.
    resp = client.post(f"/jobs/{job['id']}/retry", data={"csrf_token": token}, headers={"Referer": "/jobs"})
    assert resp.status_code == 302 and resp.headers["Location"] == "/jobs"
    client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": token})
    resp = client.post(f"/jobs/{job['id']}/retry", data={"csrf_token": token},
                       headers={"Referer": "https://elsewhere.example/x"})
    assert resp.headers["Location"] == f"/jobs/{job['id']}"  # never back to another site
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["status"] == "queued"
    # Retrying a queued job is a conflict, named.
    resp = client.post(f"/jobs/{job['id']}/retry", headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert resp.status_code == 409 and "only failed or cancelled" in resp.get_json()["message"]


# ------------------------------------------------------------------ a job's result
class ResultRows(HTMLParser):
    """The rows of the job page's result table by key path ("timings.load_s"): the
    header cell's text, the value cell's text (a nested table's too), its list items
    and its links."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self._open: list[dict] = []  # rows being read, innermost last
        self._inside = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("id") == "result":
            self._inside = True
        if not self._inside:
            return
        if tag == "tr":
            path = ".".join([*(r["path"] for r in self._open[-1:]), a["data-key"]])
            self._open.append({"path": path, "cell": None, "li": False})
            self.rows[path] = {"label": "", "text": "", "items": [], "links": []}
        elif tag in ("th", "td") and self._open:
            self._open[-1]["cell"] = tag
        elif tag == "li" and self._open:
            self._open[-1]["li"] = True
            self.rows[self._open[-1]["path"]]["items"].append("")
        elif tag == "a" and self._open:
            self.rows[self._open[-1]["path"]]["links"].append(a["href"])

    def handle_data(self, data):
        for row in self._open:
            if row["cell"] == "td":
                self.rows[row["path"]]["text"] += data
        if self._open:
            inner = self.rows[self._open[-1]["path"]]
            if self._open[-1]["cell"] == "th":
                inner["label"] += data
            if self._open[-1]["li"]:
                inner["items"][-1] += data

    def handle_endtag(self, tag):
        if tag == "div":
            self._inside = False
        elif tag == "tr" and self._open:
            self._open.pop()
        elif tag in ("th", "td") and self._open:
            self._open[-1]["cell"] = None
        elif tag == "li" and self._open:
            self._open[-1]["li"] = False


def result_rows(html: str) -> dict[str, dict]:
    parser = ResultRows()
    parser.feed(html)
    return {path: {**row, "label": " ".join(row["label"].split()), "text": " ".join(row["text"].split()),
                   "items": [" ".join(i.split()) for i in row["items"]]} for path, row in parser.rows.items()}


def finish_with(settings, job_id: str, result: dict) -> None:
    """What a worker does at the end: claim the job, record its outcome."""
    from shared import jobs
    from shared.db import make_engine, make_sessionmaker
    from shared.models import JobStatus

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            token = jobs.claim(session, job_id, "test-worker", 60)
            assert jobs.finish(session, job_id, token, JobStatus.SUCCEEDED, result=result)
    finally:
        engine.dispose()


def test_the_job_page_shows_the_result_as_a_readable_table(client, sqlite_settings):
    # The template knows no kind: one result holding what the kinds return between them.
    partner, job_id = submit(client, {"max_steps": 5})["id"], submit(client, {"max_steps": 5})["id"]
    assert 'id="result-section" hidden' in client.get(f"/jobs/{job_id}").get_data(as_text=True)  # nothing yet
    finish_with(sqlite_settings, job_id, {
        "final_loss": 0.0612345678, "wall_time_s": 12.3456, "images_per_s": 1234.5678, "num_params": 1234567,
        "resumed_from_step": None, "model_cache": "hit", "coalesced": True, "image_size": [512, 512],
        "warnings": ["prompt 2 was cut to 77 tokens", "<b>not markup</b>"], "batched_with": [partner],
        "timings": {"load_s": 0.5, "denoise_s": 2.25}, "classes": [],
    })
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="result-section">' in html
    rows = result_rows(html)
    assert list(rows) == ["final_loss", "wall_time_s", "images_per_s", "num_params", "resumed_from_step",
                          "model_cache", "coalesced", "image_size", "warnings", "batched_with", "timings",
                          "timings.load_s", "timings.denoise_s", "classes"]
    cells = {path: (row["label"], row["text"]) for path, row in rows.items()}
    assert cells["final_loss"] == ("final loss", "0.06123")
    assert cells["wall_time_s"] == ("wall time (s)", "12.35")
    assert cells["images_per_s"] == ("images/s", "1,235")
    assert cells["num_params"] == ("num params", "1,234,567")
    assert cells["resumed_from_step"] == ("resumed from step", "none")
    assert cells["model_cache"] == ("model cache", "hit")
    assert cells["coalesced"] == ("coalesced", "yes")
    assert cells["image_size"] == ("image size", "512 × 512")
    assert cells["classes"] == ("classes", "none")
    # A list as a list (its markup shown as text), the partner jobs as links, a nested object as rows.
    assert rows["warnings"]["items"] == ["prompt 2 was cut to 77 tokens", "<b>not markup</b>"]
    assert rows["batched_with"]["links"] == [f"/jobs/{partner}"] and rows["batched_with"]["text"] == partner[:8]
    assert cells["timings.load_s"] == ("load (s)", "0.5") and cells["timings.denoise_s"] == ("denoise (s)", "2.25")


# ------------------------------------------------------------------ schedules
SCHEDULE_FORM = {"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "kind": "ddpm.schedule_plot",
                 "params": '{"num_timesteps_shown": 4}', "priority": "3", "missed_runs": "catch_up_once",
                 "max_concurrent": "2", "overlap": "queue", "enabled": "on"}


def schedules_total(client) -> int:
    return client.get("/api/v1/schedules").get_json()["total"]


def test_schedule_form_creates_a_schedule_listed_with_its_local_next_run(client):
    resp = client.post("/schedules/new", data=SCHEDULE_FORM)
    assert resp.status_code == 302, resp.get_data(as_text=True)[:2000]
    [s] = client.get("/api/v1/schedules").get_json()["schedules"]
    assert (s["name"], s["priority"], s["missed_runs"], s["max_concurrent"], s["overlap"], s["enabled"]) == (
        "nightly", 3, "catch_up_once", 2, "queue", True)
    assert s["params"]["num_timesteps_shown"] == 4
    html = client.get("/schedules").get_data(as_text=True)
    assert "nightly" in html and "<code>0 2 * * *</code>" in html
    assert re.search(r"\d{4}-\d\d-\d\d 02:00 CES?T", html)  # the next run on Berlin's wall clock


@pytest.mark.parametrize("field, value, fragment", [
    ("cron", "0 2 * *", "must have 5 fields"),
    ("timezone", "Moon/Base", "unknown timezone"),
    ("params", "{not json", "must be a JSON object"),
    ("params", '{"num_timesteps_shown": 40}', "num_timesteps_shown: Input should be less than or equal to 16"),
    ("max_concurrent", "0", "greater than or equal to 1"),
])
def test_schedule_form_errors_are_shown_by_the_field_with_the_input_kept(client, field, value, fragment):
    resp = client.post("/schedules/new", data={**SCHEDULE_FORM, field: value})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    block = html[html.index(f'data-field="{field}"'):]
    block = block[:block.index("</div>")]
    assert fragment in unescape(block)
    assert unescape(value) in unescape(block)  # kept
    assert 'value="Europe/Berlin"' in html or field == "timezone"
    assert schedules_total(client) == 0


def test_schedule_this_job_prefills_the_form(client):
    job = submit(client, {"preset": "tiny", "max_steps": 12}, priority=4)
    assert "/schedules/new?from=" + job["id"] in client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    html = client.get(f"/schedules/new?from={job['id']}").get_data(as_text=True)
    assert '<option value="ddpm.train" selected>' in html
    params = json.loads(unescape(re.search(r'<textarea id="f-params"[^>]*>([^<]*)</textarea>', html).group(1)))
    assert params == job["params"]
    assert 'name="priority" min="0" max="9" step="1" value="4"' in html


def test_schedule_buttons_pause_resume_run_now_and_delete(client):
    client.post("/schedules/new", data=SCHEDULE_FORM)
    sid = client.get("/api/v1/schedules").get_json()["schedules"][0]["id"]
    client.post(f"/schedules/{sid}/pause")
    assert client.get(f"/api/v1/schedules/{sid}").get_json()["enabled"] is False
    assert "Resume" in client.get("/schedules").get_data(as_text=True)
    client.post(f"/schedules/{sid}/resume")
    assert client.get(f"/api/v1/schedules/{sid}").get_json()["next_run_at"] is not None
    resp = client.post(f"/schedules/{sid}/run-now")
    job_id = resp.headers["Location"].rsplit("/", 1)[1]
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["schedule_id"] == sid
    assert "from <a href=\"/schedules#s-" in client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert client.post(f"/schedules/{sid}/explode").status_code == 404
    client.post(f"/schedules/{sid}/delete")
    assert schedules_total(client) == 0
    assert client.post(f"/schedules/{sid}/pause").status_code == 404
