"""Schedules: recurring jobs from cron expressions, enqueued once per occurrence.

`tick` runs every `beat_interval_s` in `diffqueue beat`. For each due schedule, in its
own transaction, it inserts the occurrence's job and advances `next_run_at`, then
publishes the job after the commit. Three things keep an occurrence to one job:
- the due row is locked: `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so a
  second beat skips it; on SQLite the tick's transaction begins with `BEGIN IMMEDIATE`,
  the database's single-writer lock, so ticks run one at a time;
- the tick claims the row by compare-and-set on the `next_run_at` it read;
- jobs' `(schedule_id, scheduled_for)` is unique.

Times are computed in the schedule's IANA timezone (croniter on zoneinfo datetimes,
so DST transitions fall where the wall clock says) and stored in UTC.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery import Celery
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared import auth, jobs, webhooks
from shared.config import Settings
from shared.errors import QuotaExceeded, ScheduleNotFound, SpecError
from shared.models import Job, JobStatus, MissedRuns, Overlap, Schedule, User, utcnow

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
# How many upcoming occurrences the minimum-interval check looks at (a year of a
# weekly schedule; enough to catch "0,1 * * * *"-style bursts).
INTERVAL_CHECK_OCCURRENCES = 60
MAX_SCHEDULES_PER_TICK = 500


class ScheduleFields(BaseModel):
    """What a user sets on a schedule. cron, timezone and the job template are checked
    beyond their types by `validate_schedule`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    cron: str = Field(min_length=1, max_length=200, description="5-field cron: minute hour day month weekday.")
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA name, e.g. Europe/Berlin.")
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    # Strict, as a job's priority (specs.validate_priority): "5" and true are refused, not coerced.
    priority: int = Field(0, ge=0, le=9, strict=True)
    enabled: bool = True
    missed_runs: MissedRuns = MissedRuns.SKIP
    max_concurrent: int = Field(1, ge=1, le=100)
    overlap: Overlap = Overlap.SKIP
    # Copied to each job it makes; checked beyond their types by webhooks.validate_fields.
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    webhook_secret: str | None = None


EDITABLE = tuple(ScheduleFields.model_fields)


# ------------------------------------------------------------------ times
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _runs_in_repeated_hour(cron: str) -> bool:
    """When clocks go back, the wall times of one hour come twice. As cron does, a
    schedule whose hour field is `*` runs in both passes (it keeps its cadence); one
    with fixed hours ("30 2 * * *", daily at 02:30) runs in the first pass only."""
    return cron.split()[1] in ("*", "*/1")  # the hour field (croniter's seconds, if any, come last)


def _occurrences(cron: str, tz: str, start: datetime, forward: bool):
    """Occurrences from `start` (exclusive) in one direction, as aware local times,
    without the second pass of a repeated hour unless the schedule runs in it."""
    local_zone = zone(tz)
    it = croniter(cron, start.astimezone(local_zone))
    both_passes = _runs_in_repeated_hour(cron)
    while True:
        t = it.get_next(datetime) if forward else it.get_prev(datetime)
        # Through UTC and back: croniter's get_prev marks every time fold=1; zoneinfo's
        # fromutc sets fold only on the second pass of a repeated hour.
        t = t.astimezone(timezone.utc).astimezone(local_zone)
        if both_passes or not t.fold:
            yield t


def next_after(cron: str, tz: str, after: datetime) -> datetime:
    """The first occurrence strictly after `after`, in UTC."""
    return next(_occurrences(cron, tz, after, forward=True)).astimezone(timezone.utc)


def latest_at_or_before(cron: str, tz: str, when: datetime) -> datetime:
    """The last occurrence at or before `when`, in UTC."""
    # croniter counts whole seconds and looks strictly before its start: start at the
    # next whole second (it mishandles a start with microseconds).
    start = when.replace(microsecond=0) + timedelta(seconds=1)
    return next(_occurrences(cron, tz, start, forward=False)).astimezone(timezone.utc)


