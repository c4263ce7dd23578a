"""`diffqueue beat` as a real process: schedules fire in real time through beat and a
worker, two beats by mistake still enqueue each occurrence once, and a webhook
receiver that never finishes answering holds up neither the tick nor other webhooks.

Cron expressions here use croniter's sixth field (seconds), which the service accepts
where DIFFQUEUE_SCHEDULE_MIN_INTERVAL_S is under a minute, so occurrences come seconds
apart instead of minutes.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from shared.db import make_engine, make_sessionmaker, upgrade
from shared.models import Job, utcnow
from tests.conftest import Services, fresh_pg_database
from tests.webhook_receiver import Receiver, Trickler

pytestmark = pytest.mark.e2e

FAST = {"schedule_min_interval_s": 1.0, "beat_interval_s": 0.25}
PLOT = {"kind": "ddpm.schedule_plot", "params": {"image_size": 16, "num_timesteps_shown": 2}}


def scheduled_jobs(svc: Services, schedule_id: str) -> list[dict]:
    return svc.api("GET", f"/schedules/{schedule_id}/jobs?limit=200").json()["jobs"]


def test_a_schedule_fires_in_real_time_through_beat_and_a_worker(sqlite_settings, start_services):
    svc = start_services(replace(sqlite_settings, **FAST))
    svc.start("beat", ["beat", "--loglevel", "info"])
    body = {"name": "every 2 s", "cron": "* * * * * */2", **PLOT, "max_concurrent": 10}
    schedule = svc.api("POST", "/schedules", json=body).json()

    def two_succeeded():
        done = [j for j in scheduled_jobs(svc, schedule["id"]) if j["status"] == "succeeded"]
        return done if len(done) >= 2 else None

    done = svc.wait_until("two scheduled jobs to succeed", two_succeeded, 90)
    times = sorted(datetime.fromisoformat(j["scheduled_for"]) for j in done)
    assert all(t.second % 2 == 0 and t.microsecond == 0 for t in times), times  # on the occurrences
    assert len(set(times)) == len(times)
    for job in done:
        full = svc.api("GET", f"/jobs/{job['id']}").json()
        assert {a["name"] for a in full["artifacts"]} >= {"noised.png", "schedules.json"}

    # Paused, it enqueues nothing more.
    svc.api("PATCH", f"/schedules/{schedule['id']}", json={"enabled": False})
    paused_with = len(scheduled_jobs(svc, schedule["id"]))
    time.sleep(3)
    assert len(scheduled_jobs(svc, schedule["id"])) == paused_with
    assert f"schedule {schedule['id']}: enqueued job" in svc.log("beat")


@pytest.fixture
def pg_url(request):
    """A database of this test's own: the beats' reaper must not touch other tests' jobs."""
    with fresh_pg_database("diffqueue_beat") as url:
        yield url


def test_two_beats_on_postgres_enqueue_each_occurrence_once(tmp_path, sqlite_settings, pg_url, redis_url):
    upgrade(pg_url)
    settings = replace(sqlite_settings, database_url=pg_url, broker_url=redis_url, auth_enabled=True, **FAST)
    svc = Services(settings, tmp_path)
    try:
        svc.start_web()
        schedule = svc.api("POST", "/schedules", json={"name": "every 2 s", "cron": "* * * * * */2", **PLOT,
                                                       "max_concurrent": 100}).json()
        svc.start("beat-1", ["beat"])
        svc.start("beat-2", ["beat"])
        svc.wait_until("8 occurrences", lambda: len(scheduled_jobs(svc, schedule["id"])) >= 8, 60)
        svc.api("PATCH", f"/schedules/{schedule['id']}", json={"enabled": False})
        time.sleep(1)  # a tick already past its read finishes; the pause stops the rest
        for name in ("beat-1", "beat-2"):
            assert "beat: Starting" in svc.log(name)
    finally:
        svc.stop()
    with make_sessionmaker(make_engine(pg_url))() as session:
        times = [j.scheduled_for for j in session.query(Job).filter(Job.schedule_id == schedule["id"])]
    counts = Counter(times)
    assert max(counts.values()) == 1, [t for t, n in counts.items() if n > 1]
    ordered = sorted(times)
    # Every occurrence from the first to the last has its job: none lost, none doubled.
    assert ordered == [ordered[0] + timedelta(seconds=2 * i) for i in range(len(ordered))], ordered
    assert len(ordered) >= 8


def submit_and_cancel(svc: Services, webhook_url: str) -> float:
    """A job whose webhook wants its completed event, cancelled while queued (no worker
    runs here): its delivery is due at once. Returns the time.monotonic() of the cancel."""
    job = svc.api("POST", "/jobs", json={**PLOT, "webhook_url": webhook_url, "webhook_events": ["completed"]})
    assert job.status_code == 202, job.text
    cancelled = svc.api("POST", f"/jobs/{job.json()['id']}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    return time.monotonic()


def test_a_trickling_webhook_receiver_stalls_neither_the_schedules_nor_other_webhooks(pg_url, redis_url, tmp_path,
                                                                                        sqlite_settings):
    """A receiver that answers one byte a second, forever, holds one delivery for its
    whole deadline (60 s here, longer than the test): meanwhile a schedule firing every
    2 s loses no occurrence, another job's webhook arrives at once, and beat stops
    cleanly on SIGTERM with that send still in flight. On Postgres and Redis, as deployed."""
    upgrade(pg_url)
    settings = replace(sqlite_settings, webhook_allow_private=True, webhook_timeout_s=60.0, database_url=pg_url,
                       broker_url=redis_url, auth_enabled=True, **FAST)
    trickler, receiver = Trickler(interval_s=1.0), Receiver()
    svc = Services(settings, tmp_path)
    try:
        svc.start_web()
        svc.start("beat", ["beat"])
        schedule = svc.api("POST", "/schedules", json={"name": "every 2 s", "cron": "* * * * * */2", **PLOT,
                                                       "max_concurrent": 100}).json()
        submit_and_cancel(svc, trickler.url)
        svc.wait_until("beat to send to the trickling receiver", lambda: trickler.connections, 60)
        trickling_since = utcnow()

        cancelled_at = submit_and_cancel(svc, receiver.url)
        svc.wait_until("the other job's webhook", lambda: receiver.received, 60)
        assert time.monotonic() - cancelled_at < 10  # beat looks every 0.25 s: generous

        time.sleep(max(0.0, 12 - (utcnow() - trickling_since).total_seconds()))
        assert (trickler.connections, trickler.hung_up) == (1, 0)  # still trickling to the same send
        times = sorted(t for t in (datetime.fromisoformat(j["scheduled_for"])
                                   for j in scheduled_jobs(svc, schedule["id"])) if t >= trickling_since)
        # Every occurrence of those 12 s has its job: the tick kept its rhythm.
        assert len(times) >= 5, times
        assert times == [times[0] + timedelta(seconds=2 * i) for i in range(len(times))], times

        beat = svc.procs["beat"]
        os.killpg(beat.pid, signal.SIGTERM)
        assert beat.wait(timeout=30) == 0, svc.log("beat")
        assert "Traceback" not in svc.log("beat"), svc.log("beat")
    finally:
        svc.stop()
        trickler.close()
        receiver.close()
