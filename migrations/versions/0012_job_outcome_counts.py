"""job_outcome_counts: monotonic job counters and durations for GET /metrics

The duration histogram was computed over the jobs that finished in the last 24 h: a
sliding window, which goes down as jobs leave it and so breaks Prometheus' rate(). The
counts now live in their own table, incremented in the transaction that finishes a job
(shared/jobs.py), so they only grow; retention deleting old jobs takes nothing away.
Jobs finished before this revision are counted once here, from their rows.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""
from datetime import datetime

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

# shared/metrics.py's buckets at this revision (seconds); -1 holds jobs that never started.
BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)


def upgrade() -> None:
    table = op.create_table(
        'job_outcome_counts',
        sa.Column('kind', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('bucket', sa.Integer(), nullable=False),
        sa.Column('count', sa.BigInteger(), nullable=False),
        sa.Column('sum_s', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'status', 'bucket'),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT kind, status, started_at, finished_at FROM jobs "
        "WHERE status IN ('succeeded', 'failed', 'cancelled')")).fetchall()
    counts: dict[tuple, list] = {}
    for kind, status, started, finished in rows:
        seconds = None
        if started is not None and finished is not None:
            if isinstance(started, str):  # SQLite keeps ISO text
                started, finished = datetime.fromisoformat(started), datetime.fromisoformat(finished)
            seconds = max(0.0, (finished - started).total_seconds())
        bucket = -1 if seconds is None else next((i for i, b in enumerate(BUCKETS_S) if seconds <= b), len(BUCKETS_S))
        entry = counts.setdefault((kind, status, bucket), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds or 0.0
    if counts:
        op.bulk_insert(table, [{"kind": k, "status": s, "bucket": b, "count": n, "sum_s": total}
                               for (k, s, b), (n, total) in counts.items()])


def downgrade() -> None:
    op.drop_table('job_outcome_counts')
