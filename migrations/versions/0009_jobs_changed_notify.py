"""jobs, artifacts: NOTIFY diffqueue_jobs with the job's id when a job or its artifacts change

Each web process keeps jobs' JSON for the endpoint clients poll (`web/cache.py`). These
triggers tell every process, on commit, which job changed (status, progress, lease,
pin, an artifact added or deleted), whoever wrote it, and the processes drop what they
kept of it. After a TRUNCATE the payload is '*': all of it. PostgreSQL only: the
embedded SQLite mode keeps nothing.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

CHANNEL = 'diffqueue_jobs'


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f"""
        CREATE FUNCTION diffqueue_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_LEVEL = 'STATEMENT' THEN
                PERFORM pg_notify('{CHANNEL}', '*');
            ELSIF TG_TABLE_NAME = 'jobs' THEN
                PERFORM pg_notify('{CHANNEL}', OLD.id);
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('{CHANNEL}', OLD.job_id);
            ELSE
                PERFORM pg_notify('{CHANNEL}', NEW.job_id);
                IF TG_OP = 'UPDATE' AND NEW.job_id IS DISTINCT FROM OLD.job_id THEN
                    PERFORM pg_notify('{CHANNEL}', OLD.job_id);
                END IF;
            END IF;
            RETURN NULL;
        END $$
    """)
    # A new job has nothing kept of it yet: updates and deletes only.
    op.execute("""
        CREATE TRIGGER jobs_changed AFTER UPDATE OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION diffqueue_job_changed()
    """)
    op.execute("""
        CREATE TRIGGER artifacts_changed AFTER INSERT OR UPDATE OR DELETE ON artifacts
        FOR EACH ROW EXECUTE FUNCTION diffqueue_job_changed()
    """)
    for table in ('jobs', 'artifacts'):
        op.execute(f"""
            CREATE TRIGGER {table}_truncated AFTER TRUNCATE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION diffqueue_job_changed()
        """)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table in ('jobs', 'artifacts'):
        op.execute(f'DROP TRIGGER {table}_truncated ON {table}')
    op.execute('DROP TRIGGER artifacts_changed ON artifacts')
    op.execute('DROP TRIGGER jobs_changed ON jobs')
    op.execute('DROP FUNCTION diffqueue_job_changed()')
