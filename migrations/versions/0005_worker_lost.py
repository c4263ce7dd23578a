"""jobs: worker_lost (dead workers so far; fail at max_attempts) and publish_count (re-publish backoff)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker_lost', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('publish_count', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('publish_count')
        batch_op.drop_column('worker_lost')
