"""The job lifecycle: submit (commit, then publish), cancel, retry, claim and finish.

Every function here takes the session or sessionmaker it works with; the rules
for which status may follow which live here and nowhere else.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, joinedload, sessionmaker

from shared import auth, webhooks
from shared.broker import MAX_PRIORITY, RUN_JOB_TASK
from shared.config import Settings
from shared.db import session_scope
from shared.errors import InvalidTransition, JobNotFound
from shared.models import Artifact, Job, JobStatus, User, utcnow
from shared.specs import KINDS, validate_params
from shared.uploads import check_upload_refs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ client side
def submit(
    factory: sessionmaker[Session],
    producer: Celery,
    kind: str,
    params: Any,
    priority: int = 0,
    owner: User | None = None,
    max_queued: int | None = None,
    **fields: Any,
) -> Job:
    """Validate, insert a queued row, commit, then publish. The row is the truth:
    if the publish fails, the row stays queued with no `published_at`. An
    `upload:<id>` or `job:<id>` param must name one the owner may see (checked in the
    same transaction, so a bad reference creates no job), and with `max_queued` the
    owner may not have more queued jobs than that (QuotaExceeded)."""
    with session_scope(factory) as session:
        auth.check_quota(session, owner, max_queued)
        job = add_job(session, kind, params, priority, owner=owner, **fields)
    publish(factory, producer, job)
    return job


def add_job(
    session: Session, kind: str, params: Any, priority: int = 0, owner: User | None = None, **fields: Any
) -> Job:
    """Validate and add a queued row to `session` (not committed, not published), owned
    by `owner`. `fields` are further columns, such as a schedule's `schedule_id`."""
    values = validate_params(kind, params).model_dump(mode="json")
    check_upload_refs(session, KINDS[kind].spec, values, owner)
    auth.check_job_refs(session, values, owner)
    job = Job(kind=kind, params=values, priority=priority, queue=KINDS[kind].queue, status=JobStatus.QUEUED.value,
              owner_id=auth.owner_id_of(owner), **fields)
    session.add(job)
    session.flush()  # the id, and a unique-constraint violation, now rather than at commit
    return job


def publish(factory: sessionmaker[Session], producer: Celery, job: Job) -> bool:
    try:
        producer.send_task(
            RUN_JOB_TASK,
            args=[job.id],
            queue=job.queue,
            priority=max(0, min(MAX_PRIORITY, job.priority)),
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception:  # the broker is down: the row stays queued for a later publish
        log.exception("publishing job %s failed; it stays queued", job.id)
        return False
    now = utcnow()
    with session_scope(factory) as session:
        session.execute(
            update(Job).where(Job.id == job.id).values(published_at=now, publish_count=Job.publish_count + 1)
        )
    job.published_at = now
    return True


def get_job(session: Session, job_id: str, viewer: User | None = None, artifacts: bool = False) -> Job:
    """The job, if `viewer` may see it (None: anyone may); JobNotFound otherwise. Its owner
    comes in the same query (the job's JSON names it), and so do its artifacts if asked."""
    options = [joinedload(Job.owner)] + ([joinedload(Job.artifacts)] if artifacts else [])
    job = session.get(Job, job_id, options=options)
    if job is None or not auth.can_see(job.owner_id, viewer):
        raise JobNotFound(f"no job with id {job_id!r}")
    return job


def list_jobs(
    session: Session,
    status: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    offset: int = 0,
    viewer: User | None = None,
) -> tuple[list[Job], int]:
    query = auth.visible(select(Job), Job, viewer)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), total or 0


