"""jobs: indexes for the jobs list, newest first (all jobs, and one owner's)

Without them every list request sorts the whole table (bench/queue.py: 5.8 ms at
10,000 jobs, growing with the table) to return 50 rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_created', 'jobs', ['created_at'])
    op.create_index('ix_jobs_owner_created', 'jobs', ['owner_id', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_owner_created', table_name='jobs')
    op.drop_index('ix_jobs_created', table_name='jobs')
