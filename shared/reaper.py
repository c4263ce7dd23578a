"""The reaper: the database row is the truth and the broker a hint, so what the broker
loses is found here and published again. Run by beat on each tick (shared/beat.py).

- A running job whose lease expired lost its worker (SIGKILL, power loss, OOM): it is
  queued again and published, or failed with "worker lost N times" at max_attempts
  (`jobs.recover_lost`). Training resumes from its last complete checkpoint.
- A queued job that no worker claimed is published again: never published (the
  broker was down at submit: the row is an outbox), or published republish_after_s
  ago and still waiting (a broker restart without persistence lost the message),
  backing off x2 per publish up to an hour. A duplicate message is harmless: the
  claim is idempotent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared import jobs
from shared.config import Settings
from shared.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

BATCH = 200
# A row just committed by submit is published a moment later: leave it that moment.
UNPUBLISHED_GRACE_S = 5.0
MAX_REPUBLISH_BACKOFF_S = 3600.0


@dataclass
class Reaped:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def republish_due(job: Job, now: datetime, after_s: float) -> bool:
    if job.published_at is None:
        return True
    backoff = min(after_s * 2 ** max(0, job.publish_count - 1), MAX_REPUBLISH_BACKOFF_S)
    return job.published_at + timedelta(seconds=backoff) <= now


def _locked(session: Session, query):
    return session.scalars(query.limit(BATCH).with_for_update(skip_locked=True)).all()


def reap(factory: sessionmaker[Session], producer: Celery, settings: Settings, now: datetime | None = None) -> Reaped:
    now = now or utcnow()
    out = Reaped()
    with factory() as session:
        expired = _locked(session, select(Job).where(Job.status == JobStatus.RUNNING.value,
                                                     Job.lease_expires_at < now).order_by(Job.lease_expires_at))
        for job in expired:
            status = jobs.recover_lost(session, job, now, settings.max_attempts)
            if status is JobStatus.QUEUED:
                out.requeued.append(job.id)
            elif status is JobStatus.FAILED:
                out.failed.append(job.id)
        session.commit()
    for job in expired:
        if job.id in out.requeued:
            jobs.publish(factory, producer, job)  # its queue and priority; published_at is set there

    oldest = now - timedelta(seconds=min(settings.republish_after_s, UNPUBLISHED_GRACE_S))
    with factory() as session:
        waiting = _locked(session, select(Job).where(
            Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False),
            or_(Job.published_at.is_(None), Job.published_at <= now - timedelta(seconds=settings.republish_after_s)),
            Job.updated_at <= oldest,
        ).order_by(Job.priority.desc(), Job.created_at))
        due = [job for job in waiting if republish_due(job, now, settings.republish_after_s)]
        session.commit()  # the locks were for the read; publish marks each row itself
    for job in due:
        if jobs.publish(factory, producer, job):
            out.republished.append(job.id)
    if out.requeued or out.failed or out.republished:
        log.warning("reaper: requeued %d (worker lost), failed %d (max_attempts), republished %d",
                    len(out.requeued), len(out.failed), len(out.republished))
    return out
