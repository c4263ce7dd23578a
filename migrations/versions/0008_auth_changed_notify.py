"""users, api_tokens: NOTIFY diffqueue_auth when a token or a user changes

Each web process keeps the users of recently seen tokens (`web/cache.py`), so a
request costs no sign-in query. These triggers tell every process, on commit, that a
token was revoked or a user changed or went, whoever wrote it (the web, the CLI, SQL by
hand), and the processes drop what they kept. A token's last use (`last_used_at`) is
not such a change. PostgreSQL only: the embedded SQLite mode keeps nothing.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

CHANNEL = 'diffqueue_auth'


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f"""
        CREATE FUNCTION diffqueue_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER api_tokens_auth_changed
        AFTER UPDATE OF revoked_at, token_hash, user_id OR DELETE OR TRUNCATE ON api_tokens
        FOR EACH STATEMENT EXECUTE FUNCTION diffqueue_auth_changed()
    """)
    op.execute("""
        CREATE TRIGGER users_auth_changed
        AFTER UPDATE OR DELETE OR TRUNCATE ON users
        FOR EACH STATEMENT EXECUTE FUNCTION diffqueue_auth_changed()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute('DROP TRIGGER users_auth_changed ON users')
    op.execute('DROP TRIGGER api_tokens_auth_changed ON api_tokens')
    op.execute('DROP FUNCTION diffqueue_auth_changed()')
