"""What the web keeps between requests (web/cache.py), on PostgreSQL: a token costs one
lookup and a polled job one query, and a change made elsewhere (a revoke, a user, a
job's progress or artifacts) is seen by the next request."""
from __future__ import annotations

import time
import uuid
from dataclasses import replace

import psycopg
import pytest
from sqlalchemy import delete, event, select, update

from shared import auth, jobs
from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import ApiToken, Artifact, Job, JobStatus, User, utcnow
from tests.conftest import api_token, eventually


@pytest.fixture
def setup(prod_settings):
    """An app on Postgres, a token for a new non-admin user, and the statements the
    app's engine runs against api_tokens and users."""
    from web import create_app

    app = create_app(prod_settings)
    name = f"cache-{uuid.uuid4().hex[:8]}"
    engine = make_engine(prod_settings.database_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as session:
        user = auth.create_user(session, name)
        token = auth.create_token(session, user)[1]
    lookups: list[str] = []
    app_engine = app.extensions["diffqueue"].sessions.kw["bind"]
    event.listen(app_engine, "before_cursor_execute", lambda _c, _cur, stmt, *_: lookups.append(stmt)
                 if "FROM api_tokens" in stmt or "FROM users" in stmt else None)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    yield app, client, sessions, name, lookups
    app.extensions["diffqueue"].cache.close()
    engine.dispose()


def test_a_token_is_looked_up_once(setup):
    _app, client, _sessions, name, lookups = setup
    for _ in range(5):
        resp = client.get("/api/v1/jobs")
        assert resp.status_code == 200
    assert len(lookups) == 1


def test_a_revoke_elsewhere_is_seen_by_the_next_requests(setup):
    _app, client, sessions, name, lookups = setup
    assert client.get("/api/v1/jobs").status_code == 200
    with session_scope(sessions) as session:  # as `diffqueue token revoke` does, in another process
        row = session.scalar(select(ApiToken).join(User).where(User.name == name))
        auth.revoke_token(session, row.id)
    assert eventually(lambda: client.get("/api/v1/jobs").status_code == 401)
    assert client.get("/api/v1/jobs").status_code == 401


def test_a_user_change_elsewhere_is_seen(setup):
    _app, client, sessions, name, _lookups = setup
    assert client.get("/metrics").status_code == 403  # admins only
    with session_scope(sessions) as session:
        session.execute(update(User).where(User.name == name).values(is_admin=True))
    assert eventually(lambda: client.get("/metrics").status_code == 200)


def test_last_use_updates_do_not_empty_the_cache(setup):
    _app, client, sessions, name, lookups = setup
    assert client.get("/api/v1/jobs").status_code == 200
    with session_scope(sessions) as session:
        session.execute(update(ApiToken).where(ApiToken.user_id == select(User.id).where(User.name == name)
                                               .scalar_subquery()).values(last_used_at=None))
    time.sleep(0.2)  # a notification, had there been one, would have arrived
    assert client.get("/api/v1/jobs").status_code == 200
    assert len(lookups) == 1


def test_without_its_listener_the_cache_is_not_trusted(setup, prod_settings):
    app, client, sessions, name, lookups = setup
    assert client.get("/api/v1/jobs").status_code == 200
    cache = app.extensions["diffqueue"].cache
    listener_pid = cache._listener.info.backend_pid
    dsn = prod_settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [listener_pid])
    # No notification can come now: a revoke is seen only because the user is looked up.
    with session_scope(sessions) as session:
        row = session.scalar(select(ApiToken).join(User).where(User.name == name))
        auth.revoke_token(session, row.id)
    assert eventually(lambda: client.get("/api/v1/jobs").status_code == 401)
    assert cache._listener is None  # and it listens again after RELISTEN_AFTER_S


def test_entries_expire_after_max_age(setup, prod_settings):
    from web import create_app

    _app, _client, sessions, name, _lookups = setup
    app = create_app(replace(prod_settings, web_cache_s=0.05))
    with session_scope(sessions) as session:
        token = auth.create_token(session, auth.get_user(session, name))[1]
    cache = app.extensions["diffqueue"].cache
    calls = []
    real = auth.user_for_token
    with app.app_context():
        db = app.extensions["diffqueue"].reads()
        load = lambda: calls.append(1) or real(db, token)  # noqa: E731
        first = cache.get("k", None, load)
        assert cache.get("k", None, load).id == first.id and len(calls) == 1
        time.sleep(0.1)
        cache.get("k", None, load)
        assert len(calls) == 2
        db.close()
    cache.close()


def test_each_request_gets_a_user_of_its_own(setup):
    app, client, _sessions, name, _lookups = setup
    cache = app.extensions["diffqueue"].cache
    assert client.get("/api/v1/jobs").status_code == 200
    token = client.environ_base["HTTP_AUTHORIZATION"].split()[1]
    with app.app_context():
        db = app.extensions["diffqueue"].reads()
        one, two = cache.user_for_token(db, token), cache.user_for_token(db, token)
        assert one is not two and one.name == two.name == name
        assert one not in db and two not in db
        db.close()


# ------------------------------------------------------------------ jobs' JSON
PLOT = {"num_timesteps_shown": 4}


