"""Stable Diffusion jobs through the API and the forms: params checked at the edge,
upload references checked at submit time, and the generated forms."""
from __future__ import annotations

import io
import re
from html import unescape

import pytest

from shared.specs import DEFAULT_GUIDANCE_SCALES
from tests.upload_files import png_bytes

MISSING_UPLOAD = "upload:" + "f" * 32


def total_jobs(client) -> int:
    return client.get("/api/v1/jobs").get_json()["total"]


def upload(client, data: bytes, filename: str) -> str:
    resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(data), filename)})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["ref"]


def post_job(client, kind: str, params: dict):
    return client.post("/api/v1/jobs", json={"kind": kind, "params": params})


@pytest.mark.parametrize(
    "kind, params, field, fragment",
    [
        ("sd.txt2img", {"prompts": ["a rose"], "steps": 501}, "steps", "less than or equal to 500"),
        ("sd.txt2img", {"prompts": ["a rose"], "width": 500}, "width", "multiple of 8"),
        ("sd.txt2img", {"prompts": ["a rose"], "scheduler": "lms"}, "scheduler", "'dpm++'"),
        ("sd.txt2img", {}, "prompts", "give one of prompts or prompts_upload"),
        ("sd.img2img", {"prompts": ["a rose"], "init_image": MISSING_UPLOAD, "strength": 0},
         "strength", "greater than 0"),
        ("sd.sweep", {"prompt": "a rose", "seeds": list(range(8))}, "guidance_scales", "72 cells, more than 64"),
    ],
)
def test_bad_sd_job_is_a_400_naming_the_field(client, kind, params, field, fragment):
    resp = post_job(client, kind, params)
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["error"] == "invalid_params"
    assert field in body["fields"] and fragment in body["fields"][field], body
    assert field in body["message"]
    assert total_jobs(client) == 0


def test_nan_in_guidance_scales_raw_json(client):
    resp = client.post("/api/v1/jobs", data='{"kind": "sd.sweep", "params": {"prompt": "a", '
                       '"guidance_scales": [1.0, NaN]}}', content_type="application/json")
    assert resp.status_code == 400
    assert "guidance_scales.1" in resp.get_json()["fields"]
    assert total_jobs(client) == 0


def test_unknown_upload_refs_are_refused(client):
    resp = post_job(client, "sd.txt2img", {"prompts_upload": MISSING_UPLOAD})
    assert resp.status_code == 400
    assert resp.get_json()["fields"] == {"prompts_upload": f"{MISSING_UPLOAD} not found"}

    resp = post_job(client, "sd.img2img", {"prompts": ["a rose"], "init_image": MISSING_UPLOAD})
    assert resp.status_code == 400
    assert resp.get_json()["fields"] == {"init_image": f"{MISSING_UPLOAD} not found"}
    assert total_jobs(client) == 0


def test_upload_refs_of_the_wrong_kind_are_refused(client):
    image = upload(client, png_bytes(32, 32), "rose.png")
    prompts = upload(client, b"a rose\na tulip\n", "prompts.txt")

    resp = post_job(client, "sd.txt2img", {"prompts_upload": image})
    assert resp.status_code == 400
    assert resp.get_json()["fields"]["prompts_upload"] == f"{image} is an image upload, expected a prompts upload"
    resp = post_job(client, "sd.img2img", {"prompts": ["a rose"], "init_image": prompts})
    assert resp.status_code == 400
    assert resp.get_json()["fields"]["init_image"] == f"{prompts} is a prompts upload, expected an image upload"
    assert total_jobs(client) == 0

    resp = post_job(client, "sd.img2img", {"prompts_upload": prompts, "init_image": image})
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["queue"] == "gpu" and body["params"]["guidance_scale"] == 6.0 and body["params"]["seed"] == 193


def test_job_artifact_init_image_must_name_a_job(client):
    # A `job:<id>/<name>` reference must name a job here (the artifact is resolved by the worker).
    missing = "job:" + "0123456789abcdef" * 2 + "/images/0000-00.png"
    resp = post_job(client, "sd.img2img", {"prompts": ["a rose"], "init_image": missing})
    assert resp.status_code == 400
    assert resp.get_json()["fields"] == {"init_image": "job:" + "0123456789abcdef" * 2 + " not found"}

    source = post_job(client, "sd.txt2img", {"prompts": ["a rose"]}).get_json()["id"]
    ref = f"job:{source}/images/0000-00.png"
    resp = post_job(client, "sd.img2img", {"prompts": ["a rose"], "init_image": ref})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["params"]["init_image"] == ref


def test_sd_job_defaults_are_filled(client):
    resp = post_job(client, "sd.txt2img", {"prompts": ["a rose"], "preset": "article"})
    assert resp.status_code == 202
    params = resp.get_json()["params"]
    assert (params["steps"], params["guidance_scale"], params["seed"], params["scheduler"]) == (64, 9.0, 193, "pndm")
    assert params["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and params["torch_dtype"] == "auto"


# ------------------------------------------------------------------ forms
@pytest.mark.parametrize("kind", ["sd.txt2img", "sd.img2img", "sd.sweep"])
def test_sd_submit_pages_render(client, kind):
    resp = client.get(f"/submit/{kind}")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert 'name="model"' in html and 'name="steps"' in html and 'name="scheduler"' in html


def test_sd_form_takes_prompts_one_a_line(client):
    html = client.get("/submit/sd.txt2img").get_data(as_text=True)
    assert '<textarea id="f-prompts" name="prompts"' in html
    assert html.index('id="f-preset"') < html.index('id="f-model"')  # the preset comes first

    resp = client.post("/submit/sd.txt2img", data={
        "preset": "loop", "prompts": "a watercolor rose\r\n\r\n a tulip, in oil \n", "negative_prompt": "blurry",
    })
    assert resp.status_code == 302, resp.get_data(as_text=True)
    job_id = resp.headers["Location"].rsplit("/", 1)[1]
    params = client.get(f"/api/v1/jobs/{job_id}").get_json()["params"]
    assert params["prompts"] == ["a watercolor rose", "a tulip, in oil"]
    assert params["negative_prompt"] == "blurry"  # one line: one negative prompt for all
    assert params["steps"] == 30 and params["seed"] == 42

    resp = client.post("/submit/sd.txt2img", data={"prompts": "a\nb", "negative_prompt": "x\ny\nz"})
    assert resp.status_code == 400
    assert "has 3 entries and prompts has 2" in resp.get_data(as_text=True)


def test_sd_sweep_form_sent_back_unchanged_is_the_default(client):
    html = client.get("/submit/sd.sweep").get_data(as_text=True)
    shown = re.search(r'name="guidance_scales"[^>]*\svalue="([^"]*)"', html).group(1)
    resp = client.post("/submit/sd.sweep", data={"prompt": "a rose", "guidance_scales": unescape(shown),
                                                 "seeds": "193, 7"})
    assert resp.status_code == 302, resp.get_data(as_text=True)
    job_id = resp.headers["Location"].rsplit("/", 1)[1]
    params = client.get(f"/api/v1/jobs/{job_id}").get_json()["params"]
    assert params["guidance_scales"] == DEFAULT_GUIDANCE_SCALES and params["seeds"] == [193, 7]
