"""The job lifecycle: submit (commit, then publish), cancel, retry, claim and finish.

Every function here takes the session or sessionmaker it works with; the rules
for which status may follow which live here and nowhere else.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Mapping

from celery import Celery
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, joinedload, sessionmaker

from shared import auth, idempotency, model_refs, outcomes, webhooks
from shared.broker import RUN_JOB_TASK, broker_priority
from shared.config import Settings
from shared.db import session_scope
from shared.errors import InvalidTransition, JobNotFound, SpecError, UnknownKind
from shared.models import Artifact, Job, JobStatus, User, utcnow
from shared.specs import KINDS, check_kind_enabled, listed_kinds, validate_params, validate_priority
from shared.uploads import check_upload_refs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the one door
def admit(
    session: Session,
    settings: Settings,
    kind: Any,
    params: Any,
    priority: Any = 0,
    owner: User | None = None,
    webhook: Mapping[str, Any] | None = None,
    pending: frozenset[str] = frozenset(),
    quota: bool = True,
    resolve_webhook: bool = True,
) -> tuple[dict, int, dict]:
    """Whether a job of `kind` with `params` may be queued for `owner`, asked the same way
    whoever asks (the API, the form, a schedule's tick and run-now, retry). Returns the
    validated params, the priority and the webhook columns; raises SpecError (naming the
    field and the bound) or QuotaExceeded, having written nothing.

    In order: the kind known and enabled; the params valid for its spec; each model or
    dataset reference allowed (a folder under the models dir, or a hub id the allowlist
    permits); each `upload:<id>` and `job:<id>` one the owner may see; the webhook fields;
    the priority; then (`quota`) the owner's queued jobs under the cap, with the owner's
    row locked so two submits at once cannot both pass. `pending` names upload fields
    whose file is not stored yet (the form checks everything before it stores a file);
    `resolve_webhook` False checks a webhook URL's form but not its host's addresses
    (a schedule's tick: every send checks them again)."""
    if not isinstance(kind, str):
        reason = f"required: a string, one of {', '.join(listed_kinds())}"
        raise UnknownKind(f"kind: {reason}", {"kind": reason})
    check_kind_enabled(kind, settings)
    values = validate_params(kind, params).model_dump(mode="json")
    problems = model_refs.ref_problems(kind, values, settings)
    if problems:
        raise SpecError(f"invalid params for {kind}: " + "; ".join(f"{k}: {v}" for k, v in problems.items()), problems)
    visible = {name: value for name, value in values.items() if name not in pending}
    check_upload_refs(session, KINDS[kind].spec, visible, owner)
    auth.check_job_refs(session, visible, owner)
    hook = webhooks.validate_fields(webhook or {}, settings, resolve=resolve_webhook)
    priority = validate_priority(priority)
    if quota:
        auth.check_quota(session, owner, settings.max_queued_per_user)
    return values, priority, hook


def create(
    session: Session,
    settings: Settings,
    kind: Any,
    params: Any,
    priority: Any = 0,
    owner: User | None = None,
    webhook: Mapping[str, Any] | None = None,
    resolve_webhook: bool = True,
    **columns: Any,
) -> Job:
    """The only way a job row is made: `admit`, then a queued row added to `session` (not
    committed, not published: the caller commits, then `publish`es). `columns` are
    further columns, such as a schedule's `schedule_id` and `scheduled_for`."""
    values, priority, hook = admit(session, settings, kind, params, priority, owner, webhook,
                                   resolve_webhook=resolve_webhook)
    job = Job(kind=kind, params=values, priority=priority, queue=KINDS[kind].queue, status=JobStatus.QUEUED.value,
              owner_id=auth.owner_id_of(owner), **hook, **columns)
    session.add(job)
    session.flush()  # the id, and a unique-constraint violation, now rather than at commit
    return job


def submit(
    factory: sessionmaker[Session],
    producer: Celery,
    settings: Settings,
    kind: Any,
    params: Any,
    priority: Any = 0,
    owner: User | None = None,
    webhook: Mapping[str, Any] | None = None,
    idempotency_claim: idempotency.Claim | None = None,
    **columns: Any,
) -> Job:
    """`create`, committed, then published. The row is the truth: if the publish fails,
    the row stays queued with no `published_at` and the reaper publishes it later. An
    Idempotency-Key's claim is written in the same transaction as the job."""
    with session_scope(factory) as session:
        job = create(session, settings, kind, params, priority, owner, webhook, **columns)
        idempotency.record(session, idempotency_claim, job.id)
    publish(factory, producer, job)
    return job


def publish(factory: sessionmaker[Session], producer: Celery, job: Job) -> bool:
    try:
        producer.send_task(
            RUN_JOB_TASK,
            args=[job.id],
            queue=job.queue,
            priority=broker_priority(job.priority, producer.conf.broker_url),
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
        now = utcnow()
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now)
        ).rowcount
        if done:
            # Committed by the caller, with the cancel.
            outcomes.count_finish(session, job_id, JobStatus.CANCELLED.value, now)
            webhooks.job_event(session, job_id, "completed")
            session.refresh(job)
            return job
    # Running (or claimed between our read and the update above).
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    session.refresh(job)
    return job


def retry(session: Session, settings: Settings, job_id: str, viewer: User | None = None) -> Job:
    """Put a failed or cancelled job back in the queue, through the same checks as a new
    job (`admit`, for the job's owner: its kind still enabled, its references still
    there and allowed, the owner under the quota). Artifacts are kept: the run overwrites
    them (keys are deterministic) and training can resume from them. `viewer` must be
    able to see the job (else JobNotFound)."""
    job = get_job(session, job_id, viewer)
    if not job.job_status.can_retry:
        raise InvalidTransition(f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried")
    admit(session, settings, job.kind, job.params, job.priority, job.owner, webhooks.inherited(job))
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]))
        .values(
            status=JobStatus.QUEUED.value,
            cancel_requested=False,
            error=None,
            traceback=None,
            result=None,  # the last attempt's: the job's page would show it as this one's
            finished_at=None,
            published_at=None,
            progress_step=0,
            progress_message="retry queued",
        )
    )
    session.refresh(job)
    return job


def retry_and_publish(factory: sessionmaker[Session], producer: Celery, settings: Settings, job_id: str,
                      viewer: User | None = None) -> None:
    """`retry`, committed, then published: the row first, as in `submit`."""
    with factory() as session:
        job = retry(session, settings, job_id, viewer)
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
        outcomes.count_finish(session, job.id, JobStatus.FAILED.value, now)
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
    now = utcnow()
    values: dict[str, Any] = {
        "status": status.value, "finished_at": now, "lease_expires_at": None, "error": error, "traceback": traceback,
    }
    if result is not None:
        values["result"] = result
    ok = session.execute(update(Job).where(*_owned(job_id, token)).values(**values)).rowcount == 1
    if ok:
        outcomes.count_finish(session, job_id, status.value, now)
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
