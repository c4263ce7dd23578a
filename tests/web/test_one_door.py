"""Every way a job is made goes through one door (shared/jobs.py `admit`), on Postgres and
Redis as deployed: the API, the submit form, a schedule's run-now and its tick, and a
retry meet the same hazards with the same refusal, naming the same field, and make
nothing. The submit rate limit is one budget across the paths a user triggers.

A hazard is a state of the world that turns a job template bad after it was accepted:
its model folder removed, its hub id taken off the allowlist, its upload or its job
reference gone, its kind switched off, its owner at the queued-jobs quota. Each path is
tried with the template once the hazard holds.
"""
from __future__ import annotations

import io
import shutil
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable

import pytest
from sqlalchemy import delete, func, select

from shared import schedules
from shared.broker import make_producer
from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import Job, JobStatus, Schedule, Upload, User, utcnow
from tests.conftest import signed_in
from tests.upload_files import png_bytes
from tests.web.test_pages import field_block


@pytest.fixture
def world(prod_settings, own_pg_url, tmp_path):
    settings = replace(prod_settings, database_url=own_pg_url, enable_noop=True, max_queued_per_user=50,
                       hub_models_allow="acme/*", rate_limit_submit="1000/minute")
    sessions = make_sessionmaker(make_engine(own_pg_url))
    with session_scope(sessions) as session:
        for model in (Job, Schedule, Upload):
            session.execute(delete(model))
    (settings.models_dir / "sd-here").mkdir(parents=True, exist_ok=True)
    return World(settings, sessions, f"door-{uuid.uuid4().hex[:8]}")


@dataclass
class World:
    settings: object
    sessions: object
    user: str

    def client(self, **changes):
        from web import create_app

        settings = replace(self.settings, **changes)
        return signed_in(create_app(settings).test_client(), settings, user=self.user, admin=False)

    def jobs(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(Job))

    def owner(self, session) -> User:
        return session.scalar(select(User).where(User.name == self.user))


@dataclass
class Hazard:
    name: str
    kind: str
    params: Callable[[World, object], dict]  # the template, given the world and a client
    apply: Callable[[World, dict], dict]  # makes the template bad; returns settings changes
    field: str  # what every refusal names
    fragment: str  # and what it says
    status: int = 400


def _upload(world, client) -> str:
    resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(png_bytes()), "cat.png")})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["ref"]


def _delete_upload(world, params) -> dict:
    with session_scope(world.sessions) as session:
        session.execute(delete(Upload).where(Upload.id == params["init_image"].removeprefix("upload:")))
    return {}


def _finished_job(world, client) -> str:
    resp = client.post("/api/v1/jobs", json={"kind": "noop", "params": {}})
    with session_scope(world.sessions) as session:
        session.get(Job, resp.get_json()["id"]).status = JobStatus.SUCCEEDED.value
    return "job:" + resp.get_json()["id"]


def _delete_job(world, params) -> dict:
    with session_scope(world.sessions) as session:
        session.execute(delete(Job).where(Job.id == params["model"].removeprefix("job:")))
    return {}


def _fill_quota(world, params) -> dict:
    with session_scope(world.sessions) as session:
        owner = world.owner(session)
        for _ in range(2):
            session.add(Job(kind="noop", params={}, queue="cpu", status="queued", owner_id=owner.id))
    return {"max_queued_per_user": 2}


def _remove_folder(world, params) -> dict:
    shutil.rmtree(world.settings.models_dir / "sd-here")
    return {}


SWEEP = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32}
IMG2IMG = {"prompts": ["a cat"], "model": "sd-here", "steps": 2, "width": 32, "height": 32}
HAZARDS = [
    Hazard("model-folder-removed", "sd.sweep", lambda w, c: {**SWEEP, "model": "sd-here"}, _remove_folder,
           "model", "not a folder under DIFFQUEUE_MODELS_DIR"),
    Hazard("hub-id-off-the-allowlist", "sd.sweep", lambda w, c: {**SWEEP, "model": "acme/sd"},
           lambda w, p: {"hub_models_allow": "google/*"}, "model", "is not allowed"),
    Hazard("upload-deleted", "sd.img2img", lambda w, c: {**IMG2IMG, "init_image": _upload(w, c)},
           _delete_upload, "init_image", "not found"),
    Hazard("job-reference-deleted", "ddpm.sample", lambda w, c: {"model": _finished_job(w, c)}, _delete_job,
           "model", "not found"),
    Hazard("kind-switched-off", "noop", lambda w, c: {}, lambda w, p: {"enable_noop": False}, "kind", "disabled"),
    Hazard("owner-at-the-quota", "noop", lambda w, c: {}, _fill_quota, "", "the limit is 2", status=429),
]


def _refusal(resp) -> tuple[int, dict, str]:
    body = resp.get_json(silent=True) or {}
    return resp.status_code, body.get("fields", {}), body.get("message", resp.get_data(as_text=True))


def _named(fields: dict, field: str) -> str | None:
    return next((v for k, v in fields.items() if k == field), None)


