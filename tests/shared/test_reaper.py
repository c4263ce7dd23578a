"""The reaper on a controllable clock: jobs of dead workers re-queued and published,
failed at max_attempts with the reason; queued jobs the broker lost published again,
with backoff; a broker down at submit leaves an outbox row the reaper publishes.
tests/test_faults.py does the same through real processes."""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import update

from shared import jobs, reaper
from shared.broker import make_producer
from shared.db import make_engine, make_sessionmaker
from shared.models import Job, utcnow


@pytest.fixture
def env(sqlite_settings):
    settings = replace(sqlite_settings, max_attempts=3, republish_after_s=60)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    return settings, sessions, make_producer(settings)


def submit(env) -> str:
    settings, sessions, producer = env
    return jobs.submit(sessions, producer, settings, "ddpm.schedule_plot", {}).id


def get(env, job_id: str) -> Job:
    with env[1]() as session:
        return session.get(Job, job_id)


def claim_and_die(env, job_id: str, worker: str) -> int:
    """A worker claims the job, then dies: its lease is left to expire."""
    with env[1]() as session:
        token = jobs.claim(session, job_id, worker, lease_s=30)
        assert token is not None
        return token


def test_a_dead_workers_job_is_requeued_then_failed_at_max_attempts(env):
    settings, sessions, producer = env
    job_id = submit(env)
    for lost in (1, 2):
        claim_and_die(env, job_id, f"w{lost}")
        assert reaper.reap(sessions, producer, settings, now=utcnow() + timedelta(seconds=10)).requeued == []  # live
        out = reaper.reap(sessions, producer, settings, now=utcnow() + timedelta(seconds=31))
        assert out.requeued == [job_id]
        job = get(env, job_id)
        assert (job.status, job.worker_lost, job.worker, job.lease_expires_at) == ("queued", lost, None, None)
        assert job.published_at is not None  # published again at once
        assert f"worker w{lost} lost" in job.progress_message
    claim_and_die(env, job_id, "w3")
    out = reaper.reap(sessions, producer, settings, now=utcnow() + timedelta(seconds=31))
    assert out.failed == [job_id] and out.requeued == []
    job = get(env, job_id)
    assert (job.status, job.attempt, job.worker_lost) == ("failed", 3, 3)
    assert job.error == "worker lost 3 times (max_attempts 3); the last was w3"
    assert job.finished_at is not None
    # Nothing more happens to it: no loop.
    assert reaper.reap(sessions, producer, settings, now=utcnow() + timedelta(hours=2)) == reaper.Reaped()


def test_a_redelivered_message_recovers_the_job_the_same_way(env):
    settings, sessions, producer = env
    job_id = submit(env)
    with sessions() as session:
        assert jobs.claim(session, job_id, "w1", lease_s=0.0) == 1
        session.execute(update(Job).where(Job.id == job_id).values(worker_lost=2))
        session.commit()
    with sessions() as session:  # the broker delivers again; the lease has expired
        assert jobs.claim(session, job_id, "w2", 60, max_attempts=3) is None
    job = get(env, job_id)
    assert (job.status, job.error) == ("failed", "worker lost 3 times (max_attempts 3); the last was w1")


def test_a_job_submitted_while_the_broker_is_down_is_published_by_the_reaper(env, tmp_path):
    settings, sessions, producer = env
    down = make_producer(replace(settings, broker_url="redis://127.0.0.1:1/0"))  # nothing listens there
    job = jobs.submit(sessions, down, settings, "ddpm.schedule_plot", {})
    row = get(env, job.id)
    assert (row.status, row.published_at, row.publish_count) == ("queued", None, 0)  # committed, not published
    assert reaper.reap(sessions, producer, settings, now=utcnow()).republished == []  # a moment's grace
    out = reaper.reap(sessions, producer, settings, now=utcnow() + timedelta(seconds=6))
    assert out.republished == [job.id]
    row = get(env, job.id)
    assert row.published_at is not None and row.publish_count == 1


def test_a_queued_job_nobody_claims_is_published_again_with_backoff(env):
    settings, sessions, producer = env
    job_id = submit(env)
    published = get(env, job_id).published_at
    assert reaper.reap(sessions, producer, settings, now=published + timedelta(seconds=59)).republished == []
    assert reaper.reap(sessions, producer, settings, now=published + timedelta(seconds=61)).republished == [job_id]
    second = get(env, job_id)
    assert second.publish_count == 2
    # Now it waits twice as long: 120 s after the second publish.
    at = second.published_at
    assert reaper.reap(sessions, producer, settings, now=at + timedelta(seconds=100)).republished == []
    assert reaper.reap(sessions, producer, settings, now=at + timedelta(seconds=121)).republished == [job_id]
    assert reaper.republish_due(get(env, job_id), at + timedelta(days=1), 60)  # capped at an hour


def test_cancelled_and_running_jobs_are_not_republished(env):
    settings, sessions, producer = env
    cancelled, running = submit(env), submit(env)
    with sessions() as session:
        jobs.cancel(session, cancelled)
        session.commit()
        jobs.claim(session, running, "w1", lease_s=3600)
    out = reaper.reap(sessions, producer, settings, now=utcnow() + timedelta(minutes=30))  # lease still live
    assert out == reaper.Reaped()
