"""5xx answers: a generic message and an error id that the log carries, never an
exception's text, SQL, a host or a port; the database down is a 503 with Retry-After."""
from __future__ import annotations

import logging
import secrets
from dataclasses import replace

import pytest

from tests.conftest import free_port


@pytest.fixture
def database_down(prod_settings):
    """The deployed stack with its database gone: nothing listens where the URL points."""
    from web import create_app

    port = free_port()
    settings = replace(prod_settings, database_url=f"postgresql+psycopg://diffqueue@127.0.0.1:{port}/diffqueue",
                       secret_key=secrets.token_hex(32))
    app = create_app(settings, check_schema=False)  # the check would fail first: the database is down
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = "Bearer dq_" + "x" * 43
    return client, port


def _leaks(text: str, port: int) -> list[str]:
    return [s for s in ("127.0.0.1", str(port), "psycopg", "SELECT", "connection", "Traceback") if s in text]


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/v1/jobs", {"kind": "ddpm.train", "params": {"max_steps": 4}}),
    ("GET", "/api/v1/jobs", None),
    ("GET", "/jobs", None),
])
def test_the_database_down_is_a_503_with_retry_after_and_no_connection_details(database_down, method, path, body):
    client, port = database_down
    resp = client.open(path, method=method, json=body)
    text = resp.get_data(as_text=True)
    assert resp.status_code == 503, text[:500]
    assert int(resp.headers["Retry-After"]) > 0
    assert "database is unavailable" in text and "error id" in text
    assert _leaks(text, port) == []
    if path.startswith("/api/"):
        assert set(resp.get_json()) == {"error", "message", "error_id"} and resp.get_json()["error"] == "unavailable"


def test_healthz_names_the_component_that_is_down_not_where_it_is(database_down):
    client, port = database_down
    resp = client.get("/healthz")
    assert resp.status_code == 503
    checks = resp.get_json()["checks"]
    assert checks["database"] == {"ok": False, "error": "unavailable"}
    assert checks["broker"]["ok"] and checks["storage"]["ok"]
    assert _leaks(resp.get_data(as_text=True), port) == []


def test_an_unhandled_error_is_a_generic_500_whose_id_the_log_carries(app, caplog):
    @app.get("/api/v1/boom")
    def boom():
        raise RuntimeError("SELECT password_hash FROM users WHERE name = 'admin'")

    @app.get("/boom")
    def boom_page():
        raise RuntimeError("/srv/diffqueue/models/secret is unreadable")

    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger="web.errors"):
        resp = client.get("/api/v1/boom")
        page = client.get("/boom")
    body = resp.get_json()
    assert resp.status_code == 500 and body["error"] == "internal_error"
    assert "SELECT" not in resp.get_data(as_text=True) and "RuntimeError" not in resp.get_data(as_text=True)
    assert body["error_id"] in body["message"]
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and "SELECT password_hash" in str(logged[0].exc_info[1])
    assert page.status_code == 500 and "/srv/diffqueue" not in page.get_data(as_text=True)
    assert "error id" in page.get_data(as_text=True)