def check_cron(cron: str, tz: str, min_interval_s: float, now: datetime) -> str | None:
    """Why `cron` is refused, or None. Five fields; a sixth (seconds, croniter's
    syntax) only where the minimum interval is under a minute."""
    fields = cron.split()
    allowed = (5, 6) if min_interval_s < 60 else (5,)
    if len(fields) not in allowed:
        return (f"must have 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
                if allowed == (5,) else f"must have 5 fields, or 6 with seconds last; got {len(fields)}")
    if not croniter.is_valid(cron):
        return f"{cron!r} is not a valid cron expression"
    try:
        upcoming = _occurrences(cron, tz, now, forward=True)
        times = [next(upcoming).astimezone(timezone.utc) for _ in range(INTERVAL_CHECK_OCCURRENCES)]
    except (ValueError, KeyError, OverflowError) as exc:  # e.g. "0 0 31 2 *" never fires
        return f"{cron!r} has no upcoming occurrence ({exc})"
    # In UTC: a difference of two times in one zoneinfo is of wall clocks, blind to DST.
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    if gaps and min(gaps) < min_interval_s:
        return f"fires every {min(gaps):g} s at times; the minimum interval is {min_interval_s:g} s"
    return None


# ------------------------------------------------------------------ validation
# The template's own fields; every other field a job refusal names is one of its params.
TEMPLATE_FIELDS = ("kind", "params", "priority", *webhooks.FIELDS)


def template_error(exc: SpecError) -> SpecError:
    """A job refusal of the schedule's template, with params fields named `params.<field>`."""
    fields = {(k if k in TEMPLATE_FIELDS else f"params.{k}"): v for k, v in exc.fields.items()}
    return SpecError(f"job template refused: {exc}", fields)


