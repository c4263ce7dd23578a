"""GET /api/v1/models: local pipeline folders and finished training jobs' models."""
from __future__ import annotations

import json
from dataclasses import replace

from shared import jobs
from shared.db import make_engine, make_sessionmaker
from shared.model_catalog import list_job_models
from shared.models import JobStatus


def write_model(root, name: str, pipeline: str = "StableDiffusionPipeline") -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}))


def finished_job(client, settings, artifacts: list[str], status=JobStatus.SUCCEEDED, kind="ddpm.train",
                 params=None) -> str:
    """Submit a job and finish it as a worker would, with artifact rows named `artifacts`."""
    resp = client.post("/api/v1/jobs", json={"kind": kind, "params": params or {}})
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            token = jobs.claim(session, job_id, "test-worker", 60)
            for name in artifacts:
                assert jobs.record_artifact(session, job_id, token, name, "file", "application/octet-stream", 1, "0" * 64)
            assert jobs.finish(session, job_id, token, status, result={})
    finally:
        engine.dispose()
    return job_id


def test_models_lists_local_folders_and_training_jobs(client, sqlite_settings):
    root = sqlite_settings.models_dir
    write_model(root, "tiny-ddpm", "DDPMPipeline")
    write_model(root, "acme/sd-mini")
    write_model(root, "acme/.cache")  # a name no spec accepts
    write_model(root, ".hidden")
    (root / "not-a-model").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text("{not json")
    (root / "README.txt").write_text("a file, not a folder")

    older = finished_job(client, sqlite_settings, ["model/model_index.json", "model/unet/config.json", "loss.csv"])
    newer = finished_job(client, sqlite_settings, ["model/model_index.json"], params={"preset": "digits"})
    finished_job(client, sqlite_settings, ["loss.csv"])  # no model/
    finished_job(client, sqlite_settings, ["model/model_index.json"], status=JobStatus.FAILED)
    finished_job(client, sqlite_settings, ["model/x"], kind="ddpm.sample", params={"model": "tiny-ddpm"})

    resp = client.get("/api/v1/models")
    assert resp.status_code == 200
    models = resp.get_json()["models"]
    assert models[:2] == [
        {"name": "acme/sd-mini", "ref": "acme/sd-mini", "pipeline": "StableDiffusionPipeline", "source": "local"},
        {"name": "tiny-ddpm", "ref": "tiny-ddpm", "pipeline": "DDPMPipeline", "source": "local"},
    ]
    from_jobs = models[2:]
    assert [m["job_id"] for m in from_jobs] == [newer, older]  # newest first
    assert from_jobs[0]["ref"] == f"job:{newer}" and from_jobs[0]["name"] == f"ddpm.train {newer[:8]} (digits preset)"
    assert {(m["source"], m["pipeline"]) for m in from_jobs} == {("job", "DDPMPipeline")}
    job = client.get(f"/api/v1/jobs/{newer}").get_json()
    assert from_jobs[0]["created_at"] == job["created_at"]

    # Every listed ref is one a job can name.
    for m in models:
        resp = client.post("/api/v1/jobs", json={"kind": "ddpm.sample", "params": {"model": m["ref"]}})
        assert resp.status_code == 202, (m, resp.get_json())


def test_models_without_a_models_dir_lists_job_models(sqlite_settings):
    from web import create_app

    for models_dir in (None, sqlite_settings.models_dir / "missing"):
        client = create_app(replace(sqlite_settings, models_dir=models_dir)).test_client()
        assert client.get("/api/v1/models").get_json() == {"models": []}
    job_id = finished_job(client, sqlite_settings, ["model/model_index.json"])
    assert [m["ref"] for m in client.get("/api/v1/models").get_json()["models"]] == [f"job:{job_id}"]


def test_job_models_limit(client, sqlite_settings):
    ids = [finished_job(client, sqlite_settings, ["model/model_index.json"]) for _ in range(3)]
    engine = make_engine(sqlite_settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert [m["job_id"] for m in list_job_models(session, limit=2)] == ids[::-1][:2]
    finally:
        engine.dispose()
