"""Webhook fields through the API: SSRF and bound checks that create nothing, what a
job and a schedule show (never the secret), the delivery log, and schedules passing
their webhook to the jobs they make. A real receiver takes the deliveries."""
from __future__ import annotations

from dataclasses import replace

import pytest

from shared import webhooks
from shared.db import make_engine, make_sessionmaker
from tests.webhook_receiver import Receiver

SECRET = "a-secret-only-the-receiver-knows"
# What a refusal of an inward address says, never naming the addresses it found.
NON_PUBLIC = "resolves to a non-public address and is refused"


def total_jobs(client) -> int:
    return client.get("/api/v1/jobs").get_json()["total"]


def submit(client, **webhook):
    return client.post("/api/v1/jobs", json={"kind": "ddpm.schedule_plot", "params": {}, **webhook})


@pytest.fixture
def loopback_settings(sqlite_settings):
    """Loopback allowed, as for a receiver on this machine."""
    return replace(sqlite_settings, webhook_allow_private=True)


@pytest.fixture
def loopback_client(loopback_settings):
    from web import create_app

    return create_app(loopback_settings).test_client()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("http://127.0.0.1/", NON_PUBLIC),
        ("http://localhost:8080/hook", NON_PUBLIC),
        ("http://10.0.0.1/", NON_PUBLIC),
        ("http://192.168.1.20/", NON_PUBLIC),
        ("http://[::1]/", NON_PUBLIC),
        ("http://[::ffff:127.0.0.1]/", NON_PUBLIC),
        ("http://169.254.169.254/latest/meta-data/", NON_PUBLIC),
        ("http://2130706433/", NON_PUBLIC),  # 127.0.0.1 as one decimal number
        ("http://0.0.0.0:5000/", NON_PUBLIC),
        ("http://224.0.0.1/", NON_PUBLIC),
        ("file:///etc/passwd", "must be an http or https URL, got scheme 'file'"),
        ("ftp://example.com/x", "must be an http or https URL, got scheme 'ftp'"),
        ("gopher://example.com/", "got scheme 'gopher'"),
        ("http://user:pw@example.com/", "must not contain credentials"),
        ("https://example.com:99999/", "invalid port (allowed: 1 to 65535)"),
        ("http://example.com/" + "a" * 2048, "at most 2048 characters"),
        ("http:///nohost", "has no host"),
        ("", "non-empty string"),
        (42, "non-empty string"),
    ],
)
def test_unsafe_webhook_urls_are_refused_and_create_nothing(client, url, fragment):
    before = total_jobs(client)
    resp = submit(client, webhook_url=url)
    assert resp.status_code == 400, resp.get_json()
    body = resp.get_json()
    assert body["error"] == "invalid_params"
    assert fragment in body["fields"]["webhook_url"], body
    assert "webhook_url" in body["message"]
    assert total_jobs(client) == before
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "fields, field, fragment",
    [
        ({"webhook_events": ["started", "finished"]}, "webhook_events",
         "must be a non-empty list of started, progress, completed"),
        ({"webhook_events": []}, "webhook_events", "non-empty list"),
        ({"webhook_events": "completed"}, "webhook_events", "non-empty list"),
        ({"webhook_secret": "short"}, "webhook_secret", "16 to 256 characters, got 5 characters"),
        ({"webhook_secret": "x" * 257}, "webhook_secret", "16 to 256 characters, got 257"),
        ({"webhook_secret": 1234567890123456789}, "webhook_secret", "got int"),
    ],
)
def test_bad_events_and_secrets_are_refused(loopback_client, fields, field, fragment):
    before = total_jobs(loopback_client)
    resp = submit(loopback_client, webhook_url="http://127.0.0.1:9/hook", **fields)
    assert resp.status_code == 400
    assert fragment in resp.get_json()["fields"][field]
    assert total_jobs(loopback_client) == before


def test_events_or_secret_without_a_url_are_refused(client):
    resp = submit(client, webhook_events=["completed"], webhook_secret=SECRET)
    assert resp.status_code == 400
    assert resp.get_json()["fields"] == {"webhook_events": "given without a webhook_url",
                                         "webhook_secret": "given without a webhook_url"}


