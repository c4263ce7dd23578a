"""users: session_epoch (sign-out and a password change end every session of the user)

A web session is a signed cookie: the server keeps nothing of it, so a copy kept by
someone else used to work until it expired, after sign-out and after a password change
too. The cookie now carries the user's epoch from sign-in, and a request whose epoch is
not the user's current one is refused (`web/auth.py`); sign-out and `set_password`
bump it. Cookies issued before this revision carry none and are refused: everyone
signs in again once. The users trigger of 0008 fires on this column like any other,
so every web process drops the user it kept and sees the new epoch at once.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('session_epoch', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('session_epoch')
