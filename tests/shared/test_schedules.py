"""Schedules' tick logic on a controllable clock: occurrences, downtime per missed-run
policy, pause and resume, DST, max_concurrent, bad input, and exactly-once under
concurrent ticks on PostgreSQL. tests/test_beat.py runs real beat processes."""
from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, update

from shared import schedules
from shared.broker import make_producer
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.errors import SpecError
from shared.models import Job, JobStatus, Schedule

UTC = timezone.utc
T0 = datetime(2026, 1, 5, 10, 30, tzinfo=UTC)
TEMPLATE = {"kind": "ddpm.schedule_plot", "params": {"num_timesteps_shown": 4}}


class Clock:
    """Schedules on one database, ticked at chosen times."""

    def __init__(self, settings):
        self.settings = settings
        self.sessions = make_sessionmaker(make_engine(settings.database_url))
        self.producer = make_producer(settings)

    def add(self, at: datetime = T0, **fields) -> str:
        with self.sessions() as session:
            schedule = schedules.create(session, {"name": "nightly", **TEMPLATE, **fields}, self.settings, now=at)
            session.commit()
            return schedule.id

    def tick(self, at: datetime) -> list[Job]:
        return schedules.tick(self.sessions, self.producer, self.settings, now=at)

    def get(self, schedule_id: str) -> Schedule:
        with self.sessions() as session:
            return schedules.get_schedule(session, schedule_id)

    def patch(self, schedule_id: str, at: datetime, **patch) -> Schedule:
        with self.sessions() as session:
            schedule = schedules.update_schedule(session, schedule_id, patch, self.settings, now=at)
            session.commit()
            return schedule

    def jobs(self, schedule_id: str) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(select(Job).where(Job.schedule_id == schedule_id).order_by(Job.scheduled_for)))

    def finish_all(self, schedule_id: str) -> None:
        with self.sessions() as session:
            session.execute(update(Job).where(Job.schedule_id == schedule_id).values(status=JobStatus.SUCCEEDED.value))
            session.commit()


@pytest.fixture
def clock(sqlite_settings) -> Clock:
    return Clock(sqlite_settings)


def at(hour: int, minute: int = 0, second: int = 0, day: int = 5) -> datetime:
    return datetime(2026, 1, day, hour, minute, second, tzinfo=UTC)


# ------------------------------------------------------------------ occurrences
def test_a_schedule_fires_once_at_each_occurrence(clock):
    sid = clock.add(cron="0 * * * *")
    assert clock.get(sid).next_run_at == at(11)
    assert clock.tick(at(10, 59, 59)) == []
    [job] = clock.tick(at(11, 0, 3))
    assert (job.scheduled_for, job.schedule_id, job.kind) == (at(11), sid, "ddpm.schedule_plot")
    assert job.params["num_timesteps_shown"] == 4 and job.published_at is not None
    assert clock.tick(at(11, 0, 8)) == []  # the same occurrence: nothing more
    clock.finish_all(sid)
    [job] = clock.tick(at(12, 0, 1))
    assert job.scheduled_for == at(12)
    schedule = clock.get(sid)
    assert (schedule.last_run_at, schedule.last_job_id, schedule.next_run_at) == (at(12), job.id, at(13))
    assert [j.scheduled_for for j in clock.jobs(sid)] == [at(11), at(12)]


def test_times_are_computed_in_the_schedules_timezone_and_stored_in_utc(clock):
    sid = clock.add(cron="0 2 * * *", timezone="America/New_York")  # 02:00 EST is 07:00 UTC
    assert clock.get(sid).next_run_at == datetime(2026, 1, 6, 7, 0, tzinfo=UTC)


@pytest.mark.parametrize("cron, expected_local", [
    # Spring forward (Europe/Berlin, 2026-03-29 02:00 -> 03:00): 02:30 does not exist
    # that day and the run comes at 03:00, as cron does.
    ("30 2 * * *", ["2026-03-28 02:30+01:00", "2026-03-29 03:00+02:00", "2026-03-30 02:30+02:00"]),
    # Daily at 03:00 keeps its wall-clock time; the UTC time moves by an hour.
    ("0 3 * * *", ["2026-03-28 03:00+01:00", "2026-03-29 03:00+02:00", "2026-03-30 03:00+02:00"]),
])
def test_dst_spring_forward(clock, cron, expected_local):
    assert local_runs(clock, cron, datetime(2026, 3, 27, 12, tzinfo=UTC), 3) == expected_local


