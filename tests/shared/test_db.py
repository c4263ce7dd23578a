"""The Postgres pool's checkout check (`shared.db.make_engine`): a pooled connection the
server has ended is replaced before use, with no round trip on a live one."""
from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from shared import db


def backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def terminate(pg_url: str, pid: int) -> None:
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
        # Until the backend has exited, its socket may not have the server's goodbye yet.
        for _ in range(100):
            if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
                break
            admin.execute("SELECT pg_sleep(0.02)")


@pytest.fixture
def engine(pg_url):
    engine = db.make_engine(pg_url)
    yield engine
    engine.dispose()


def test_a_live_pooled_connection_is_reused_without_a_ping(engine, monkeypatch):
    first = backend_pid(engine)
    calls = []
    monkeypatch.setattr(engine.dialect, "do_ping", calls.append)
    assert [backend_pid(engine) for _ in range(3)] == [first] * 3
    assert calls == []


def test_a_connection_the_server_ended_is_replaced_before_use(engine, pg_url):
    first = backend_pid(engine)
    terminate(pg_url, first)
    second = backend_pid(engine)  # no OperationalError: the dead one never reached a query
    assert second != first
    assert backend_pid(engine) == second


def test_a_long_idle_connection_is_pinged_and_replaced_if_dead(engine, pg_url, monkeypatch):
    first = backend_pid(engine)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", -1.0)  # every pooled connection counts as long idle
    calls = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: calls.append(conn) or real_ping(conn))
    assert backend_pid(engine) == first and len(calls) == 1

    def ping_fails(conn):
        calls.append(conn)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(engine.dialect, "do_ping", ping_fails)  # a silent network drop: the socket looks fine
    assert backend_pid(engine) != first and len(calls) == 2
