"""The job lifecycle in shared.jobs on SQLite and PostgreSQL: claim, fencing tokens,
finish, progress, cancel, retry, artifacts, ETA; and submit/publish with a real broker."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from shared import jobs
from shared.broker import make_producer
from shared.db import make_engine, make_sessionmaker
from shared.errors import InvalidTransition, JobNotFound
from shared.models import Artifact, Job, JobStatus, utcnow


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, sqlite_settings):
    if request.param == "sqlite":
        return sqlite_settings
    return replace(sqlite_settings, database_url=request.getfixturevalue("pg_url"))


@pytest.fixture
def factory(settings):
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def insert_job(factory, kind: str = "ddpm.train", **values) -> str:
    with factory() as session:
        job = Job(kind=kind, params={"max_steps": 3}, queue="gpu", status=JobStatus.QUEUED.value, **values)
        session.add(job)
        session.commit()
        return job.id


def load(factory, job_id: str) -> Job:
    with factory() as session:
        return session.get(Job, job_id)


def claimed(factory, worker: str = "w1") -> tuple[str, int]:
    job_id = insert_job(factory)
    with factory() as session:
        token = jobs.claim(session, job_id, worker, 60)
    assert token == 1
    return job_id, token


# ------------------------------------------------------------------ claim
def test_claim_once(factory):
    job_id = insert_job(factory)
    with factory() as session:
        assert jobs.claim(session, job_id, "w1", 60) == 1
        assert jobs.claim(session, job_id, "w2", 60) is None
    job = load(factory, job_id)
    assert job.status == "running"
    assert job.attempt == 1
    assert job.worker == "w1"
    assert job.started_at is not None and job.started_at.tzinfo is not None
    assert job.progress_started_at is not None


def test_expired_lease_can_be_claimed_again(factory):
    """A redelivered message takes over a running job only once its lease expired;
    the old execution's token then writes nothing, and renewals keep a lease live."""
    job_id = insert_job(factory)
    with factory() as session:
        assert jobs.claim(session, job_id, "w1", 0.2) == 1
        assert jobs.renew_lease(session, job_id, 1, 0.2)
        assert jobs.claim(session, job_id, "w2", 60) is None  # live lease: a duplicate
    time.sleep(0.3)
    with factory() as session:
        assert jobs.claim(session, job_id, "w2", 60) == 2
        assert not jobs.renew_lease(session, job_id, 1, 60)
        assert not jobs.report_progress(session, job_id, 1, 1, 10, "stale")
        assert jobs.finish(session, job_id, 2, JobStatus.SUCCEEDED)
    job = load(factory, job_id)
    assert (job.worker, job.attempt, job.status, job.lease_expires_at) == ("w2", 2, "succeeded", None)


def test_claim_unknown_job(factory):
    with factory() as session:
        assert jobs.claim(session, "0" * 32, "w1", 60) is None


