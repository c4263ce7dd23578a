"""The Flask app through its test client: the JSON API.

SQLite and the SQLite broker with real publishes; no worker runs, so jobs stay
queued unless a test claims them itself.
"""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import replace

import pytest
import requests

from shared import jobs
from shared.db import make_engine, make_sessionmaker
from shared.storage import job_key, make_storage


def submit(client, params=None, kind="ddpm.train", **extra) -> dict:
    resp = client.post("/api/v1/jobs", json={"kind": kind, "params": params or {}, **extra})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def total_jobs(client) -> int:
    return client.get("/api/v1/jobs").get_json()["total"]


# ------------------------------------------------------------------ POST /jobs
def test_create_job(client):
    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.train", "params": {"max_steps": 5}, "priority": 4})
    assert resp.status_code == 202
    body = resp.get_json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert body["status"] == "queued"
    assert body["kind"] == "ddpm.train" and body["priority"] == 4 and body["queue"] == "gpu"
    assert body["params"]["max_steps"] == 5
    assert body["params"]["image_size"] == 16 and body["params"]["preset"] == "tiny"  # defaults filled
    assert body["artifacts"] == []
    assert resp.headers["Location"].endswith(f"/api/v1/jobs/{body['id']}")
    got = client.get(resp.headers["Location"])
    assert got.status_code == 200 and got.get_json()["id"] == body["id"]


@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ({"max_steps": 0}, "max_steps", "greater than or equal to 1"),
        ({"batch_size": 4097}, "batch_size", "less than or equal to 4096"),
        ({"bogus": 1}, "bogus", "not permitted"),
        ({"beta_start": 0.05, "beta_end": 0.01}, "beta_end", "greater than beta_start"),
    ],
)
def test_create_job_invalid_params(client, params, field, fragment):
    before = total_jobs(client)
    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.train", "params": params})
    assert resp.status_code == 400
    body = resp.get_json()
    assert set(body) == {"error", "message", "fields"}
    assert body["error"] == "invalid_params"
    assert field in body["fields"] and fragment in body["fields"][field]
    assert field in body["message"]
    assert total_jobs(client) == before


def test_create_job_nan_in_raw_json(client):
    before = total_jobs(client)
    resp = client.post(
        "/api/v1/jobs",
        data='{"kind":"ddpm.train","params":{"learning_rate":NaN}}',
        content_type="application/json",
    )
    assert resp.status_code == 400
    body = resp.get_json()
    assert "learning_rate" in body["fields"]
    assert total_jobs(client) == before


def test_create_job_unknown_kind(client):
    resp = client.post("/api/v1/jobs", json={"kind": "sd.render", "params": {}})
    assert resp.status_code == 400
    assert "kind" in resp.get_json()["fields"]


@pytest.mark.parametrize("priority", [10, -1, "5", 1.5, True])
def test_create_job_bad_priority(client, priority):
    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.train", "params": {}, "priority": priority})
    assert resp.status_code == 400
    assert "priority" in resp.get_json()["fields"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": "not json", "content_type": "application/json"},
        {"data": "kind=ddpm.train", "content_type": "application/x-www-form-urlencoded"},
        {"json": ["ddpm.train"]},
    ],
)
def test_create_job_needs_a_json_object(client, kwargs):
    resp = client.post("/api/v1/jobs", **kwargs)
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["error"] and body["message"]
    assert total_jobs(client) == 0


def test_create_job_unknown_top_level_field(client):
    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.train", "params": {}, "prio": 1})
    assert resp.status_code == 400
    assert "prio" in resp.get_json()["fields"]


# ------------------------------------------------------------------ GET /jobs
def test_list_jobs_filters_and_paginates(client):
    (client.application.extensions["diffqueue"].settings.models_dir / "my-model").mkdir(parents=True)
    train = [submit(client, {"max_steps": i + 1})["id"] for i in range(3)]
    sample = submit(client, {"model": "my-model"}, kind="ddpm.sample")["id"]
    cancelled = train[0]
    assert client.post(f"/api/v1/jobs/{cancelled}/cancel").status_code == 202

    body = client.get("/api/v1/jobs").get_json()
    assert body["total"] == 4 and len(body["jobs"]) == 4
    assert {j["id"] for j in body["jobs"]} == set(train) | {sample}

    body = client.get("/api/v1/jobs?kind=ddpm.sample").get_json()
    assert [j["id"] for j in body["jobs"]] == [sample] and body["total"] == 1

    body = client.get("/api/v1/jobs?status=cancelled").get_json()
    assert [j["id"] for j in body["jobs"]] == [cancelled]

    body = client.get("/api/v1/jobs?status=queued&kind=ddpm.train").get_json()
    assert {j["id"] for j in body["jobs"]} == set(train[1:]) and body["total"] == 2

    pages = [client.get(f"/api/v1/jobs?limit=3&offset={o}").get_json() for o in (0, 3)]
    assert [len(p["jobs"]) for p in pages] == [3, 1]
    assert all(p["total"] == 4 for p in pages)
    assert (pages[0]["limit"], pages[1]["offset"]) == (3, 3)
    assert {j["id"] for p in pages for j in p["jobs"]} == set(train) | {sample}


@pytest.mark.parametrize(
    "query, field",
    [("limit=0", "limit"), ("limit=201", "limit"), ("limit=x", "limit"), ("offset=-1", "offset"),
     ("status=done", "status"), ("kind=nope", "kind")],
)
def test_list_jobs_bad_query(client, query, field):
    resp = client.get(f"/api/v1/jobs?{query}")
    assert resp.status_code == 400
    assert field in resp.get_json()["fields"]


