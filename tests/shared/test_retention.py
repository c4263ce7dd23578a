"""Retention on a controllable clock, with local-folder storage on SQLite and with S3
(moto's server) on Postgres: old finished jobs go with their objects, artifact rows and
webhook deliveries; pinned, young and unfinished jobs stay, and so does a job that a
queued job or a schedule uses as its model; a failed object delete keeps that row and
not the others; old uploads go once nothing refers to them. And beat runs it once per
interval."""
from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import delete, func, select

from shared import retention
from shared.db import make_engine, make_sessionmaker, session_scope, upgrade
from shared.models import Artifact, Job, Schedule, Upload, WebhookDelivery, utcnow
from shared.storage import job_key, make_storage, upload_key
from tests.conftest import fresh_pg_database

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=utcnow().tzinfo)
FILES = ("model/diffusion_pytorch_model.safetensors", "loss.csv", "samples/step-000010.png")


@pytest.fixture(scope="module")
def own_pg_url():
    """A database of this module's own: cleanup deletes any old job, and its queued rows
    must not reach the reaper of another test's beat. Each test empties it first."""
    with fresh_pg_database("diffqueue_retention") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["local", "s3"])
def env(request, sqlite_settings):
    if request.param == "local":
        settings = sqlite_settings
    else:
        settings = replace(request.getfixturevalue("prod_settings"), database_url=request.getfixturevalue("own_pg_url"))
    settings = replace(settings, retention_days=30)
    engine = make_engine(settings.database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        for model in (Job, Upload, Schedule):  # artifacts and deliveries cascade
            session.execute(delete(model))
    yield settings, make_sessionmaker(engine), make_storage(settings)
    engine.dispose()


def add_job(env, status="succeeded", age_days=40.0, pinned=False, params=None, kind="ddpm.train", now=NOW) -> str:
    """A job row as a worker leaves it: artifacts in storage and as rows, a webhook delivery."""
    _, sessions, storage = env
    finished = status in ("succeeded", "failed", "cancelled")
    with session_scope(sessions) as session:
        job = Job(kind=kind, params=params or {}, queue="cpu", status=status, pinned=pinned,
                  created_at=now - timedelta(days=age_days + 1),
                  started_at=now - timedelta(days=age_days, minutes=5) if status != "queued" else None,
                  finished_at=now - timedelta(days=age_days) if finished else None)
        session.add(job)
        session.flush()
        for name in FILES:
            storage.put_bytes(job_key(job.id, name), name.encode(), "application/octet-stream")
            session.add(Artifact(job_id=job.id, name=name, kind="file", content_type="application/octet-stream",
                                 size=len(name), sha256="0" * 64))
        session.add(WebhookDelivery(job_id=job.id, event="completed", payload={}, state="delivered"))
    return job.id


def add_schedule(env, params: dict, enabled=True) -> str:
    with session_scope(env[1]) as session:
        schedule = Schedule(name="nightly", cron="0 3 * * *", kind="ddpm.sample", params=params, enabled=enabled)
        session.add(schedule)
    return schedule.id


def add_upload(env, age_days: float) -> str:
    _, sessions, storage = env
    with session_scope(sessions) as session:
        upload = Upload(filename="digits.zip", kind="dataset", content_type="application/zip", size=3, sha256="0" * 64,
                        created_at=NOW - timedelta(days=age_days))
        session.add(upload)
    storage.put_bytes(upload_key(upload.id), b"zip", "application/zip")
    return upload.id


def rows(env, job_id: str) -> tuple[int, int, int]:
    """(job rows, artifact rows, webhook delivery rows) for the job."""
    with env[1]() as session:
        return tuple(session.scalar(select(func.count()).select_from(model).where(col == job_id)) for model, col in
                     ((Job, Job.id), (Artifact, Artifact.job_id), (WebhookDelivery, WebhookDelivery.job_id)))


def objects(env, job_id: str) -> list[str]:
    return env[2].list(f"jobs/{job_id}")


def gone(env, job_id: str) -> bool:
    return rows(env, job_id) == (0, 0, 0) and objects(env, job_id) == []


def kept(env, job_id: str) -> bool:
    return rows(env, job_id) == (1, len(FILES), 1) and objects(env, job_id) == sorted(job_key(job_id, n) for n in FILES)


def cleanup(env, now=NOW, storage=None, budget_s=None, **settings_changes) -> retention.Cleanup:
    settings, sessions, env_storage = env
    return retention.cleanup(sessions, storage or env_storage, replace(settings, **settings_changes), now=now,
                             budget_s=budget_s)


def test_old_finished_jobs_go_with_objects_and_rows_and_the_rest_stay(env):
    old = {status: add_job(env, status) for status in ("succeeded", "failed", "cancelled")}
    stay = {
        "pinned": add_job(env, pinned=True),
        "young": add_job(env, age_days=29.9),
        "running": add_job(env, "running"),
        "queued": add_job(env, "queued"),
    }
    out = cleanup(env)
    assert sorted(out.deleted_jobs) == sorted(old.values())
    assert (out.failed, out.in_use, out.more) == ({}, {}, False)
    for job_id in old.values():
        assert gone(env, job_id)
    for what, job_id in stay.items():
        assert kept(env, job_id), what
    # The young one goes once it is past 30 days; nothing else changes.
    assert cleanup(env, now=NOW + timedelta(days=0.2)).deleted_jobs == [stay["young"]]
    assert kept(env, stay["pinned"]) and kept(env, stay["running"])


def test_retention_zero_keeps_everything(env):
    job_id = add_job(env, age_days=3650)
    assert cleanup(env, retention_days=0) == retention.Cleanup()
    assert kept(env, job_id)


def test_a_model_in_use_by_a_queued_job_or_a_schedule_is_kept_and_reported(env):
    by_queued, by_running, by_paused, by_finished, mentioned = (add_job(env) for _ in range(5))
    sampler = add_job(env, "queued", kind="ddpm.sample", params={"model": f"job:{by_queued}"})
    img2img = add_job(env, "running", kind="sd.img2img",
                      params={"init_image": f"job:{by_running}/images/0000.png",
                              "prompts": [f"like job:{mentioned} but blue"]})  # text, not a reference
    schedule = add_schedule(env, {"model": f"job:{by_paused}"}, enabled=False)  # paused may be resumed
    add_job(env, "succeeded", age_days=1, kind="ddpm.sample", params={"model": f"job:{by_finished}"})

    out = cleanup(env)
    assert out.in_use == {by_queued: [f"job:{sampler}"], by_running: [f"job:{img2img}"],
                          by_paused: [f"schedule:{schedule}"]}
    assert sorted(out.deleted_jobs) == sorted([by_finished, mentioned])  # a finished user holds nothing
    for job_id in (by_queued, by_running, by_paused):
        assert kept(env, job_id)

    # Once the sampling job has finished, its model goes at the next run.
    with session_scope(env[1]) as session:
        session.get(Job, sampler).status = "succeeded"
        session.get(Job, sampler).finished_at = NOW
    out = cleanup(env)
    assert out.deleted_jobs == [by_queued] and set(out.in_use) == {by_running, by_paused}


class FailingDeletes:
    """The real storage, except that deleting one job's objects raises and deleting
    another's quietly leaves them (as S3's DeleteObjects does, reporting per-key errors
    in a 200 answer)."""

    def __init__(self, storage, raises: str, ignores: str):
        self.storage, self.raises, self.ignores = storage, raises, ignores

    def delete_prefix(self, prefix: str) -> None:
        if prefix == f"jobs/{self.raises}":
            raise OSError("storage unavailable")
        if prefix != f"jobs/{self.ignores}":
            self.storage.delete_prefix(prefix)

    def __getattr__(self, name):
        return getattr(self.storage, name)


def test_a_failed_object_delete_keeps_that_row_and_the_others_go(env, caplog):
    raises, ignores, fine = add_job(env, age_days=50), add_job(env, age_days=45), add_job(env, age_days=40)
    with caplog.at_level(logging.ERROR, logger="shared.retention"):
        out = cleanup(env, storage=FailingDeletes(env[2], raises, ignores))
    assert out.deleted_jobs == [fine] and gone(env, fine)
    assert out.failed == {
        f"job:{raises}": "OSError: storage unavailable",
        f"job:{ignores}": f"OSError: 3 objects still under jobs/{ignores} after deleting it, "
                          f"e.g. {job_key(ignores, FILES[1])}",
    }
    assert kept(env, raises) and kept(env, ignores)  # listed still, so nothing is left behind unseen
    assert f"deleting the objects of job {raises} failed; its row is kept" in caplog.text
    # With the storage back, the next run deletes them.
    assert sorted(cleanup(env).deleted_jobs) == sorted([raises, ignores])


def test_old_uploads_go_once_no_job_or_schedule_names_them(env):
    unused, young = add_upload(env, 40), add_upload(env, 10)
    by_young_job, by_old_job, by_schedule = add_upload(env, 40), add_upload(env, 40), add_upload(env, 40)
    add_job(env, age_days=1, params={"dataset": f"upload:{by_young_job}"})  # may be retried: keep its data
    old_job = add_job(env, params={"dataset": f"upload:{by_old_job}"})
    add_schedule(env, {"init_image": f"upload:{by_schedule}"})

    out = cleanup(env)
    assert out.deleted_jobs == [old_job]
    assert sorted(out.deleted_uploads) == sorted([unused, by_old_job])  # its job went first, in the same run
    storage = env[2]
    with env[1]() as session:
        for upload_id in (unused, by_old_job):
            assert session.get(Upload, upload_id) is None and not storage.exists(upload_key(upload_id))
        for upload_id in (young, by_young_job, by_schedule):
            assert session.get(Upload, upload_id) is not None and storage.exists(upload_key(upload_id))


def test_a_run_stops_at_its_budget_and_the_next_goes_on(env):
    job_id = add_job(env)
    assert cleanup(env, budget_s=0.0) == retention.Cleanup(more=True)
    assert kept(env, job_id)
    assert cleanup(env, budget_s=60.0).deleted_jobs == [job_id]


def test_expires_at():
    job = Job(status="succeeded", finished_at=NOW, pinned=False)
    assert retention.expires_at(job, 30) == NOW + timedelta(days=30)
    assert retention.expires_at(job, 0.5) == NOW + timedelta(hours=12)
    assert retention.expires_at(job, 0) is None
    assert retention.expires_at(Job(status="succeeded", finished_at=NOW, pinned=True), 30) is None
    assert retention.expires_at(Job(status="running", finished_at=None, pinned=False), 30) is None


def test_beat_runs_retention_once_per_interval(sqlite_settings):
    from shared.beat import ScheduleTicker
    from shared.broker import make_producer

    settings = replace(sqlite_settings, retention_days=30, retention_interval_s=3600)
    app = make_producer(settings)
    app.conf.diffqueue_settings = settings
    ticker = ScheduleTicker(app)
    try:
        env = (settings, ticker.sessions, ticker.storage)
        first = add_job(env, now=utcnow())  # beat goes by the real clock
        ticker.tick()
        assert gone(env, first)
        second = add_job(env, now=utcnow())
        ticker.tick()
        assert kept(env, second)  # within the interval: not yet
        ticker.retention_due = 0.0  # the interval has passed
        ticker.tick()
        assert gone(env, second)
    finally:
        ticker.close()  # its webhook senders too