def test_dst_fall_back_runs_a_daily_schedule_once_and_an_hourly_one_every_hour(clock):
    # 2026-10-25 03:00 CEST -> 02:00 CET: the wall times 02:00-02:59 come twice.
    daily = local_runs(clock, "30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=UTC), 3)
    assert daily == ["2026-10-25 02:30+02:00", "2026-10-26 02:30+01:00", "2026-10-27 02:30+01:00"]
    hourly = local_runs(clock, "0 * * * *", datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 4)
    assert hourly == ["2026-10-25 02:00+02:00", "2026-10-25 02:00+01:00", "2026-10-25 03:00+01:00",
                      "2026-10-25 04:00+01:00"]


def local_runs(clock: Clock, cron: str, start: datetime, n: int) -> list[str]:
    """The occurrences the tick enqueues, ticking a few seconds after each is due."""
    from zoneinfo import ZoneInfo

    sid = clock.add(at=start, cron=cron, timezone="Europe/Berlin", max_concurrent=100)
    runs = []
    for _ in range(n):
        [job] = clock.tick(clock.get(sid).next_run_at + timedelta(seconds=2))
        runs.append(job.scheduled_for.astimezone(ZoneInfo("Europe/Berlin")).strftime("%Y-%m-%d %H:%M%z"))
    return [r[:-2] + ":" + r[-2:] for r in runs]


# ------------------------------------------------------------------ downtime, pause
def test_downtime_with_skip_runs_only_the_next_future_occurrence(clock):
    sid = clock.add(cron="0 * * * *")  # missed_runs defaults to skip
    assert clock.tick(at(14, 30)) == []  # beat was down from 10:30: 11:00 .. 14:00 missed
    schedule = clock.get(sid)
    assert schedule.next_run_at == at(15) and schedule.skipped_runs == 1
    assert "missed" in schedule.last_skip_reason
    [job] = clock.tick(at(15, 0, 2))
    assert job.scheduled_for == at(15)


def test_downtime_with_catch_up_once_enqueues_one_job_for_the_window(clock):
    sid = clock.add(cron="0 * * * *", missed_runs="catch_up_once")
    [job] = clock.tick(at(14, 30))
    assert job.scheduled_for == at(14)  # the latest missed occurrence, once
    assert clock.get(sid).next_run_at == at(15)
    assert clock.tick(at(14, 31)) == []
    assert len(clock.jobs(sid)) == 1


def test_a_late_tick_within_the_grace_still_runs_under_skip(clock):
    sid = clock.add(cron="0 * * * *")
    [job] = clock.tick(at(11, 0, 50))  # 50 s late, grace 60 s
    assert job.scheduled_for == at(11) and clock.get(sid).skipped_runs == 0


def test_pause_and_resume_skip_the_paused_occurrences(clock):
    sid = clock.add(cron="0 * * * *", missed_runs="catch_up_once")
    paused = clock.patch(sid, at(10, 45), enabled=False)
    assert (paused.enabled, paused.next_run_at) == (False, None)
    assert clock.tick(at(12, 0, 1)) == [] and clock.tick(at(13, 0, 1)) == []
    resumed = clock.patch(sid, at(13, 10), enabled=True)
    assert resumed.next_run_at == at(14)  # no catch-up for time spent paused
    assert clock.tick(at(13, 30)) == []
    [job] = clock.tick(at(14, 0, 1))
    assert job.scheduled_for == at(14) and len(clock.jobs(sid)) == 1


def test_changing_the_cron_moves_the_next_run(clock):
    sid = clock.add(cron="0 * * * *")
    assert clock.patch(sid, at(10, 40), cron="*/15 * * * *").next_run_at == at(10, 45)
    assert clock.patch(sid, at(10, 40), name="renamed").next_run_at == at(10, 45)  # timing unchanged


# ------------------------------------------------------------------ max_concurrent
def test_max_concurrent_skips_while_earlier_runs_are_active(clock):
    sid = clock.add(cron="*/10 * * * *", max_concurrent=2)
    assert len(clock.tick(at(10, 40, 1))) == 1
    assert len(clock.tick(at(10, 50, 1))) == 1  # two active now: the limit
    assert clock.tick(at(11, 0, 1)) == []
    schedule = clock.get(sid)
    assert schedule.skipped_runs == 1 and "max_concurrent 2" in schedule.last_skip_reason
    assert schedule.next_run_at == at(11, 10)
    clock.finish_all(sid)
    assert len(clock.tick(at(11, 10, 1))) == 1


def test_max_concurrent_with_queue_holds_the_run_until_a_slot_frees(clock):
    sid = clock.add(cron="*/10 * * * *", overlap="queue")
    [first] = clock.tick(at(10, 40, 1))
    assert clock.tick(at(10, 50, 1)) == []
    held = clock.get(sid)
    assert held.held_since == at(10, 50, 1) and held.next_run_at == at(10, 50)  # still due
    assert clock.tick(at(10, 55)) == []
    clock.finish_all(sid)
    # Freed 6 minutes after the held occurrence (past the grace): it runs now, once.
    [second] = clock.tick(at(10, 56))
    assert second.scheduled_for == at(10, 50)
    schedule = clock.get(sid)
    assert schedule.held_since is None and schedule.next_run_at == at(11, 0) and schedule.skipped_runs == 0


def test_run_now_adds_a_job_without_moving_the_schedule(clock):
    sid = clock.add(cron="0 * * * *", enabled=False)
    job = schedules.run_now(clock.sessions, clock.producer, clock.settings, sid, now=at(10, 40))
    assert (job.schedule_id, job.scheduled_for, job.status) == (sid, at(10, 40), "queued")
    schedule = clock.get(sid)
    assert (schedule.next_run_at, schedule.last_job_id) == (None, job.id)


def test_a_template_that_no_longer_validates_is_skipped_with_the_reason(clock):
    sid = clock.add(cron="0 * * * *")
    with clock.sessions() as session:
        session.execute(update(Schedule).where(Schedule.id == sid).values(params={"num_timesteps_shown": 99}))
        session.commit()
    assert clock.tick(at(11, 0, 1)) == []
    schedule = clock.get(sid)
    assert "job template refused" in schedule.last_skip_reason and "num_timesteps_shown" in schedule.last_skip_reason
    assert schedule.next_run_at == at(12)


def test_deleting_a_schedule_keeps_its_jobs(clock):
    sid = clock.add(cron="0 * * * *")
    [job] = clock.tick(at(11, 0, 1))
    with clock.sessions() as session:
        schedules.delete_schedule(session, sid)
        session.commit()
        assert session.get(Job, job.id).schedule_id is None
        assert session.get(Schedule, sid) is None


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("fields, field, fragment", [
    ({"cron": "61 * * * *"}, "cron", "not a valid cron expression"),
    ({"cron": "0 2 * *"}, "cron", "must have 5 fields"),
    ({"cron": "*/5 * * * * *"}, "cron", "must have 5 fields"),  # seconds: not at the 60 s minimum
    ({"cron": "0 0 31 2 *"}, "cron", "no upcoming occurrence"),
    ({"timezone": "Mars/Olympus"}, "timezone", "unknown timezone 'Mars/Olympus'"),
    ({"kind": "sd.render"}, "kind", "unknown job kind"),
    ({"params": {"num_timesteps_shown": 99}}, "params.num_timesteps_shown", "less than or equal to 16"),
    ({"max_concurrent": 0}, "max_concurrent", "greater than or equal to 1"),
    ({"missed_runs": "always"}, "missed_runs", "'skip' or 'catch_up_once'"),
    ({"name": ""}, "name", "at least 1 character"),
    ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
])
def test_bad_schedules_are_refused_by_field(clock, fields, field, fragment):
    with pytest.raises(SpecError) as info:
        clock.add(**{"cron": "0 * * * *", **fields})
    assert fragment in info.value.fields[field], info.value.fields
    with clock.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Schedule)) == 0