def validate_schedule(session: Session, data: Any, settings: Settings, owner: User | None,
                      now: datetime | None = None) -> ScheduleFields:
    """Check a whole schedule; raise SpecError naming each bad field (params errors as
    `params.<field>`), so nothing is saved. The job template goes through the job door's
    checks (`jobs.admit`) as the schedule's owner, the queued-jobs quota aside: that is
    counted when an occurrence makes its job."""
    if not isinstance(data, dict):
        raise SpecError("the body must be a JSON object", {"body": "must be an object"})
    try:
        fields = ScheduleFields.model_validate(data)
    except ValidationError as exc:
        errors = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}
        raise SpecError("invalid schedule: " + "; ".join(f"{k}: {v}" for k, v in errors.items()), errors) from None
    errors: dict[str, str] = {}
    try:
        zone(fields.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        errors["timezone"] = f"unknown timezone {fields.timezone!r}: use an IANA name such as UTC or Europe/Berlin"
    if "timezone" not in errors:
        reason = check_cron(fields.cron, fields.timezone, settings.schedule_min_interval_s, now or utcnow())
        if reason:
            errors["cron"] = reason
    try:
        fields.params, _, hook = jobs.admit(session, settings, fields.kind, fields.params, fields.priority, owner,
                                            webhook=fields.model_dump(include=set(webhooks.FIELDS)), quota=False)
    except SpecError as exc:
        errors.update(template_error(exc).fields)
    else:
        for name, value in hook.items():
            setattr(fields, name, value)
    if errors:
        raise SpecError("invalid schedule: " + "; ".join(f"{k}: {v}" for k, v in errors.items()), errors)
    return fields


# ------------------------------------------------------------------ rows
def _owner(session: Session, schedule: Schedule) -> User | None:
    """Whose jobs the schedule makes: its owner's (None with auth off)."""
    return session.get(User, schedule.owner_id) if schedule.owner_id else None


def get_schedule(session: Session, schedule_id: str, viewer: User | None = None) -> Schedule:
    """The schedule, if `viewer` may see it (None: anyone may); ScheduleNotFound otherwise."""
    schedule = session.get(Schedule, schedule_id)
    if schedule is None or not auth.can_see(schedule.owner_id, viewer):
        raise ScheduleNotFound(f"no schedule with id {schedule_id!r}")
    return schedule


def create(session: Session, data: Any, settings: Settings, now: datetime | None = None,
           owner: User | None = None) -> Schedule:
    now = now or utcnow()
    fields = validate_schedule(session, data, settings, owner, now)
    schedule = Schedule(**fields.model_dump(mode="json"), owner_id=auth.owner_id_of(owner))
    schedule.next_run_at = next_after(fields.cron, fields.timezone, now) if fields.enabled else None
    session.add(schedule)
    session.flush()
    return schedule


def update_schedule(session: Session, schedule_id: str, patch: Any, settings: Settings,
                    now: datetime | None = None, viewer: User | None = None) -> Schedule:
    """Apply a partial update, validated as a whole. A new cron or timezone, or a resume,
    sets the next run to the first occurrence after now: runs missed while paused are
    not made up."""
    now = now or utcnow()
    schedule = get_schedule(session, schedule_id, viewer)
    if not isinstance(patch, dict):
        raise SpecError("the body must be a JSON object", {"body": "must be an object"})
    unknown = sorted(set(patch) - set(EDITABLE))
    if unknown:
        raise SpecError(f"unknown fields: {', '.join(unknown)}", {k: "unknown field" for k in unknown})
    current = {name: getattr(schedule, name) for name in EDITABLE}
    if "webhook_url" in patch and patch["webhook_url"] is None:  # removing the webhook removes its settings
        current.update(webhook_events=None, webhook_secret=None)
    fields = validate_schedule(session, {**current, **patch}, settings, _owner(session, schedule), now)
    timing_changed = (fields.cron, fields.timezone) != (schedule.cron, schedule.timezone)
    resumed = fields.enabled and not schedule.enabled
    for name, value in fields.model_dump(mode="json").items():
        setattr(schedule, name, value)
    if not fields.enabled:
        schedule.next_run_at, schedule.held_since = None, None
    elif timing_changed or resumed or schedule.next_run_at is None:
        schedule.next_run_at, schedule.held_since = next_after(fields.cron, fields.timezone, now), None
    session.flush()
    return schedule


def delete_schedule(session: Session, schedule_id: str, viewer: User | None = None) -> None:
    """Delete the schedule; its jobs stay, with `schedule_id` cleared."""
    schedule = get_schedule(session, schedule_id, viewer)
    session.execute(update(Job).where(Job.schedule_id == schedule_id).values(schedule_id=None))
    session.delete(schedule)


def list_schedules(session: Session, limit: int = 50, offset: int = 0,
                   viewer: User | None = None) -> tuple[list[Schedule], int]:
    query = auth.visible(select(Schedule), Schedule, viewer)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Schedule.created_at.desc(), Schedule.id).limit(limit).offset(offset))
    return list(rows), total


def schedule_jobs(session: Session, schedule_id: str, limit: int = 50, offset: int = 0,
                  viewer: User | None = None) -> tuple[list[Job], int]:
    get_schedule(session, schedule_id, viewer)
    query = select(Job).where(Job.schedule_id == schedule_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset))
    return list(rows), total


def run_now(factory: sessionmaker[Session], producer: Celery, settings: Settings, schedule_id: str,
            now: datetime | None = None, viewer: User | None = None) -> Job:
    """Enqueue the schedule's job at once, as an extra occurrence at `now`. It does not
    move the schedule's next run, and runs even while paused or at max_concurrent: the
    user asked for it. It goes through the job door as any job does (a kind switched off
    since, a reference gone, the owner's quota: SpecError or QuotaExceeded)."""
    now = now or utcnow()
    with factory() as session:
        schedule = get_schedule(session, schedule_id, viewer)
        try:
            job = jobs.create(session, settings, schedule.kind, schedule.params, schedule.priority,
                              _owner(session, schedule), webhooks.inherited(schedule), schedule_id=schedule.id,
                              scheduled_for=now)
        except SpecError as exc:
            raise template_error(exc) from None
        schedule.last_run_at, schedule.last_job_id = now, job.id
        session.commit()
    jobs.publish(factory, producer, job)
    return job