def test_get_missing_job_is_404_json(client):
    resp = client.get("/api/v1/jobs/" + "0" * 32)
    assert resp.status_code == 404
    body = resp.get_json()
    assert body["error"] == "not_found" and "0" * 32 in body["message"]
    assert client.post("/api/v1/jobs/" + "0" * 32 + "/cancel").status_code == 404


def test_unknown_api_route_is_json(client):
    resp = client.get("/api/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.get_json()["error"] == "not_found"


# ------------------------------------------------------------------ cancel / retry
def test_cancel_and_retry(client):
    job_id = submit(client)["id"]

    resp = client.post(f"/api/v1/jobs/{job_id}/retry")  # queued: nothing to retry
    assert resp.status_code == 409
    assert resp.get_json()["error"] == "conflict"

    resp = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    assert resp.get_json()["status"] == "cancelled"
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "cancelled"

    resp = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 409

    resp = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "queued" and body["cancel_requested"] is False

    resp = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert resp.status_code == 409


# ------------------------------------------------------------------ kinds / health
def test_kinds(client):
    kinds = {k["kind"]: k for k in client.get("/api/v1/kinds").get_json()["kinds"]}
    assert set(kinds) == {"ddpm.train", "ddpm.sample", "ddpm.schedule_plot", "sd.txt2img", "sd.img2img", "sd.sweep"}
    assert "max_steps" in kinds["ddpm.train"]["schema"]["properties"]
    assert "model" in kinds["ddpm.sample"]["schema"]["properties"]
    assert set(kinds["ddpm.train"]["presets"]) == {"tiny", "digits", "fashion-32", "book-64", "guide-128"}


@pytest.mark.parametrize("path", ["/api/v1/healthz", "/healthz"])
def test_healthz(client, path):
    resp = client.get(path)
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["ok"] is True
    assert {name: c["ok"] for name, c in body["checks"].items()} == {"database": True, "broker": True, "storage": True}


def test_healthz_reports_a_down_broker(sqlite_settings):
    from web import create_app

    app = create_app(replace(sqlite_settings, broker_url="redis://127.0.0.1:1/0"))
    resp = app.test_client().get("/api/v1/healthz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["ok"] is False
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"] is True


# ------------------------------------------------------------------ artifacts
def add_artifacts(settings, job_id: str, files: dict[str, tuple[bytes, str]]) -> None:
    """What a worker does: claim the job, write the bytes, record the rows."""
    storage = make_storage(settings)
    engine = make_engine(settings.database_url)
    factory = make_sessionmaker(engine)
    try:
        with factory() as session:
            token = jobs.claim(session, job_id, "test-worker", 60)
            assert token == 1
            for name, (data, content_type) in files.items():
                storage.put_bytes(job_key(job_id, name), data, content_type)
                assert jobs.record_artifact(session, job_id, token, name, "file", content_type, len(data),
                                            hashlib.sha256(data).hexdigest())
    finally:
        engine.dispose()


FILES = {
    "samples.png": (b"\x89PNG\r\n\x1a\n not really a png", "image/png"),
    "model/config.json": (b'{"sample_size": 16}', "application/json"),
    "model/unet/weights.safetensors": (bytes(range(256)) * 4, "application/octet-stream"),
}


def test_artifact_streams_the_bytes(client, sqlite_settings):
    job_id = submit(client)["id"]
    add_artifacts(sqlite_settings, job_id, FILES)

    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["status"] == "running" and job["attempt"] == 1
    by_name = {a["name"]: a for a in job["artifacts"]}
    assert set(by_name) == set(FILES)
    for name, (data, content_type) in FILES.items():
        a = by_name[name]
        # A path: no DIFFQUEUE_PUBLIC_URL here, and never the request's Host.
        assert a["url"] == f"/api/v1/jobs/{job_id}/artifacts/{name}"
        assert a["size"] == len(data) and a["sha256"] == hashlib.sha256(data).hexdigest()
        resp = client.get(a["url"])
        assert resp.status_code == 200
        assert resp.data == data
        assert resp.mimetype == content_type
        assert resp.headers["Content-Length"] == str(len(data))

    assert client.get(f"/api/v1/jobs/{job_id}/artifacts/missing.png").status_code == 404


def test_archive(client, sqlite_settings):
    job_id = submit(client)["id"]
    add_artifacts(sqlite_settings, job_id, FILES)

    resp = client.get(f"/api/v1/jobs/{job_id}/archive?prefix=model/")
    assert resp.status_code == 200
    assert resp.mimetype == "application/zip"
    assert f"{job_id}-model.zip" in resp.headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(resp.data)) as zf:
        assert sorted(zf.namelist()) == ["model/config.json", "model/unet/weights.safetensors"]
        for name in zf.namelist():
            assert zf.read(name) == FILES[name][0]

    with zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/jobs/{job_id}/archive").data)) as zf:
        assert sorted(zf.namelist()) == sorted(FILES)

    resp = client.get(f"/api/v1/jobs/{job_id}/archive?prefix=nothing/")
    assert resp.status_code == 404


def test_s3_artifact_redirects_to_a_presigned_url(prod_settings, prod_client):
    client = prod_client
    job_id = submit(client)["id"]
    data, content_type = FILES["samples.png"]
    add_artifacts(prod_settings, job_id, {"samples.png": (data, content_type)})

    resp = client.get(f"/api/v1/jobs/{job_id}/artifacts/samples.png")
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert location.startswith(prod_settings.s3_endpoint_url)
    assert f"X-Amz-Expires={prod_settings.presign_expiry_s}" in location
    fetched = requests.get(location, timeout=10)
    assert fetched.status_code == 200
    assert fetched.content == data
    assert fetched.headers["Content-Type"] == content_type

    with zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/jobs/{job_id}/archive").data)) as zf:
        assert zf.read("samples.png") == data
