"""Authentication, per-user isolation, rate limits and the queued-jobs cap."""
from __future__ import annotations

import argparse
import io
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shared import auth
from shared import cli
from shared.config import ConfigError, Settings
from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import ApiToken, Job, Schedule, Upload
from tests.conftest import api_token, eventually, signed_in
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
    # A name of its own each time: the limit per account is not what stops the fourth.
    codes = [browser.post("/login", data={"user": f"user{i}", "password": f"guess {i}"}).status_code
             for i in range(4)]
    assert codes == [401, 401, 401, 429]
    assert browser.get("/login").status_code == 200  # only the attempts are limited


# ------------------------------------------------------------------ sessions, on Postgres
PASSWORD = "correct horse"


def _user_with_password(settings) -> str:
    name = f"pw-{uuid.uuid4().hex[:8]}"
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            auth.create_user(session, name, password=PASSWORD)
    finally:
        engine.dispose()
    return name


def _sign_in(app, name: str, password: str = PASSWORD):
    """A browser signed in by password: the client, and the sign-in's response."""
    browser = app.test_client()
    resp = browser.post("/login", data={"user": name, "password": password, "next": "/jobs"})
    assert resp.status_code == 302 and resp.headers["Location"] == "/jobs", resp.get_data(as_text=True)[:300]
    return browser, resp


def _with_cookie(app, value: str):
    """Another browser holding a copy of a session cookie (as someone who took it would)."""
    other = app.test_client()
    other.set_cookie("session", value)
    return other


def _refused(client) -> bool:
    page, api = client.get("/jobs"), client.get("/api/v1/jobs")
    return (page.status_code == 302 and page.headers["Location"].startswith("/login")
            and api.status_code == 401)


def _accepted(client) -> bool:
    return client.get("/jobs").status_code == 200 and client.get("/api/v1/jobs").status_code == 200


def test_sign_out_ends_every_session_of_the_user(prod_settings):
    from web import create_app

    app = create_app(prod_settings)
    name = _user_with_password(prod_settings)
    browser, _ = _sign_in(app, name)
    copied = browser.get_cookie("session").value
    elsewhere, _ = _sign_in(app, name)  # the same user in a second browser
    assert _accepted(_with_cookie(app, copied)) and _accepted(elsewhere)

    assert browser.post("/logout").status_code == 302
    # At once, in this process (no waiting for the NOTIFY), and for every copy.
    assert _refused(_with_cookie(app, copied))
    assert _refused(elsewhere)
    assert _refused(browser)
    again, _ = _sign_in(app, name)  # a new sign-in works
    assert _accepted(again)
    app.extensions["diffqueue"].cache.close()


@pytest.mark.parametrize("how", ["shared.auth", "cli"])
def test_a_password_change_ends_every_session_of_the_user(prod_settings, how, monkeypatch, capsys):
    from web import create_app

    app = create_app(prod_settings)
    name = _user_with_password(prod_settings)
    browser, _ = _sign_in(app, name)
    copied = browser.get_cookie("session").value
    assert _accepted(_with_cookie(app, copied))

    if how == "cli":  # `diffqueue user passwd NAME --password-stdin`, in another process as far as the app knows
        monkeypatch.setattr(sys, "stdin", io.StringIO("a new password\n"))
        cli.cmd_user_passwd(argparse.Namespace(name=name, password_stdin=True), prod_settings)
        assert "signed out" in capsys.readouterr().out
    else:
        engine = make_engine(prod_settings.database_url)
        with session_scope(make_sessionmaker(engine)) as session:
            auth.set_password(auth.get_user(session, name), "a new password")
        engine.dispose()
    assert eventually(lambda: _refused(_with_cookie(app, copied)))
    assert _refused(browser)
    assert app.test_client().post("/login", data={"user": name, "password": PASSWORD}).status_code == 401
    assert _accepted(_sign_in(app, name, "a new password")[0])
    app.extensions["diffqueue"].cache.close()