# ------------------------------------------------------------------ the tick
def _lock_for_tick(session: Session) -> None:
    """SQLite: take the single-writer lock before reading, so two ticks never interleave."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("BEGIN IMMEDIATE"))


def _due(session: Session, now: datetime, skip: set[str]):
    query = (
        select(Schedule)
        .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now, Schedule.id.not_in(skip))
        .order_by(Schedule.next_run_at, Schedule.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return session.scalars(query).first()


def _skip(schedule: Schedule, reason: str, next_run: datetime) -> None:
    log.info("schedule %s (%s): skipping: %s", schedule.id, schedule.name, reason)
    schedule.skipped_runs += 1
    schedule.last_skip_reason = reason
    schedule.next_run_at = next_run
    schedule.held_since = None


def fire(session: Session, schedule: Schedule, now: datetime, settings: Settings) -> Job | None:
    """Decide what the due `schedule` does at `now`; return the job it enqueues, if any.
    The caller holds the row's lock and commits."""
    grace_s = settings.schedule_grace_s
    due_at = schedule.next_run_at
    latest = latest_at_or_before(schedule.cron, schedule.timezone, now)
    upcoming = next_after(schedule.cron, schedule.timezone, now)
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.schedule_id == schedule.id, Job.status.in_(ACTIVE))
    ) or 0
    if active >= schedule.max_concurrent:
        if schedule.overlap == Overlap.QUEUE.value:
            schedule.held_since = schedule.held_since or now  # still due: enqueued once a slot frees
            return None
        _skip(schedule, f"{active} job(s) still queued or running (max_concurrent {schedule.max_concurrent})",
              upcoming)
        return None
    late_s = (now - latest).total_seconds()
    held = schedule.held_since is not None
    if not held and late_s > grace_s and schedule.missed_runs == MissedRuns.SKIP.value:
        _skip(schedule, f"missed the run due {latest.isoformat()} ({late_s:.0f} s late; missed_runs=skip)", upcoming)
        return None
    try:
        job = jobs.create(session, settings, schedule.kind, schedule.params, schedule.priority,
                          _owner(session, schedule), webhooks.inherited(schedule), resolve_webhook=False,
                          schedule_id=schedule.id, scheduled_for=latest)
    except SpecError as exc:  # the template no longer passes: an upload deleted, a spec changed, a kind off
        _skip(schedule, str(template_error(exc)), upcoming)
        return None
    except QuotaExceeded as exc:
        _skip(schedule, f"quota: {exc}", upcoming)
        return None
    if latest > due_at:
        log.info("schedule %s: one job for the occurrences %s .. %s", schedule.id, due_at.isoformat(),
                 latest.isoformat())
    schedule.last_run_at, schedule.last_job_id = latest, job.id
    schedule.next_run_at, schedule.held_since = upcoming, None
    return job


def tick(factory: sessionmaker[Session], producer: Celery, settings: Settings,
         now: datetime | None = None) -> list[Job]:
    """Enqueue every due schedule's occurrence; return the jobs made. One transaction
    per schedule: the job row and the advanced `next_run_at` commit together, and the
    job is published after the commit."""
    now = now or utcnow()
    made: list[Job] = []
    seen: set[str] = set()
    for _ in range(MAX_SCHEDULES_PER_TICK):
        with factory() as session:
            _lock_for_tick(session)
            schedule = _due(session, now, seen)
            if schedule is None:
                session.rollback()
                break
            seen.add(schedule.id)
            # Compare-and-set on the next_run_at this tick read: the row is now this
            # transaction's until it commits, and no other tick has moved it meanwhile.
            claimed = session.execute(
                update(Schedule)
                .where(Schedule.id == schedule.id, Schedule.next_run_at == schedule.next_run_at)
                .values(updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not claimed:
                session.rollback()
                continue
            try:
                job = fire(session, schedule, now, settings)
                session.commit()
            except IntegrityError:  # this occurrence's job exists: another tick made it
                session.rollback()
                continue
        if job is not None:
            jobs.publish(factory, producer, job)
            made.append(job)
    return made
