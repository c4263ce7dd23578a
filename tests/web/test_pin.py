"""Pinning through the API, the job page and the CLI: `pinned` and `expires_at` in the
job's JSON, the pin/unpin buttons (CSRF-checked forms), `diffqueue pin/unpin`, and
another user's job not found."""
from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from sqlalchemy import update

from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import Job
from tests.conftest import signed_in

FINISHED_AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def finished_job(client, settings) -> str:
    """A job submitted through the API, then finished (as a worker would) at FINISHED_AT."""
    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.schedule_plot", "params": {}})
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded", finished_at=FINISHED_AT))
    return job_id


def test_pin_and_unpin_through_the_api(client, sqlite_settings):
    queued = client.post("/api/v1/jobs", json={"kind": "ddpm.schedule_plot", "params": {}}).get_json()
    assert (queued["pinned"], queued["expires_at"]) == (False, None)  # unfinished: no expiry yet
    job_id = finished_job(client, sqlite_settings)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (body["pinned"], body["expires_at"]) == (False, "2030-02-01T03:04:05+00:00")  # finished + 30 days

    resp = client.post(f"/api/v1/jobs/{job_id}/pin")
    assert resp.status_code == 200
    assert (resp.get_json()["pinned"], resp.get_json()["expires_at"]) == (True, None)
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["pinned"] is True
    resp = client.post(f"/api/v1/jobs/{job_id}/unpin")
    assert (resp.get_json()["pinned"], resp.get_json()["expires_at"]) == (False, "2030-02-01T03:04:05+00:00")

    resp = client.post(f"/api/v1/jobs/{'0' * 32}/pin")
    assert resp.status_code == 404 and resp.get_json()["error"] == "not_found"


def test_no_expiry_with_retention_off(sqlite_settings):
    from web import create_app

    settings = replace(sqlite_settings, retention_days=0)
    client = create_app(settings).test_client()
    job_id = finished_job(client, settings)
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["expires_at"] is None


def test_pin_buttons_on_the_job_page_need_the_csrf_token(sqlite_settings):
    from web import create_app

    client = create_app(replace(sqlite_settings, csrf_enabled=True)).test_client()
    job_id = finished_job(client, sqlite_settings)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'id="pin-form" data-action="pin">', html)  # shown
    assert re.search(r'id="unpin-form" data-action="unpin" hidden>', html)
    assert 'kept until 2030-02-01T03:04:05+00:00' in html

    assert client.post(f"/jobs/{job_id}/pin").status_code == 400  # no token: refused
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["pinned"] is False
    token = re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)
    resp = client.post(f"/jobs/{job_id}/pin", data={"csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"] == f"/jobs/{job_id}"
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'id="pin-form" data-action="pin" hidden>', html)
    assert re.search(r'id="unpin-form" data-action="unpin">', html)
    assert "pinned: kept" in html
    # The page's script: the header token, a JSON answer.
    resp = client.post(f"/jobs/{job_id}/unpin", headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert resp.status_code == 202 and resp.get_json()["pinned"] is False


def test_another_users_job_cannot_be_pinned(prod_client, prod_settings):
    from web import create_app

    job_id = finished_job(prod_client, prod_settings)
    other = signed_in(create_app(prod_settings).test_client(), prod_settings, user="pin-other", admin=False)
    assert other.post(f"/api/v1/jobs/{job_id}/pin").status_code == 404
    assert prod_client.get(f"/api/v1/jobs/{job_id}").get_json()["pinned"] is False
    assert prod_client.post(f"/api/v1/jobs/{job_id}/pin").get_json()["pinned"] is True  # the owner (an admin) may


def test_pin_and_unpin_from_the_cli(sqlite_settings, capsys, monkeypatch):
    import threading

    from werkzeug.serving import make_server

    from shared.cli import main
    from web import create_app

    app = create_app(sqlite_settings)
    job_id = finished_job(app.test_client(), sqlite_settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)  # real HTTP for the CLI's requests
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DIFFQUEUE_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        main(["pin", job_id])
        assert capsys.readouterr().out == f"job {job_id} pinned: retention keeps it\n"
        main(["unpin", job_id])
        assert capsys.readouterr().out == f"job {job_id} unpinned: retention deletes it after 2030-02-01T03:04:05+00:00\n"
        with pytest.raises(SystemExit) as exit_:
            main(["pin", "0" * 32])
        assert exit_.value.code == 1 and "HTTP 404" in capsys.readouterr().err
    finally:
        server.shutdown()
    assert app.test_client().get(f"/api/v1/jobs/{job_id}").get_json()["pinned"] is False