def test_the_session_check_costs_no_query(prod_settings):
    from sqlalchemy import event

    from web import create_app

    app = create_app(prod_settings)
    name = _user_with_password(prod_settings)
    browser, _ = _sign_in(app, name)
    lookups: list[str] = []
    event.listen(app.extensions["diffqueue"].sessions.kw["bind"], "before_cursor_execute",
                 lambda _c, _cur, stmt, *_: lookups.append(stmt) if "FROM users" in stmt else None)
    for _ in range(5):
        assert browser.get("/api/v1/jobs").status_code == 200
    assert len(lookups) == 1, lookups  # the first request loads the user; the cache answers the rest
    app.extensions["diffqueue"].cache.close()


def test_session_cookies_are_secure_when_set_and_expire_with_the_lifetime(prod_settings):
    from web import create_app

    def cookie_of(settings) -> tuple[str, float]:
        app = create_app(settings)
        _, resp = _sign_in(app, _user_with_password(settings))
        (cookie,) = resp.headers.getlist("Set-Cookie")
        expires = parsedate_to_datetime(re.search(r"Expires=([^;]+)", cookie).group(1))
        app.extensions["diffqueue"].cache.close()
        return cookie, (expires - datetime.now(timezone.utc)).total_seconds()

    cookie, lifetime_s = cookie_of(replace(prod_settings, secure_cookies=True, session_lifetime_s=600))
    assert "; Secure" in cookie and "; HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert 590 < lifetime_s <= 600
    cookie, lifetime_s = cookie_of(prod_settings)  # the defaults: plain HTTP works, 12 hours
    assert "Secure" not in cookie and 12 * 3600 - 10 < lifetime_s <= 12 * 3600

    env = {"DIFFQUEUE_DATABASE_URL": prod_settings.database_url, "DIFFQUEUE_SECRET_KEY": secrets.token_hex(32)}
    assert (Settings.from_env(env).secure_cookies, Settings.from_env(env).session_lifetime_s) == (False, 43200.0)
    chosen = Settings.from_env({**env, "DIFFQUEUE_SECURE_COOKIES": "on", "DIFFQUEUE_SESSION_LIFETIME_S": "3600"})
    assert (chosen.secure_cookies, chosen.session_lifetime_s) == (True, 3600.0)
    assert Settings.from_env(chosen.as_env()) == chosen


def test_a_session_ends_its_lifetime_after_sign_in_however_it_is_used(prod_settings):
    from web import create_app

    # Sign-in times are kept in whole seconds: 3 s is refused 3-4 s after sign-in.
    app = create_app(replace(prod_settings, session_lifetime_s=3))
    browser, _ = _sign_in(app, _user_with_password(prod_settings))
    copied = browser.get_cookie("session").value
    user = _with_cookie(app, copied)
    assert _accepted(user)
    time.sleep(1.0)
    assert _accepted(user)  # in use all along: each response sends the cookie again
    time.sleep(3.1)
    assert _refused(user)
    assert _refused(_with_cookie(app, copied))  # a copy ignores the cookie's Expires: the server refuses it
    app.extensions["diffqueue"].cache.close()


# ------------------------------------------------------------------ the secret key
@pytest.mark.parametrize("key", ["", "change-me", "CHANGE_ME", "please-change-me-before-going-to-production",
                                 "your-secret-key", "0123456789abcdef0123", "ab" * 32])
def test_the_web_refuses_to_start_without_a_real_secret_key(prod_settings, key):
    from web import create_app

    with pytest.raises(ConfigError) as info:
        create_app(replace(prod_settings, secret_key=key))
    assert "DIFFQUEUE_SECRET_KEY" in str(info.value)
    assert 'python -c "import secrets; print(secrets.token_hex(32))"' in str(info.value)


def test_a_secret_key_comes_from_the_environment_or_auth_is_off(tmp_path, pg_url):
    from web import create_app

    env = {"DIFFQUEUE_DATABASE_URL": pg_url, "DIFFQUEUE_DATA_DIR": str(tmp_path / "data")}
    unset = Settings.from_env(env)
    # Not a key made up per process: that is what made 14 of 20 sign-ins fail across gunicorn workers.
    assert unset.auth_enabled and unset.secret_key == ""
    with pytest.raises(ConfigError, match="DIFFQUEUE_SECRET_KEY is not set"):
        create_app(unset)
    key = secrets.token_hex(32)
    assert create_app(Settings.from_env({**env, "DIFFQUEUE_SECRET_KEY": key})).secret_key == key

    # Auth off (the embedded mode) needs none: `diffqueue up` makes one and hands it to its children.
    embedded = Settings.embedded(tmp_path / "data")
    assert not embedded.auth_enabled and len(embedded.secret_key) == 64
    assert Settings.from_env(embedded.as_env()).secret_key == embedded.secret_key
    alone = Settings.from_env({"DIFFQUEUE_DATA_DIR": str(tmp_path / "data")})
    assert not alone.auth_enabled and alone.secret_key
    from shared.db import upgrade

    upgrade(alone.database_url)
    assert create_app(alone).secret_key == alone.secret_key


