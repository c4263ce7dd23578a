"""Retention: finished jobs older than `retention_days` are deleted with their artifacts,
and so are old uploads nothing refers to any more. Run by beat every
`retention_interval_s` (shared/beat.py); `retention_days` 0 keeps everything.

- A job is deleted when it finished (succeeded, failed or cancelled) more than
  `retention_days` ago and is not pinned. Its storage objects (`jobs/<id>/...`) go
  first; its row (with its artifact rows and webhook deliveries, by cascade) only once
  the prefix lists empty. A failed delete leaves the row, so the job still shows (and
  the next run tries again) rather than its objects staying behind unlisted.
- A job that a queued or running job, or any schedule (paused ones too: they may be
  resumed), names as `job:<id>` (a model, or `job:<id>/<artifact>` an init image) is
  kept while they do, and listed in the summary.
- An upload is deleted when it is older than `retention_days` and no job row (of any
  status: a job still listed can be retried) and no schedule names it as `upload:<id>`.
  Deleting its last jobs frees it, in the same run.

Each deletion locks its row and checks the conditions again first, so a job pinned,
retried or newly referenced since it was chosen is left alone. (A submit naming it in
the same instant can still slip by: its reference check reads the row without a lock.)
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterator

from sqlalchemy import Text, and_, cast, delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared import idempotency, jobs
from shared.config import Settings
from shared.db import session_scope
from shared.models import FINISHED, Job, JobStatus, Schedule, Upload, User, utcnow
from shared.storage import Storage, upload_key

log = logging.getLogger(__name__)

BATCH = 200
FINISHED_VALUES = sorted(s.value for s in FINISHED)
UNFINISHED_VALUES = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
# `job:<id>` (a model) or `job:<id>/<artifact>` (an init image): see MODEL_REF_PATTERN and
# INIT_IMAGE_PATTERN in shared/specs.py.
JOB_REF = re.compile(r"job:([0-9a-f]{32})(?:/.*)?", re.DOTALL)
UPLOAD_REF = re.compile(r"upload:([0-9a-f]{32})")


@dataclass
class Cleanup:
    """What one run did. `in_use`: jobs past retention kept because these refer to them
    (`job:<id>` of a queued or running job, `schedule:<id>`). `failed`: `job:<id>` or
    `upload:<id>` whose storage objects could not be deleted (its row is kept), and why.
    `more`: the run stopped at its time budget with candidates left."""

    deleted_jobs: list[str] = field(default_factory=list)
    deleted_uploads: list[str] = field(default_factory=list)
    in_use: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    more: bool = False


def expires_at(job: Job, retention_days: float) -> datetime | None:
    """When retention would delete the job (at the first run after this time, unless a
    queued job or a schedule still uses it); None when it never would: pinned,
    unfinished, or retention off."""
    if retention_days <= 0 or job.pinned or job.finished_at is None or not job.job_status.is_finished:
        return None
    return job.finished_at + timedelta(days=retention_days)


def set_pinned(session: Session, job_id: str, pinned: bool, viewer: User | None = None) -> Job:
    """Pin (keep until unpinned) or unpin a job that `viewer` may see (JobNotFound
    otherwise); the caller commits."""
    job = jobs.get_job(session, job_id, viewer)
    job.pinned = pinned
    session.flush()
    return job


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _names(params: Any, pattern: re.Pattern, target: str) -> bool:
    return any((m := pattern.fullmatch(s)) and m.group(1) == target for s in _strings(params))


def _referrers(session: Session, ref: str, pattern: re.Pattern, target: str, job_statuses: list[str] | None) -> list[str]:
    """Jobs (of `job_statuses`; None: all) and schedules whose params name `target`. The
    LIKE narrows it in the database; the params are then parsed, so a prompt that merely
    mentions the text does not count."""
    like = f"%{ref}%"
    jobs_query = select(Job.id, Job.params).where(cast(Job.params, Text).like(like))
    if job_statuses is not None:
        jobs_query = jobs_query.where(Job.status.in_(job_statuses))
    found = [f"job:{jid}" for jid, params in session.execute(jobs_query) if _names(params, pattern, target)]
    found += [
        f"schedule:{sid}"
        for sid, params in session.execute(select(Schedule.id, Schedule.params).where(cast(Schedule.params, Text).like(like)))
        if _names(params, pattern, target)
    ]
    return sorted(found)


def _delete_prefix(storage: Storage, prefix: str) -> None:
    """Delete every object under `prefix`, then list it: a backend that skips objects
    quietly (S3's DeleteObjects reports per-key errors in its answer; the local rmtree
    ignores errors) must not let the row go while objects remain."""
    storage.delete_prefix(prefix)
    left = storage.list(prefix)
    if left:
        raise OSError(f"{len(left)} objects still under {prefix} after deleting it, e.g. {left[0]}")


def _delete_job(factory: sessionmaker[Session], storage: Storage, job_id: str, cutoff: datetime, out: Cleanup) -> None:
    with factory() as session:
        # Locked, and the conditions checked again: a pin, a retry or a claim since the
        # candidates were listed waits for this transaction or wins it.
        job = session.scalars(
            select(Job).where(Job.id == job_id, Job.status.in_(FINISHED_VALUES), Job.finished_at < cutoff,
                              Job.pinned.is_(False)).with_for_update()
        ).one_or_none()
        if job is None:
            return
        users = _referrers(session, f"job:{job_id}", JOB_REF, job_id, UNFINISHED_VALUES)
        if users:
            out.in_use[job_id] = users
            return
        try:
            _delete_prefix(storage, f"jobs/{job_id}")
        except Exception as exc:
            session.rollback()
            out.failed[f"job:{job_id}"] = f"{type(exc).__name__}: {exc}"
            log.exception("retention: deleting the objects of job %s failed; its row is kept", job_id)
            return
        session.execute(delete(Job).where(Job.id == job_id))  # artifacts and webhook deliveries cascade
        session.commit()
        out.deleted_jobs.append(job_id)


def _delete_upload(factory: sessionmaker[Session], storage: Storage, upload_id: str, cutoff: datetime,
                   out: Cleanup) -> None:
    with factory() as session:
        upload = session.scalars(
            select(Upload).where(Upload.id == upload_id, Upload.created_at < cutoff).with_for_update()
        ).one_or_none()
        if upload is None or _referrers(session, f"upload:{upload_id}", UPLOAD_REF, upload_id, None):
            return
        try:
            key = upload_key(upload_id)
            storage.delete(key)
            if storage.exists(key):
                raise OSError(f"{key} still exists after deleting it")
        except Exception as exc:
            session.rollback()
            out.failed[f"upload:{upload_id}"] = f"{type(exc).__name__}: {exc}"
            log.exception("retention: deleting the object of upload %s failed; its row is kept", upload_id)
            return
        session.execute(delete(Upload).where(Upload.id == upload_id))
        session.commit()
        out.deleted_uploads.append(upload_id)


def _candidates(factory: sessionmaker[Session], id_col, order_col, *where) -> Iterator[str]:
    """Ids by `order_col` (a time), then id, a batch at a time. Keyset paging: rows kept
    (in use, failed) are passed over rather than read again."""
    after = None
    while True:
        query = select(id_col, order_col).where(*where)
        if after is not None:
            query = query.where(or_(order_col > after[0], and_(order_col == after[0], id_col > after[1])))
        with factory() as session:
            rows = session.execute(query.order_by(order_col, id_col).limit(BATCH)).all()
        yield from (row_id for row_id, _ in rows)
        if len(rows) < BATCH:
            return
        after = (rows[-1][1], rows[-1][0])


def cleanup(factory: sessionmaker[Session], storage: Storage, settings: Settings, now: datetime | None = None,
            budget_s: float | None = None) -> Cleanup:
    """Delete what retention says is due at `now` (see the module doc); stop after
    `budget_s` seconds with `more` set, so beat can run again at once without holding
    its other work back."""
    out = Cleanup()
    now = now or utcnow()
    with session_scope(factory) as session:  # Idempotency-Keys past their window, whatever retention keeps
        idempotency.forget_old(session, now)
    if settings.retention_days <= 0:
        return out
    cutoff = now - timedelta(days=settings.retention_days)
    deadline = None if budget_s is None else time.monotonic() + budget_s

    def spent() -> bool:
        if deadline is not None and time.monotonic() >= deadline:
            out.more = True
        return out.more

    old_jobs = (Job.status.in_(FINISHED_VALUES), Job.finished_at < cutoff, Job.pinned.is_(False))
    for job_id in _candidates(factory, Job.id, Job.finished_at, *old_jobs):
        if spent():
            break
        _delete_job(factory, storage, job_id, cutoff, out)
    for upload_id in () if out.more else _candidates(factory, Upload.id, Upload.created_at, Upload.created_at < cutoff):
        if spent():
            break
        _delete_upload(factory, storage, upload_id, cutoff, out)

    if out.deleted_jobs or out.deleted_uploads or out.failed:
        log.info("retention: deleted %d jobs and %d uploads finished/uploaded before %s; %d failed (rows kept)",
                 len(out.deleted_jobs), len(out.deleted_uploads), cutoff.isoformat(), len(out.failed))
    for job_id, users in out.in_use.items():
        log.info("retention: job %s is past retention but kept: used by %s", job_id, ", ".join(users))
    return out
