"""Counts of finished jobs that only grow: the source of GET /metrics' counter and
duration histogram (web/metrics.py), which Prometheus' rate() needs to be monotonic.

A job's rows come and go (retention deletes them), so counting rows at each scrape
would go down. Instead each finish adds one to its (kind, status, duration bucket) row
of `job_outcome_counts`, with its run time, in the transaction that records the finish:
a stale execution fenced off, or a rolled-back finish, counts nothing.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.models import Job, JobOutcomeCount

# Histogram buckets (seconds): from a quick sampling job to a day of training.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
NEVER_STARTED = -1  # the bucket of a job cancelled (or failed) before it ran


def bucket_of(seconds: float | None) -> int:
    """The index of the first bucket that holds `seconds`; len(buckets) for +Inf."""
    if seconds is None:
        return NEVER_STARTED
    return next((i for i, bound in enumerate(DURATION_BUCKETS_S) if seconds <= bound), len(DURATION_BUCKETS_S))


def count_finish(session: Session, job_id: str, status: str, finished_at: datetime) -> None:
    """Count the job `job_id`, just finished as `status` at `finished_at` in this transaction."""
    row = session.execute(select(Job.kind, Job.started_at).where(Job.id == job_id)).first()
    if row is None:
        return
    seconds = None if row.started_at is None else max(0.0, (finished_at - row.started_at).total_seconds())
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(JobOutcomeCount).values(kind=row.kind, status=status, bucket=bucket_of(seconds), count=1,
                                               sum_s=seconds or 0.0)
    session.execute(statement.on_conflict_do_update(
        index_elements=["kind", "status", "bucket"],
        set_={"count": JobOutcomeCount.count + 1, "sum_s": JobOutcomeCount.sum_s + (seconds or 0.0)},
    ))
