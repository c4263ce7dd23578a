"""The web's cache of signed-in users (web/auth_cache.py) on PostgreSQL: a token costs
one lookup, and a revoke or a user change made elsewhere is seen by the next request."""
from __future__ import annotations

import time
import uuid
from dataclasses import replace

import psycopg
import pytest
from sqlalchemy import event, select, update

from shared import auth
from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import ApiToken, User


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
    app.extensions["diffqueue"].auth_cache.close()
    engine.dispose()


def eventually(predicate, timeout_s: float = 5.0) -> bool:
    """Notifications arrive asynchronously (within milliseconds): poll a little."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


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
    cache = app.extensions["diffqueue"].auth_cache
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
    app = create_app(replace(prod_settings, auth_cache_s=0.05))
    with session_scope(sessions) as session:
        token = auth.create_token(session, auth.get_user(session, name))[1]
    cache = app.extensions["diffqueue"].auth_cache
    calls = []
    real = auth.user_for_token
    with app.app_context():
        db = app.extensions["diffqueue"].reads()
        load = lambda: calls.append(1) or real(db, token)  # noqa: E731
        first = cache._cached("k", load)
        assert cache._cached("k", load).id == first.id and len(calls) == 1
        time.sleep(0.1)
        cache._cached("k", load)
        assert len(calls) == 2
        db.close()
    cache.close()


def test_each_request_gets_a_user_of_its_own(setup):
    app, client, _sessions, name, _lookups = setup
    cache = app.extensions["diffqueue"].auth_cache
    assert client.get("/api/v1/jobs").status_code == 200
    token = client.environ_base["HTTP_AUTHORIZATION"].split()[1]
    with app.app_context():
        db = app.extensions["diffqueue"].reads()
        one, two = cache.user_for_token(db, token), cache.user_for_token(db, token)
        assert one is not two and one.name == two.name == name
        assert one not in db and two not in db
        db.close()