def cancel(session: Session, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next step."""
    job = get_job(session, job_id)
    status = job.job_status
    if status.is_finished:
        raise InvalidTransition(f"job {job_id} is already {status.value}; only queued or running jobs can be cancelled")
    if status is JobStatus.QUEUED:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=utcnow())
        ).rowcount
        if done:
            webhooks.job_event(session, job_id, "completed")  # committed by the caller, with the cancel
            session.refresh(job)
            return job
    # Running (or claimed between our read and the update above).
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    session.refresh(job)
    return job


def retry(session: Session, job_id: str, viewer: User | None = None, max_queued: int | None = None) -> Job:
    """Put a failed or cancelled job back in the queue. Artifacts are kept: the run
    overwrites them (keys are deterministic) and training can resume from them.
    `viewer` must be able to see the job (else JobNotFound), and is held to `max_queued`."""
    job = get_job(session, job_id, viewer)
    auth.check_quota(session, viewer, max_queued)
    if not job.job_status.can_retry:
        raise InvalidTransition(f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried")
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]))
        .values(
            status=JobStatus.QUEUED.value,
            cancel_requested=False,
            error=None,
            traceback=None,
            finished_at=None,
            published_at=None,
            progress_step=0,
            progress_message="retry queued",
        )
    )
    session.refresh(job)
    return job


def retry_and_publish(factory: sessionmaker[Session], producer: Celery, job_id: str, viewer: User | None = None,
                      max_queued: int | None = None) -> None:
    """`retry`, committed, then published: the row first, as in `submit`."""
    with factory() as session:
        job = retry(session, job_id, viewer, max_queued)
        session.commit()
    publish(factory, producer, job)


# ------------------------------------------------------------------ worker side
def claim(session: Session, job_id: str, worker: str, lease_s: float, max_attempts: int = 3) -> int | None:
    """Atomically move a queued job to running under a lease of `lease_s` seconds.

    A running job whose lease has expired (its worker died, the broker delivered the
    message again) is first recovered as the reaper would (`recover_lost`): queued
    again, or failed at `max_attempts`. Returns the fencing token (the new attempt
    number), or None when the job is not claimable: a duplicate delivery while the
    lease is live, a finished or cancelled job, or an unknown id."""
    now = utcnow()
    job = session.get(Job, job_id)
    if job is not None and job.status == JobStatus.RUNNING.value and job.lease_expires_at and job.lease_expires_at < now:
        recover_lost(session, job, now, max_attempts)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING.value,
            attempt=Job.attempt + 1,
            worker=worker,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=now,
            progress_started_at=now,
            progress_step=0,
            progress_message="starting",
        )
    )
    if result.rowcount == 1:
        webhooks.job_event(session, job_id, "started", now)
    session.commit()
    if result.rowcount != 1:
        return None
    return session.scalar(select(Job.attempt).where(Job.id == job_id))


def recover_lost(session: Session, job: Job, now: datetime, max_attempts: int) -> JobStatus | None:
    """A running job whose lease expired lost its worker: put it back in the queue
    (unpublished: the caller publishes), or fail it once that has happened
    `max_attempts` times. Fenced on the attempt read, so two recoverers act once.
    Returns the new status, or None when another recoverer got there first."""
    lost = job.worker_lost + 1
    if lost >= max_attempts:
        values = {
            "status": JobStatus.FAILED.value, "finished_at": now,
            "error": f"worker lost {lost} times (max_attempts {max_attempts}); the last was {job.worker}",
        }
    else:
        values = {
            "status": JobStatus.QUEUED.value, "published_at": None,
            "progress_message": f"re-queued: worker {job.worker} lost (lease expired)",
        }
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value, Job.attempt == job.attempt,
               Job.lease_expires_at < now)
        .values(worker_lost=lost, worker=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        return None
    if values["status"] == JobStatus.FAILED.value:
        webhooks.job_event(session, job.id, "completed", now)
    log.warning("job %s: worker %s lost (%d of %d); %s", job.id, job.worker, lost, max_attempts, values["status"])
    return JobStatus(values["status"])


def renew_lease(session: Session, job_id: str, token: int, lease_s: float) -> bool:
    """The heartbeat: push the lease forward. False once this execution lost the job."""
    ok = session.execute(
        update(Job).where(*_owned(job_id, token)).values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    ).rowcount == 1
    session.commit()
    return ok


def _owned(job_id: str, token: int):
    return (Job.id == job_id, Job.attempt == token, Job.status == JobStatus.RUNNING.value)


def report_progress(
    session: Session, job_id: str, token: int, step: int, total: int | None, message: str | None,
    new_phase: bool = False, webhook_progress_interval_s: float = Settings.webhook_progress_interval_s,
) -> bool:
    values: dict[str, Any] = {"progress_step": step, "progress_total": total, "progress_message": message}
    if new_phase:
        values["progress_started_at"] = utcnow()
    ok = session.execute(update(Job).where(*_owned(job_id, token)).values(**values)).rowcount == 1
    if ok:
        webhooks.job_event(session, job_id, "progress", progress_interval_s=webhook_progress_interval_s)
    session.commit()
    return ok


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_artifact(
    session: Session, job_id: str, token: int, name: str, kind: str, content_type: str, size: int, sha256: str,
    meta: dict | None = None,
) -> bool:
    """Insert or replace the artifact row, if this execution still owns the job."""
    owned = session.scalar(select(func.count()).select_from(Job).where(*_owned(job_id, token)))
    if not owned:
        session.rollback()
        return False
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    session.add(
        Artifact(
            job_id=job_id, name=name, kind=kind, content_type=content_type, size=size, sha256=sha256,
            meta=meta or {},
        )
    )
    session.commit()
    return True


def delete_artifact(session: Session, job_id: str, token: int, name: str) -> bool:
    """Drop an artifact row (an old checkpoint), if this execution still owns the job."""
    owned = session.scalar(select(func.count()).select_from(Job).where(*_owned(job_id, token)))
    if owned:
        session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    session.commit()
    return bool(owned)


def finish(
    session: Session,
    job_id: str,
    token: int,
    status: JobStatus,
    result: dict | None = None,
    error: str | None = None,
    traceback: str | None = None,
) -> bool:
    """Record the outcome, conditional on the token. Returns False for a stale execution."""
    assert status.is_finished, status
    values: dict[str, Any] = {
        "status": status.value, "finished_at": utcnow(), "lease_expires_at": None, "error": error, "traceback": traceback,
    }
    if result is not None:
        values["result"] = result
    ok = session.execute(update(Job).where(*_owned(job_id, token)).values(**values)).rowcount == 1
    if ok:
        webhooks.job_event(session, job_id, "completed")
    session.commit()
    return ok


def release(session: Session, job_id: str, token: int, message: str) -> bool:
    """Hand a running job back to the queue (its worker is shutting down). The
    caller publishes it again; the next claim increments the attempt."""
    ok = session.execute(
        update(Job)
        .where(*_owned(job_id, token))
        .values(status=JobStatus.QUEUED.value, worker=None, lease_expires_at=None, published_at=None,
                progress_message=message)
    ).rowcount == 1
    session.commit()
    return ok


def eta_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Remaining time, extrapolated from the current phase's rate so far."""
    return eta(*eta_inputs(job), now)


def eta_inputs(job: Job) -> tuple:
    """What `eta` needs of a job: kept with a job's cached JSON, whose ETA is of its moment."""
    return job.job_status, job.progress_step, job.progress_total, job.progress_started_at or job.started_at


def eta(status: JobStatus, step: int | None, total: int | None, start: datetime | None,
        now: datetime | None = None) -> float | None:
    if status is not JobStatus.RUNNING or not total or not step or start is None:
        return None
    elapsed = ((now or utcnow()) - start).total_seconds()
    return round(max(0.0, elapsed / step * (total - step)), 1)