@pytest.mark.parametrize("hazard", HAZARDS, ids=[h.name for h in HAZARDS])
def test_every_way_of_making_a_job_meets_the_same_refusal(world, hazard):
    client = world.client()
    params = hazard.params(world, client)

    # Before the hazard, the template is good everywhere: a schedule takes it, and a job
    # made of it fails (on no worker: by hand) so that it can be retried later.
    resp = client.post("/api/v1/schedules", json={"name": hazard.name, "cron": "0 3 * * *", "kind": hazard.kind,
                                                  "params": params, "missed_runs": "catch_up_once"})
    assert resp.status_code == 201, resp.get_json()
    schedule_id = resp.get_json()["id"]
    resp = client.post("/api/v1/jobs", json={"kind": hazard.kind, "params": params})
    assert resp.status_code == 202, resp.get_json()
    failed_id = resp.get_json()["id"]
    with session_scope(world.sessions) as session:
        session.get(Job, failed_id).status = JobStatus.FAILED.value

    changes = hazard.apply(world, params)
    client = world.client(**changes)
    settings = replace(world.settings, **changes)
    before = world.jobs()

    answers = {
        "api": _refusal(client.post("/api/v1/jobs", json={"kind": hazard.kind, "params": params})),
        "run-now": _refusal(client.post(f"/api/v1/schedules/{schedule_id}/run-now")),
        "retry": _refusal(client.post(f"/api/v1/jobs/{failed_id}/retry")),
    }
    for path, (status, fields, message) in answers.items():
        assert status == hazard.status, (path, status, fields, message)
        prefix = "params." if path == "run-now" and hazard.field not in ("", "kind") else ""
        if hazard.field:
            assert hazard.fragment in (_named(fields, prefix + hazard.field) or ""), (path, fields)
        else:
            assert hazard.fragment in message, (path, message)

    # The form: the same refusal, shown by its field.
    form = {k: ("\n".join(v) if isinstance(v, list) else str(v)) for k, v in params.items()}
    page = client.post(f"/submit/{hazard.kind}", data=form)
    html = page.get_data(as_text=True)
    assert page.status_code == hazard.status, html[:300]
    if hazard.field and hazard.field != "kind":
        assert hazard.fragment in field_block(html, hazard.field)
    else:
        assert hazard.fragment in html

    # The tick: the occurrence is skipped, saying why.
    with session_scope(world.sessions) as session:
        session.get(Schedule, schedule_id).next_run_at = utcnow() - timedelta(seconds=1)
    assert schedules.tick(world.sessions, make_producer(settings), settings) == []
    with world.sessions() as session:
        reason = session.get(Schedule, schedule_id).last_skip_reason
    assert hazard.fragment in reason and (not hazard.field or hazard.field in reason), reason

    assert world.jobs() == before  # nothing made by any of them
    with world.sessions() as session:
        assert session.get(Job, failed_id).status == JobStatus.FAILED.value


def test_run_now_and_retry_draw_on_the_submit_rate_limit(world, redis_url):
    """One budget per user (DIFFQUEUE_RATE_LIMIT_SUBMIT) for every path that makes work:
    run-now cannot be used to go around it (600 x 202 in 20 s once)."""
    import redis

    redis.Redis.from_url(redis_url).delete(*redis.Redis.from_url(redis_url).keys("diffqueue*") or ["-"])
    client = world.client(rate_limit_submit="4/minute", ratelimit_storage_url=redis_url)
    schedule = client.post("/api/v1/schedules", json={"name": "burst", "cron": "0 3 * * *", "kind": "noop",
                                                      "params": {}}).get_json()
    codes = [client.post(f"/api/v1/schedules/{schedule['id']}/run-now").status_code for _ in range(3)]
    job = client.post("/api/v1/jobs", json={"kind": "noop", "params": {}})
    assert codes + [job.status_code] == [202, 202, 202, 202]
    refused = [client.post(f"/api/v1/schedules/{schedule['id']}/run-now"),
               client.post("/api/v1/jobs", json={"kind": "noop", "params": {}}),
               client.post(f"/api/v1/jobs/{job.get_json()['id']}/retry")]
    assert [r.status_code for r in refused] == [429, 429, 429]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert client.patch(f"/api/v1/schedules/{schedule['id']}", json={"enabled": False}).status_code == 200


def test_run_now_is_held_to_the_queued_jobs_quota(world):
    client = world.client(max_queued_per_user=3)
    schedule = client.post("/api/v1/schedules", json={"name": "flood", "cron": "0 3 * * *", "kind": "noop",
                                                      "params": {}}).get_json()
    codes = [client.post(f"/api/v1/schedules/{schedule['id']}/run-now").status_code for _ in range(5)]
    assert codes == [202, 202, 202, 429, 429]
    with world.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) == 3


def test_a_local_model_name_that_is_no_folder_is_refused_at_submit(world):
    client = world.client()
    resp = client.post("/api/v1/jobs", json={"kind": "sd.txt2img", "params": {"model": "tyni-sd", "prompts": ["a"]}})
    assert resp.status_code == 400
    assert "'tyni-sd' is not a folder under DIFFQUEUE_MODELS_DIR" in resp.get_json()["fields"]["model"]
    assert world.jobs() == 0