@pytest.fixture
def polled(setup):
    """`setup`, a queued job of its user's, and the app's queries of the jobs table."""
    app, client, sessions, name, _lookups = setup
    with session_scope(sessions) as session:
        job = jobs.create(session, app.extensions["diffqueue"].settings, "ddpm.schedule_plot", PLOT, owner=auth.get_user(session, name))
        job_id = job.id
    reads: list[str] = []
    event.listen(app.extensions["diffqueue"].sessions.kw["bind"], "before_cursor_execute",
                 lambda _c, _cur, stmt, *_: reads.append(stmt) if "FROM jobs" in stmt else None)
    return app, client, sessions, job_id, reads


def change(sessions, job_id: str, **values) -> None:
    """As the worker does, from another connection."""
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_polled_job_is_read_once_until_it_changes(polled):
    _app, client, sessions, job_id, reads = polled
    bodies = [client.get(f"/api/v1/jobs/{job_id}").get_json() for _ in range(5)]
    assert {b["status"] for b in bodies} == {"queued"} and len(reads) == 1
    change(sessions, job_id, status=JobStatus.RUNNING.value, started_at=utcnow(), progress_step=3,
           progress_total=10, progress_message="step 3/10")
    assert eventually(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"]["step"] == 3)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["status"] == "running" and body["progress"]["message"] == "step 3/10"
    assert len(reads) == 2  # read again once, after the change, and kept again


def test_the_eta_is_of_the_moment_of_each_request(polled):
    _app, client, sessions, job_id, reads = polled
    change(sessions, job_id, status=JobStatus.RUNNING.value, started_at=utcnow(), progress_step=1,
           progress_total=3)
    assert eventually(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "running")
    first = client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"]["eta_s"]
    time.sleep(0.3)
    later = client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"]["eta_s"]
    assert later >= first + 0.5  # 2 steps to go at the rate so far: the estimate grows as time passes
    assert len(reads) == 1  # read once, after the change: both answered from what was kept


def test_an_artifact_added_or_a_job_deleted_elsewhere_is_seen(polled):
    _app, client, sessions, job_id, _reads = polled
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["artifacts"] == []
    with session_scope(sessions) as session:
        session.add(Artifact(job_id=job_id, name="grid.png", kind="image", content_type="image/png", size=1,
                             sha256="0" * 64, meta={}))
    assert eventually(lambda: [a["name"] for a in client.get(f"/api/v1/jobs/{job_id}").get_json()["artifacts"]]
                      == ["grid.png"])
    with session_scope(sessions) as session:
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        session.execute(delete(Job).where(Job.id == job_id))
    assert eventually(lambda: client.get(f"/api/v1/jobs/{job_id}").status_code == 404)


def test_who_may_see_a_kept_job_is_checked_on_every_request(polled, prod_settings):
    app, client, _sessions, job_id, reads = polled
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    other = app.test_client()
    other.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_token(prod_settings, 'bob-' + job_id[:6], admin=False)}"
    resp = other.get(f"/api/v1/jobs/{job_id}")
    assert resp.status_code == 404 and job_id in resp.get_json()["message"]
    admin = app.test_client()
    admin.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_token(prod_settings, 'root', admin=True)}"
    assert admin.get(f"/api/v1/jobs/{job_id}").get_json()["id"] == job_id
    assert len(reads) == 1



def test_a_value_loaded_across_a_change_is_not_kept(polled):
    """A request loads the job; the job changes and another request's check reads the
    notification before the first one is done: what the first loaded predates the
    change, so it is not kept (although nothing was kept of the job to drop)."""
    from web.cache import readable

    app, _client, sessions, job_id, _reads = polled
    cache = app.extensions["diffqueue"].cache
    assert cache._fresh()  # listening
    loads = []

    def load():
        loads.append(1)
        if len(loads) == 1:
            change(sessions, job_id, progress_step=1)
            assert eventually(lambda: readable(cache._listener.fileno()))
            assert cache._fresh()  # as another request's check would
        return "what the job was"

    assert cache.get("job:" + job_id, "host", load) == "what the job was"
    cache.get("job:" + job_id, "host", load)
    assert len(loads) == 2
    cache.get("job:" + job_id, "host", load)
    assert len(loads) == 2  # kept once loaded with no change under way


def test_polls_answered_from_what_is_kept_are_not_counted_against_the_rate_limit(prod_settings, redis_url):
    """The limit protects the database and the queue: a poll that reaches neither is not
    counted; every poll that reads the job is."""
    from web import create_app

    settings = replace(prod_settings, ratelimit_storage_url=redis_url, rate_limit="2/minute")
    app = create_app(settings)
    name = f"poller-{uuid.uuid4().hex[:8]}"
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        owner = auth.create_user(session, name)
        token = auth.create_token(session, owner)[1]
        job_id = jobs.create(session, app.extensions["diffqueue"].settings, "ddpm.schedule_plot", PLOT, owner=owner).id
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    try:
        assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200  # read: counted (1 of 2)
        assert [client.get(f"/api/v1/jobs/{job_id}").status_code for _ in range(10)] == [200] * 10  # kept
        change(sessions, job_id, progress_step=1)
        assert eventually(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"]["step"] == 1)  # 2 of 2
        change(sessions, job_id, progress_step=2)
        codes: list[int] = []  # 200 while what is kept answers, then 429: read again, over the limit
        assert eventually(lambda: codes.append(client.get(f"/api/v1/jobs/{job_id}").status_code) or codes[-1] == 429), \
            codes[-5:]
        refused = client.get(f"/api/v1/jobs/{job_id}")  # nothing kept: still counted, still refused
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    finally:
        app.extensions["diffqueue"].cache.close()