def test_a_job_shows_its_webhook_but_never_the_secret(loopback_client, receiver):
    resp = submit(loopback_client, webhook_url=receiver.url, webhook_secret=SECRET)
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["webhook"] == {"url": receiver.url, "events": ["started", "completed"], "secret_set": True}
    assert SECRET not in resp.get_data(as_text=True)
    for path in (f"/api/v1/jobs/{job['id']}", "/api/v1/jobs", f"/api/v1/jobs/{job['id']}/webhooks"):
        assert SECRET not in loopback_client.get(path).get_data(as_text=True)
    # Events come back in one order, without repeats.
    again = submit(loopback_client, webhook_url=receiver.url, webhook_events=["completed", "progress", "completed"])
    assert again.get_json()["webhook"]["events"] == ["progress", "completed"]
    plain = submit(loopback_client).get_json()
    assert plain["webhook"] is None


def test_the_delivery_log(loopback_client, loopback_settings, receiver):
    job = submit(loopback_client, webhook_url=receiver.url, webhook_secret=SECRET).get_json()
    assert loopback_client.get(f"/api/v1/jobs/{job['id']}/webhooks").get_json() == {"deliveries": []}
    assert loopback_client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202

    [pending] = loopback_client.get(f"/api/v1/jobs/{job['id']}/webhooks").get_json()["deliveries"]
    assert (pending["event"], pending["state"], pending["attempts"]) == ("completed", "pending", 0)
    assert pending["next_attempt_at"] is not None and pending["delivered_at"] is None

    factory = make_sessionmaker(make_engine(loopback_settings.database_url))
    [outcome] = webhooks.deliver_due(factory, loopback_settings)
    assert outcome.state == "delivered"
    [(headers, body)] = receiver.received
    assert webhooks.verify_signature(SECRET, headers["X-Diffqueue-Signature"], body)

    [done] = loopback_client.get(f"/api/v1/jobs/{job['id']}/webhooks").get_json()["deliveries"]
    assert (done["state"], done["attempts"], done["last_status_code"], done["last_error"]) == ("delivered", 1, 200,
                                                                                              None)
    assert done["delivered_at"] is not None and done["next_attempt_at"] is None
    assert loopback_client.get(f"/api/v1/jobs/{'0' * 32}/webhooks").status_code == 404


# ------------------------------------------------------------------ schedules
def schedule_body(**extra) -> dict:
    return {"name": "nightly plot", "cron": "0 3 * * *", "kind": "ddpm.schedule_plot", "params": {}, **extra}


def test_a_schedules_jobs_inherit_its_webhook(loopback_client, receiver):
    resp = loopback_client.post("/api/v1/schedules", json=schedule_body(
        webhook_url=receiver.url, webhook_events=["completed"], webhook_secret=SECRET))
    assert resp.status_code == 201, resp.get_json()
    schedule = resp.get_json()
    assert schedule["webhook"] == {"url": receiver.url, "events": ["completed"], "secret_set": True}
    assert SECRET not in resp.get_data(as_text=True)

    job = loopback_client.post(f"/api/v1/schedules/{schedule['id']}/run-now").get_json()
    assert job["webhook"] == schedule["webhook"]

    # Removing the URL removes its events and secret with it.
    patched = loopback_client.patch(f"/api/v1/schedules/{schedule['id']}", json={"webhook_url": None})
    assert patched.status_code == 200, patched.get_json()
    assert patched.get_json()["webhook"] is None
    job = loopback_client.post(f"/api/v1/schedules/{schedule['id']}/run-now").get_json()
    assert job["webhook"] is None


def test_schedule_webhooks_are_checked_like_jobs(client):
    resp = client.post("/api/v1/schedules", json=schedule_body(webhook_url="http://169.254.169.254/"))
    assert resp.status_code == 400
    assert NON_PUBLIC in resp.get_json()["fields"]["webhook_url"]
    assert client.get("/api/v1/schedules").get_json()["total"] == 0
    created = client.post("/api/v1/schedules", json=schedule_body()).get_json()
    resp = client.patch(f"/api/v1/schedules/{created['id']}", json={"webhook_url": "ftp://example.com/"})
    assert resp.status_code == 400 and "got scheme 'ftp'" in resp.get_json()["fields"]["webhook_url"]