def test_the_minimum_interval_is_configurable(clock):
    strict = Clock(replace(clock.settings, schedule_min_interval_s=300))
    with pytest.raises(SpecError) as info:
        strict.add(cron="*/2 * * * *")
    assert "fires every 120 s at times; the minimum interval is 300 s" in info.value.fields["cron"]
    with pytest.raises(SpecError):
        strict.add(cron="0,1 * * * *")  # every hour, but two runs a minute apart
    strict.add(cron="*/5 * * * *")
    # Below a minute, croniter's sixth field (seconds) is accepted.
    fast = Clock(replace(clock.settings, schedule_min_interval_s=1))
    sid = fast.add(cron="* * * * * */2")
    assert fast.get(sid).next_run_at == T0 + timedelta(seconds=2)


# ------------------------------------------------------------------ exactly once
def test_concurrent_ticks_on_postgres_enqueue_each_occurrence_once(sqlite_settings, pg_url):
    upgrade(pg_url)
    clock = Clock(replace(sqlite_settings, database_url=pg_url))
    ids = [clock.add(cron="*/10 * * * *", max_concurrent=100) for _ in range(4)]
    for occurrence in (at(10, 40), at(10, 50), at(11, 0)):
        barrier = threading.Barrier(6)
        made: list[Job] = []

        def run():
            barrier.wait()
            made.extend(clock.tick(occurrence + timedelta(seconds=1)))

        threads = [threading.Thread(target=run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(j.schedule_id for j in made) == sorted(ids)
    for sid in ids:
        assert [j.scheduled_for for j in clock.jobs(sid)] == [at(10, 40), at(10, 50), at(11, 0)]


def test_the_database_refuses_a_second_job_for_one_occurrence(clock):
    from sqlalchemy.exc import IntegrityError

    sid = clock.add(cron="0 * * * *")
    [job] = clock.tick(at(11, 0, 1))
    with clock.sessions() as session, pytest.raises(IntegrityError):
        session.add(Job(kind=job.kind, params=job.params, queue=job.queue, schedule_id=sid, scheduled_for=at(11)))
        session.commit()


def test_the_tick_does_not_wait_on_dns_for_a_schedules_webhook(sqlite_settings, monkeypatch):
    """The webhook URL was checked (and resolved) when the schedule was saved, and every
    send resolves and checks it again: an occurrence's job is made without a lookup, so a
    slow or failing DNS cannot hold the tick."""
    import socket

    clock = Clock(replace(sqlite_settings, webhook_allow_private=True))
    sid = clock.add(cron="0 * * * *", webhook_url="http://127.0.0.1:9/hook")

    def no_dns(*args, **kwargs):
        raise AssertionError("the tick looked a host up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    [job] = clock.tick(at(11, 0, 3))
    assert job.webhook_url == "http://127.0.0.1:9/hook" and job.schedule_id == sid