@pytest.mark.parametrize("key", [None, "change-me"])
def test_diffqueue_web_refuses_to_start_without_a_real_secret_key(tmp_path, pg_url, key):
    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFQUEUE_")}
    env.update(DIFFQUEUE_DATABASE_URL=pg_url, DIFFQUEUE_DATA_DIR=str(tmp_path / "data"))
    if key is not None:
        env["DIFFQUEUE_SECRET_KEY"] = key
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "web", "--host", "127.0.0.1", "--port",
                           str(free_port()), "--workers", "1"], env=env, capture_output=True, text=True,
                          timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start: DIFFQUEUE_SECRET_KEY" in proc.stderr
    assert "secrets.token_hex(32)" in proc.stderr


# ------------------------------------------------------------------ sign-in limits and next=, on Postgres + Redis
def test_sign_in_guesses_are_limited_per_account_across_addresses(prod_settings, redis_url):
    from web import create_app

    settings = replace(prod_settings, ratelimit_storage_url=redis_url, rate_limit_login="3/minute")
    app = create_app(settings)
    name, other = _user_with_password(settings), _user_with_password(settings)
    net = secrets.randbelow(250)  # addresses of this run's own: the counts live in Redis
    browser = app.test_client()

    def guess(user: str, host: int, password: str = "wrong guess"):
        return browser.post("/login", data={"user": user, "password": password},
                            environ_base={"REMOTE_ADDR": f"10.{net}.{host}.1"})

    # One guess per address, and the name in any case: the fourth is refused all the same.
    codes = [guess(user, host).status_code for host, user in enumerate([name, name.upper(), f" {name}", name])]
    assert codes == [401, 401, 401, 429]
    refused = guess(name, 9, PASSWORD)  # even the right password waits out the window
    assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 60
    assert guess(other, 10).status_code == 401  # another account is not held up
    assert guess(other, 11, PASSWORD).status_code == 302
    app.extensions["diffqueue"].cache.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_next_with_a_line_break_is_a_400_naming_next(prod_settings, redis_url, method):
    from web import create_app

    app = create_app(replace(prod_settings, ratelimit_storage_url=redis_url))
    name = _user_with_password(prod_settings)
    browser = app.test_client()
    for target in ("/jobs\r\nX-Injected: 1", "/jobs\nX", "/jobs\rX"):
        if method == "GET":
            resp = browser.get("/login", query_string={"next": target})
        else:
            resp = browser.post("/login", data={"user": name, "password": PASSWORD, "next": target})
        assert resp.status_code == 400, (target, resp.status_code)
        assert "next: must be a path on this site" in resp.get_data(as_text=True)
        assert "X-Injected" not in resp.headers
        with browser.session_transaction() as session:
            assert "user_id" not in session  # not signed in
    resp = browser.get("/login?next=/jobs%0d%0aX", headers={"Accept": "application/json"})
    assert resp.status_code == 400 and resp.get_json()["message"].startswith("next: ")
    app.extensions["diffqueue"].cache.close()


def test_next_goes_back_only_to_this_site_on_postgres(prod_settings):
    from web import create_app

    app = create_app(prod_settings)
    name = _user_with_password(prod_settings)
    for target in ("https://evil.example/", "//evil.example/x", "///evil.example/x", "/\\evil.example/x",
                   "\\\\evil.example/x", "javascript:alert(1)", "jobs"):
        resp = app.test_client().post("/login", data={"user": name, "password": PASSWORD, "next": target})
        assert resp.status_code == 302 and resp.headers["Location"] == "/", target
    resp = app.test_client().post("/login", data={"user": name, "password": PASSWORD, "next": "/jobs?status=queued"})
    assert resp.headers["Location"] == "/jobs?status=queued"
    app.extensions["diffqueue"].cache.close()
