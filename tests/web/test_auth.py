"""Authentication, per-user isolation, rate limits and the queued-jobs cap."""
from __future__ import annotations

import io
import re
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from shared import auth
from shared.config import ConfigError
from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import ApiToken, Job, Schedule, Upload
from tests.conftest import api_token, signed_in
from tests.upload_files import png_bytes

PLOT = {"kind": "ddpm.schedule_plot", "params": {"num_timesteps_shown": 4}}


@pytest.fixture
def auth_settings(sqlite_settings):
    return replace(sqlite_settings, auth_enabled=True)


@pytest.fixture
def auth_app(auth_settings):
    from web import create_app

    return create_app(auth_settings)


def client_for(app, settings, user: str, admin: bool = False):
    return signed_in(app.test_client(), settings, user, admin)


def count(settings, model) -> int:
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_the_api_needs_a_live_token(auth_app, auth_settings):
    anonymous = auth_app.test_client()
    resp = anonymous.get("/api/v1/jobs")
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in resp.get_json()["message"]
    assert anonymous.get("/api/v1/jobs", headers={"Authorization": "Bearer dq_not-a-token"}).status_code == 401
    assert anonymous.get("/api/v1/jobs", headers={"Authorization": "Basic YTpi"}).status_code == 401
    assert anonymous.get("/healthz").status_code == 200  # public: load balancers probe it
    assert anonymous.get("/api/v1/healthz").status_code == 200

    token = api_token(auth_settings, "alice", admin=False)
    headers = {"Authorization": f"Bearer {token}"}
    assert anonymous.get("/api/v1/jobs", headers=headers).status_code == 200
    engine = make_engine(auth_settings.database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        row = session.scalar(select(ApiToken))
        assert row.token_hash == auth.hash_token(token) and token not in (row.token_hash, row.prefix)
        assert row.last_used_at is not None
        auth.revoke_token(session, row.prefix)
    resp = anonymous.get("/api/v1/jobs", headers=headers)
    assert resp.status_code == 401 and "revoked" in resp.get_json()["message"]


def test_auth_off_is_refused_outside_the_embedded_mode(sqlite_settings, pg_url):
    from web import create_app

    with pytest.raises(ConfigError, match="DIFFQUEUE_AUTH=off is allowed only in the embedded"):
        create_app(replace(sqlite_settings, database_url=pg_url, auth_enabled=False))


def _alices_things(alice) -> dict[str, str]:
    job = alice.post("/api/v1/jobs", json=PLOT).get_json()["id"]
    upload = alice.post("/api/v1/uploads", data={"file": (io.BytesIO(png_bytes(8, 8)), "cat.png")},
                        content_type="multipart/form-data").get_json()["id"]
    schedule = alice.post("/api/v1/schedules", json={"name": "n", "cron": "0 2 * * *", **PLOT}).get_json()["id"]
    return {"job_id": job, "upload_id": upload, "schedule_id": schedule}


def test_users_see_only_their_own_jobs_uploads_and_schedules(auth_app, auth_settings):
    alice = client_for(auth_app, auth_settings, "alice")
    bob = client_for(auth_app, auth_settings, "bob")
    admin = client_for(auth_app, auth_settings, "root", admin=True)
    ids = _alices_things(alice)
    before = {m: count(auth_settings, m) for m in (Job, Upload, Schedule)}

    # Every route that takes one of these ids answers bob 404, whatever the method,
    # and changes nothing (found from the URL map, so a new route cannot be missed).
    checked = []
    for rule in auth_app.url_map.iter_rules():
        names = set(rule.arguments) & set(ids)
        if not names:
            continue
        values = {n: ids[n] for n in names}
        values.update({k: "x" for k in rule.arguments - names})
        if "name" in rule.arguments:
            values["name"] = "schedule.png"
        if "action" in rule.arguments:
            values["action"] = "pause"
        path = rule.build(values, append_unknown=False)[1]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            resp = bob.open(path, method=method, json={"enabled": False} if method == "PATCH" else None,
                            headers={"Accept": "application/json"})
            assert resp.status_code == 404, (method, path, resp.status_code, resp.get_data(as_text=True)[:200])
            checked.append((method, rule.rule))
    assert len(checked) >= 14, checked
    assert {m: count(auth_settings, m) for m in (Job, Upload, Schedule)} == before

    # Lists hold only one's own; an admin sees everyone's.
    for path, key in (("/api/v1/jobs", "jobs"), ("/api/v1/uploads", "uploads"), ("/api/v1/schedules", "schedules")):
        assert bob.get(path).get_json()[key] == []
        assert len(alice.get(path).get_json()[key]) == 1
        assert len(admin.get(path).get_json()[key]) == 1
    assert admin.get(f"/api/v1/jobs/{ids['job_id']}").status_code == 200
    assert ids["job_id"] not in bob.get("/jobs").get_data(as_text=True)
    assert ids["job_id"] in alice.get("/jobs").get_data(as_text=True)

    # Someone else's upload or job cannot be used as an input either.
    resp = bob.post("/api/v1/jobs", json={"kind": "sd.img2img",
                                          "params": {"prompts": ["a"], "init_image": f"upload:{ids['upload_id']}"}})
    assert resp.status_code == 400 and resp.get_json()["fields"] == {"init_image": f"upload:{ids['upload_id']} not found"}
    resp = bob.post("/api/v1/jobs", json={"kind": "sd.img2img",
                                          "params": {"prompts": ["a"], "init_image": f"job:{ids['job_id']}/schedule.png"}})
    assert resp.status_code == 400 and "not found" in resp.get_json()["fields"]["init_image"]
    resp = alice.post("/api/v1/jobs", json={"kind": "sd.img2img",
                                            "params": {"prompts": ["a"], "init_image": f"upload:{ids['upload_id']}"}})
    assert resp.status_code == 202
    assert count(auth_settings, Job) == before[Job] + 1


def test_a_schedules_jobs_belong_to_its_owner(auth_app, auth_settings):
    alice = client_for(auth_app, auth_settings, "alice")
    schedule = alice.post("/api/v1/schedules", json={"name": "n", "cron": "0 2 * * *", **PLOT}).get_json()
    job = alice.post(f"/api/v1/schedules/{schedule['id']}/run-now").get_json()
    assert [j["id"] for j in alice.get("/api/v1/jobs").get_json()["jobs"]] == [job["id"]]
    assert client_for(auth_app, auth_settings, "bob").get(f"/api/v1/jobs/{job['id']}").status_code == 404


def _csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_web_sign_in_with_a_password(auth_settings):
    from web import create_app

    settings = replace(auth_settings, csrf_enabled=True)
    app = create_app(settings)
    engine = make_engine(settings.database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        auth.create_user(session, "alice", password="correct horse")
    browser = app.test_client()

    resp = browser.get("/jobs?status=queued")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login?next=/jobs")
    form = browser.get("/login?next=/jobs").get_data(as_text=True)
    resp = browser.post("/login", data={"user": "alice", "password": "wrong", "next": "/jobs",
                                        "csrf_token": _csrf(form)})
    assert resp.status_code == 401 and "Wrong user name or password" in resp.get_data(as_text=True)
    resp = browser.post("/login", data={"user": "alice", "password": "correct horse", "next": "/jobs",
                                        "csrf_token": _csrf(form)})
    assert resp.status_code == 302 and resp.headers["Location"] == "/jobs"
    page = browser.get("/jobs").get_data(as_text=True)
    assert "alice" in page and "Sign out" in page

    # The pages' own API calls ride on the cookie; a write also needs the CSRF header.
    assert browser.get("/api/v1/jobs").status_code == 200
    assert browser.post("/api/v1/jobs", json=PLOT).status_code == 400
    resp = browser.post("/api/v1/jobs", json=PLOT, headers={"X-CSRFToken": _csrf(page)})
    assert resp.status_code == 202 and count(settings, Job) == 1

    browser.post("/logout", data={"csrf_token": _csrf(page)})
    assert browser.get("/api/v1/jobs").status_code == 401


def test_sign_in_goes_back_only_to_this_site(auth_app, auth_settings):
    engine = make_engine(auth_settings.database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        auth.create_user(session, "alice", password="correct horse")
    for target in ("https://evil.example/", "//evil.example/x", "javascript:alert(1)"):
        resp = auth_app.test_client().post("/login", data={"user": "alice", "password": "correct horse",
                                                           "next": target})
        assert resp.status_code == 302 and resp.headers["Location"] == "/", target


def test_submits_are_rate_limited_per_user_in_redis(auth_settings, redis_url):
    from web import create_app

    settings = replace(auth_settings, ratelimit_storage_url=redis_url, rate_limit_submit="2/minute")
    app = create_app(settings)
    alice, bob = client_for(app, settings, f"alice-{uuid.uuid4().hex[:6]}"), client_for(app, settings, "bob")
    assert [alice.post("/api/v1/jobs", json=PLOT).status_code for _ in range(2)] == [202, 202]
    refused = alice.post("/api/v1/jobs", json=PLOT)
    assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.get_json()["error"] == "too_many_requests"
    assert count(settings, Job) == 2
    assert alice.get("/api/v1/jobs").status_code == 200  # reads have their own, larger limit
    assert bob.post("/api/v1/jobs", json=PLOT).status_code == 202  # a limit per user


def test_a_user_may_have_only_so_many_queued_jobs(auth_app, auth_settings):
    from web import create_app

    settings = replace(auth_settings, max_queued_per_user=2)
    app = create_app(settings)
    alice, bob = client_for(app, settings, "alice"), client_for(app, settings, "bob")
    first = [alice.post("/api/v1/jobs", json=PLOT).get_json()["id"] for _ in range(2)]
    refused = alice.post("/api/v1/jobs", json=PLOT)
    # At least the cap's 30 s (flask-limiter raises it to its window's reset when that is later).
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 30
    assert "limit is 2" in refused.get_json()["message"] and count(settings, Job) == 2
    assert bob.post("/api/v1/jobs", json=PLOT).status_code == 202
    assert alice.post(f"/api/v1/jobs/{first[0]}/cancel").status_code == 202
    assert alice.post("/api/v1/jobs", json=PLOT).status_code == 202  # a slot freed
    assert alice.post(f"/api/v1/jobs/{first[0]}/retry").status_code == 429  # a retry queues a job too


def test_sign_in_attempts_are_rate_limited_per_address(auth_settings):
    from web import create_app

    settings = replace(auth_settings, rate_limit_login="3/minute")
    browser = create_app(settings).test_client()
    codes = [browser.post("/login", data={"user": "alice", "password": f"guess {i}"}).status_code for i in range(4)]
    assert codes == [401, 401, 401, 429]
    assert browser.get("/login").status_code == 200  # only the attempts are limited