def test_claim_race_has_one_winner(factory):
    job_id = insert_job(factory)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def racer(name: str):
        with factory() as session:
            barrier.wait()
            try:
                results[name] = jobs.claim(session, job_id, name, 60)
            except Exception as exc:  # surfaced below: a loser must get None, not an error
                results[name] = exc

    threads = [threading.Thread(target=racer, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results.values(), key=repr) == [1, None], results
    winner = next(name for name, token in results.items() if token == 1)
    job = load(factory, job_id)
    assert job.status == "running" and job.attempt == 1 and job.worker == winner


# ------------------------------------------------------------------ finish / progress
def test_finish_with_stale_token_changes_nothing(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.finish(session, job_id, token + 1, JobStatus.SUCCEEDED, result={"x": 1}) is False
        assert jobs.finish(session, job_id, token - 1, JobStatus.FAILED, error="boom") is False
    job = load(factory, job_id)
    assert job.status == "running"
    assert job.result is None and job.error is None and job.finished_at is None


def test_finish_with_the_right_token(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.finish(session, job_id, token, JobStatus.SUCCEEDED, result={"loss": 0.5}) is True
        # Once finished, the same token no longer owns it.
        assert jobs.finish(session, job_id, token, JobStatus.FAILED, error="late") is False
    job = load(factory, job_id)
    assert job.status == "succeeded"
    assert job.result == {"loss": 0.5}
    assert job.error is None
    assert job.finished_at is not None


def test_finish_failed_records_error(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.finish(session, job_id, token, JobStatus.FAILED, error="it broke", traceback="Traceback...")
    job = load(factory, job_id)
    assert (job.status, job.error, job.traceback) == ("failed", "it broke", "Traceback...")


def test_report_progress(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.report_progress(session, job_id, token, 3, 10, "training") is True
        assert jobs.report_progress(session, job_id, token + 1, 9, 10, "stale") is False
    job = load(factory, job_id)
    assert (job.progress_step, job.progress_total, job.progress_message) == (3, 10, "training")


# ------------------------------------------------------------------ cancel
def test_cancel_queued_job_is_immediate(factory):
    job_id = insert_job(factory)
    with factory() as session:
        job = jobs.cancel(session, job_id)
        session.commit()
        assert job.status == "cancelled" and job.cancel_requested
    job = load(factory, job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    with factory() as session:
        assert jobs.claim(session, job_id, "w1", 60) is None
    assert load(factory, job_id).status == "cancelled"


def test_cancel_running_job_requests_a_stop(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        job = jobs.cancel(session, job_id)
        session.commit()
        assert job.status == "running" and job.cancel_requested is True
    job = load(factory, job_id)
    assert job.status == "running" and job.cancel_requested is True
    with factory() as session:
        assert jobs.cancel_requested(session, job_id) is True
        # The runner then records the cancellation with its token.
        assert jobs.finish(session, job_id, token, JobStatus.CANCELLED)
    assert load(factory, job_id).status == "cancelled"


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_cancel_finished_job_is_invalid(factory, status):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.finish(session, job_id, token, status)
    with factory() as session:
        with pytest.raises(InvalidTransition):
            jobs.cancel(session, job_id)
    assert load(factory, job_id).status == status.value


def test_cancel_unknown_job(factory):
    with factory() as session:
        with pytest.raises(JobNotFound):
            jobs.cancel(session, "f" * 32)


# ------------------------------------------------------------------ retry
def test_retry_failed_job(factory, settings):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.finish(session, job_id, token, JobStatus.FAILED, result={"loss": 1.0}, error="boom",
                           traceback="tb")
    with factory() as session:
        job = jobs.retry(session, settings, job_id)
        session.commit()
        assert job.status == "queued"
    job = load(factory, job_id)
    assert job.status == "queued"
    assert job.error is None and job.traceback is None and job.finished_at is None and job.result is None
    assert job.cancel_requested is False
    # The next claim gets a new fencing token; the old one is stale.
    with factory() as session:
        assert jobs.claim(session, job_id, "w2", 60) == 2
        assert jobs.report_progress(session, job_id, token, 1, 2, "old execution") is False


def test_retry_cancelled_job(factory, settings):
    job_id = insert_job(factory)
    with factory() as session:
        jobs.cancel(session, job_id)
        session.commit()
    with factory() as session:
        jobs.retry(session, settings, job_id)
        session.commit()
    job = load(factory, job_id)
    assert job.status == "queued" and job.cancel_requested is False
    with factory() as session:
        assert jobs.claim(session, job_id, "w1", 60) == 1


@pytest.mark.parametrize("finish_as", [JobStatus.SUCCEEDED, None])
def test_retry_succeeded_or_running_is_invalid(factory, settings, finish_as):
    job_id, token = claimed(factory)
    if finish_as:
        with factory() as session:
            assert jobs.finish(session, job_id, token, finish_as, result={})
    with factory() as session:
        with pytest.raises(InvalidTransition):
            jobs.retry(session, settings, job_id)
    assert load(factory, job_id).status == (finish_as.value if finish_as else "running")


def test_retry_queued_is_invalid(factory, settings):
    job_id = insert_job(factory)
    with factory() as session:
        with pytest.raises(InvalidTransition):
            jobs.retry(session, settings, job_id)


# ------------------------------------------------------------------ artifacts
def test_record_artifact_upserts(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.record_artifact(session, job_id, token, "samples.png", "image", "image/png", 10, "a" * 64)
        assert jobs.record_artifact(
            session, job_id, token, "samples.png", "image", "image/png", 20, "b" * 64, meta={"step": 2}
        )
        assert jobs.record_artifact(session, job_id, token, "model/config.json", "model", "application/json", 5,
                                    "c" * 64)
        assert not jobs.record_artifact(session, job_id, token + 1, "stale.png", "image", "image/png", 1, "d" * 64)
    with factory() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all()
        assert [r.name for r in rows] == ["model/config.json", "samples.png"]
        png = rows[1]
        assert (png.size, png.sha256, png.meta) == (20, "b" * 64, {"step": 2})
        assert session.scalar(select(func.count()).select_from(Artifact).where(Artifact.name == "stale.png")) == 0


# ------------------------------------------------------------------ list
def test_list_jobs_filters(factory):
    a = insert_job(factory, kind="ddpm.sample")
    b = insert_job(factory, kind="ddpm.sample")
    with factory() as session:
        jobs.claim(session, b, "w", 60)
        rows, total = jobs.list_jobs(session, status="running", kind="ddpm.sample")
        ids = {r.id for r in rows}
        assert b in ids and a not in ids
        assert total >= 1
        rows, _ = jobs.list_jobs(session, kind="ddpm.sample", limit=1)
        assert len(rows) == 1


# ------------------------------------------------------------------ ETA
def test_eta_seconds(factory):
    job_id, token = claimed(factory)
    with factory() as session:
        assert jobs.report_progress(session, job_id, token, 5, 10, "half")
        session.execute(
            update(Job).where(Job.id == job_id).values(progress_started_at=utcnow() - timedelta(seconds=10))
        )
        session.commit()
    job = load(factory, job_id)
    assert job.progress_started_at.tzinfo is not None
    assert jobs.eta_seconds(job) == pytest.approx(10, abs=1.5)
    now = job.progress_started_at + timedelta(seconds=20)
    assert jobs.eta_seconds(job, now=now) == pytest.approx(20)


def test_eta_is_none_without_progress(factory):
    job_id = insert_job(factory)
    assert jobs.eta_seconds(load(factory, job_id)) is None  # queued
    job_id, _ = claimed(factory)
    assert jobs.eta_seconds(load(factory, job_id)) is None  # running, no steps yet


# ------------------------------------------------------------------ submit / publish
def _broker_messages(settings) -> list[dict]:
    path = settings.broker_url.split(":///", 1)[1]
    with sqlite3.connect(path) as con:
        return [json.loads(row[0]) for row in con.execute("SELECT payload FROM kombu_message")]


def test_submit_commits_and_publishes(sqlite_settings):
    engine = make_engine(sqlite_settings.database_url)
    factory = make_sessionmaker(engine)
    job = jobs.submit(factory, make_producer(sqlite_settings), sqlite_settings, "ddpm.train", {"max_steps": 4}, priority=3)
    assert job.status == "queued"
    assert job.params["max_steps"] == 4 and job.params["image_size"] == 16  # filled from the preset
    assert job.published_at is not None
    row = load(factory, job.id)
    assert row.status == "queued" and row.published_at is not None and row.priority == 3
    assert row.queue == "gpu"
    messages = _broker_messages(sqlite_settings)
    assert len(messages) == 1
    headers = messages[0]["headers"]
    assert headers["task"] == "diffqueue.run_job"
    assert job.id in headers["argsrepr"]
    assert messages[0]["properties"]["delivery_info"]["routing_key"] == "gpu"
    engine.dispose()


def test_submit_invalid_params_creates_nothing(sqlite_settings):
    from shared.errors import SpecError

    engine = make_engine(sqlite_settings.database_url)
    factory = make_sessionmaker(engine)
    with pytest.raises(SpecError):
        jobs.submit(factory, make_producer(sqlite_settings), sqlite_settings, "ddpm.train", {"max_steps": 0})
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    engine.dispose()


def test_submit_with_the_broker_down_keeps_the_row_queued(sqlite_settings):
    engine = make_engine(sqlite_settings.database_url)
    factory = make_sessionmaker(engine)
    down = make_producer(replace(sqlite_settings, broker_url="redis://127.0.0.1:1/0"))
    started = time.monotonic()
    (sqlite_settings.models_dir / "my-model").mkdir(parents=True)
    job = jobs.submit(factory, down, sqlite_settings, "ddpm.sample", {"model": "my-model"})
    assert time.monotonic() - started < 15
    row = load(factory, job.id)
    assert row.status == "queued"
    assert row.published_at is None
    assert row.params["model"] == "my-model" and row.params["num_images"] == 8
    # A later publish through a working broker succeeds and stamps the row.
    assert jobs.publish(factory, down, row) is False
    assert load(factory, job.id).published_at is None
    assert jobs.publish(factory, make_producer(sqlite_settings), row) is True
    assert load(factory, job.id).published_at is not None
    engine.dispose()


# ------------------------------------------------------------------ a connection cut mid-write
def test_a_running_jobs_write_survives_its_connection_cut_mid_transaction(pg_url):
    """pg_terminate_backend between two statements of one transaction: the pool's pre-ping
    cannot see that (the connection was alive at checkout). `with_reconnect` runs the
    write once more on a new connection, so a training job does not fail on the blip."""
    import logging

    import psycopg
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from shared.db import with_reconnect

    engine = make_engine(pg_url)
    factory = make_sessionmaker(engine)
    job_id = insert_job(factory)
    calls = []

    def cut_once_then_write(session):
        calls.append(session.execute(text("SELECT pg_backend_pid()")).scalar())
        if len(calls) == 1:
            with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (calls[0],))
        session.execute(update(Job).where(Job.id == job_id).values(progress_step=7))
        session.commit()
        return True

    with pytest.raises(OperationalError):  # without it, the job's write fails
        with factory() as session:
            calls.append(session.execute(text("SELECT pg_backend_pid()")).scalar())
            with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (calls[-1],))
            session.execute(update(Job).where(Job.id == job_id).values(progress_step=3))
    calls.clear()
    assert with_reconnect(factory, cut_once_then_write, logging.getLogger("test")) is True
    assert len(calls) == 2 and calls[0] != calls[1]  # the second try on another backend
    assert load(factory, job_id).progress_step == 7
    engine.dispose()
