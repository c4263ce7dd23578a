"""Webhooks against a real HTTP receiver on 127.0.0.1 (`webhook_allow_private` on, as
loopback is refused otherwise): the outbox rows the lifecycle writes, signatures,
retries with backoff driven by a controlled clock, the SSRF re-check at send time,
TLS to a pinned address, and two senders at once on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
from dataclasses import replace
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import delete, select

from shared import jobs, webhooks
from shared.db import make_engine, make_sessionmaker
from shared.models import Job, JobStatus, WebhookDelivery, utcnow
from tests.webhook_receiver import Receiver

SECRET = "s3cret-for-the-tests-0123"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, sqlite_settings):
    base = replace(sqlite_settings, webhook_allow_private=True, webhook_backoff_s=2.0, webhook_max_attempts=3,
                   webhook_timeout_s=5.0)
    if request.param == "postgres":
        # The session's shared database: deliver_due sends every due row, so start
        # from an empty outbox rather than other tests' leftovers.
        base = replace(base, database_url=request.getfixturevalue("pg_url"))
        with make_factory(base)() as session:
            session.execute(delete(WebhookDelivery))
            session.commit()
    return base


@pytest.fixture
def sqlite_only(sqlite_settings):
    return replace(sqlite_settings, webhook_allow_private=True, webhook_backoff_s=2.0, webhook_max_attempts=3,
                   webhook_timeout_s=5.0)


def make_factory(settings):
    return make_sessionmaker(make_engine(settings.database_url))


def insert_job(factory, url: str | None, events=None, secret=SECRET) -> str:
    """A queued ddpm.schedule_plot job (the cheapest kind), small enough to run in a second."""
    with factory() as session:
        job = Job(kind="ddpm.schedule_plot", params={"image_size": 8, "num_timesteps_shown": 2}, queue="cpu", status=JobStatus.QUEUED.value, webhook_url=url,
                  webhook_events=events, webhook_secret=secret if url else None)
        session.add(job)
        session.commit()
        return job.id


def deliveries(factory, job_id: str) -> list[WebhookDelivery]:
    with factory() as session:
        return webhooks.list_deliveries(session, job_id)


def run_to_completion(factory, job_id: str) -> None:
    with factory() as session:
        token = jobs.claim(session, job_id, "w1", 60)
        assert jobs.finish(session, job_id, token, JobStatus.SUCCEEDED, result={"loss": 0.25})


# ------------------------------------------------------------------ signatures
def test_signature_verifies_with_the_secret_and_fails_otherwise(sqlite_only, receiver):
    factory = make_factory(sqlite_only)
    job_id = insert_job(factory, receiver.url, events=["completed"])
    run_to_completion(factory, job_id)
    now = utcnow()
    [outcome] = webhooks.deliver_due(factory, sqlite_only, now)
    assert outcome.state == "delivered" and outcome.status_code == 200

    [(headers, body)] = receiver.received
    assert headers["X-Diffqueue-Event"] == "completed"
    assert headers["X-Diffqueue-Delivery"] == str(outcome.delivery_id)
    assert headers["Host"] == f"127.0.0.1:{receiver.port}"
    signature = headers["X-Diffqueue-Signature"]
    t = int(signature.split(",")[0].removeprefix("t="))
    assert t == int(now.timestamp())
    assert webhooks.verify_signature(SECRET, signature, body, now=t)
    assert not webhooks.verify_signature("another-secret-0123456", signature, body, now=t)
    assert not webhooks.verify_signature(SECRET, signature, body.replace(b"succeeded", b"failed"), now=t)
    assert not webhooks.verify_signature(SECRET, signature, body, now=t + webhooks.SIGNATURE_TOLERANCE_S + 1)
    assert not webhooks.verify_signature(SECRET, None, body, now=t)
    # The scheme as documented, computed independently.
    expected = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert signature == f"t={t},v1={expected}"


def test_without_a_job_secret_the_server_key_signs_and_is_not_the_session_key(sqlite_only, receiver):
    factory = make_factory(sqlite_only)
    job_id = insert_job(factory, receiver.url, events=["completed"], secret=None)
    run_to_completion(factory, job_id)
    webhooks.deliver_due(factory, sqlite_only)
    [(headers, body)] = receiver.received
    key = webhooks.server_secret(sqlite_only)
    assert key != sqlite_only.secret_key
    assert webhooks.verify_signature(key, headers["X-Diffqueue-Signature"], body)
    assert not webhooks.verify_signature(sqlite_only.secret_key, headers["X-Diffqueue-Signature"], body)
    configured = replace(sqlite_only, webhook_secret="configured-webhook-secret")
    assert webhooks.server_secret(configured) == "configured-webhook-secret"


# ------------------------------------------------------------------ the outbox
def test_event_filter_and_jobs_without_a_webhook(settings, receiver):
    factory = make_factory(settings)
    only_completed = insert_job(factory, receiver.url, events=["completed"])
    default_events = insert_job(factory, receiver.url, events=None)
    no_hook = insert_job(factory, None)
    for job_id in (only_completed, default_events, no_hook):
        with factory() as session:
            token = jobs.claim(session, job_id, "w1", 60)
            assert jobs.report_progress(session, job_id, token, 1, 2, "half", webhook_progress_interval_s=0)
            assert jobs.finish(session, job_id, token, JobStatus.FAILED, error="boom")
    assert [d.event for d in deliveries(factory, only_completed)] == ["completed"]
    assert [d.event for d in deliveries(factory, default_events)] == ["started", "completed"]  # no progress
    assert deliveries(factory, no_hook) == []
    [completed] = deliveries(factory, only_completed)
    assert completed.payload["job"]["status"] == "failed" and completed.payload["job"]["error"] == "boom"


def test_a_stale_execution_writes_no_event(settings, receiver):
    """The outbox row is fenced with the write it reports: a finish with a stale token
    changes nothing and sends nothing."""
    factory = make_factory(settings)
    job_id = insert_job(factory, receiver.url, events=["completed"])
    with factory() as session:
        token = jobs.claim(session, job_id, "w1", 60)
        assert not jobs.finish(session, job_id, token + 1, JobStatus.SUCCEEDED, result={})
    assert deliveries(factory, job_id) == []
    assert webhooks.deliver_due(factory, settings) == []
    assert receiver.received == []


def test_cancel_of_a_queued_job_reports_completed_cancelled(sqlite_only, receiver):
    factory = make_factory(sqlite_only)
    job_id = insert_job(factory, receiver.url)
    with factory() as session:
        jobs.cancel(session, job_id)
        session.commit()
    [d] = deliveries(factory, job_id)
    assert d.event == "completed" and d.payload["job"]["status"] == "cancelled"


def test_progress_events_are_throttled_per_job(sqlite_only):
    factory = make_factory(sqlite_only)
    job_id = insert_job(factory, "http://127.0.0.1:9/hook", events=["progress"])
    t0 = utcnow()
    with factory() as session:
        job = session.get(Job, job_id)
        made = [webhooks.add_event(session, job, "progress", now=t0 + timedelta(seconds=s), progress_interval_s=30)
                for s in (0, 10, 29.9, 30, 45, 61)]
        session.commit()
    assert [m is not None for m in made] == [True, False, False, True, False, True]
    assert [d.created_at for d in deliveries(factory, job_id)] == [t0 + timedelta(seconds=s) for s in (0, 30, 61)]


# ------------------------------------------------------------------ retries
def test_a_receiver_failing_twice_gets_the_event_on_the_third_attempt(settings):
    receiver = Receiver(script=[500, 502])
    try:
        factory = make_factory(settings)
        job_id = insert_job(factory, receiver.url, events=["completed"])
        run_to_completion(factory, job_id)
        t0 = utcnow()

        [first] = webhooks.deliver_due(factory, settings, t0)
        assert (first.state, first.status_code) == ("pending", 500)
        [d] = deliveries(factory, job_id)
        assert d.attempts == 1 and d.next_attempt_at == t0 + timedelta(seconds=2)  # backoff x 2^0
        assert d.last_error == "HTTP 500: down for maintenance"

        assert webhooks.deliver_due(factory, settings, t0 + timedelta(seconds=1.9)) == []  # not due yet
        [second] = webhooks.deliver_due(factory, settings, t0 + timedelta(seconds=2))
        assert (second.state, second.status_code) == ("pending", 502)
        [d] = deliveries(factory, job_id)
        assert d.attempts == 2 and d.next_attempt_at == t0 + timedelta(seconds=2 + 4)  # backoff x 2^1

        [third] = webhooks.deliver_due(factory, settings, t0 + timedelta(seconds=6))
        assert (third.state, third.status_code) == ("delivered", 200)
        [d] = deliveries(factory, job_id)
        assert (d.state, d.attempts, d.last_status_code, d.last_error) == ("delivered", 3, 200, None)
        assert d.delivered_at == t0 + timedelta(seconds=6)
        # The same delivery each time: one id, one body, three signatures.
        assert len(receiver.received) == 3
        assert {h["X-Diffqueue-Delivery"] for h, _ in receiver.received} == {str(d.id)}
        assert len({body for _, body in receiver.received}) == 1
        assert webhooks.deliver_due(factory, settings, t0 + timedelta(hours=1)) == []
    finally:
        receiver.close()


def test_failed_after_max_attempts_with_the_code_logged(sqlite_only):
    receiver = Receiver(script=[503] * 10)
    try:
        factory = make_factory(sqlite_only)
        job_id = insert_job(factory, receiver.url, events=["completed"])
        run_to_completion(factory, job_id)
        t = utcnow()
        states = []
        for _ in range(sqlite_only.webhook_max_attempts):
            states += [o.state for o in webhooks.deliver_due(factory, sqlite_only, t)]
            t += timedelta(hours=1)
        assert states == ["pending", "pending", "failed"]
        [d] = deliveries(factory, job_id)
        assert (d.state, d.attempts, d.last_status_code) == ("failed", 3, 503)
        assert d.last_error == "HTTP 503: down for maintenance" and d.delivered_at is None
        assert webhooks.deliver_due(factory, sqlite_only, t + timedelta(days=1)) == []
        assert len(receiver.received) == 3
    finally:
        receiver.close()


def test_an_unreachable_receiver_is_logged_and_holds_back_the_jobs_later_events(sqlite_only, receiver):
    factory = make_factory(sqlite_only)
    closed_port = urlsplit(receiver.url).port
    receiver.close()  # nothing listens there now
    job_id = insert_job(factory, f"http://127.0.0.1:{closed_port}/hook")
    run_to_completion(factory, job_id)
    t0 = utcnow()
    [outcome] = webhooks.deliver_due(factory, sqlite_only, t0)
    assert outcome.status_code is None and outcome.error.startswith("ConnectionError")
    started, completed = deliveries(factory, job_id)
    assert (started.event, started.attempts, started.last_error) == ("started", 1, outcome.error)
    # completed is due, but goes out only after started: in order, per job.
    assert (completed.state, completed.attempts) == ("pending", 0)


def test_the_address_is_checked_again_at_send_time(sqlite_only, receiver):
    """A URL accepted earlier (allow_private then, or DNS that has since changed) is
    refused at the send, and nothing reaches the receiver."""
    factory = make_factory(sqlite_only)
    job_id = insert_job(factory, receiver.url, events=["completed"])
    run_to_completion(factory, job_id)
    strict = replace(sqlite_only, webhook_allow_private=False)
    [outcome] = webhooks.deliver_due(factory, strict)
    assert outcome.status_code is None
    assert outcome.error.startswith("refused: webhook_url host '127.0.0.1' resolves to 127.0.0.1")
    assert receiver.received == []


# ------------------------------------------------------------------ end to end
def test_a_job_run_end_to_end_sends_started_progress_completed_in_order(sqlite_only, receiver, run_inline):
    factory = make_factory(sqlite_only)
    job_id = insert_job(factory, receiver.url, events=["started", "progress", "completed"])
    job = run_inline.again(job_id, sqlite_only)
    assert job.status == "succeeded"
    # The runner reports progress several times (progress_interval_s is 0 here); the
    # 30 s webhook throttle lets one through.
    assert [d.event for d in deliveries(factory, job_id)] == ["started", "progress", "completed"]

    outcomes = webhooks.deliver_due(factory, sqlite_only)
    assert [o.state for o in outcomes] == ["delivered"] * 3
    assert receiver.events() == ["started", "progress", "completed"]
    started, progress, completed = (json.loads(body) for _, body in receiver.received)
    for event in (started, progress, completed):
        assert event["job"]["id"] == job_id and event["job"]["kind"] == "ddpm.schedule_plot"
        assert event["job"]["attempt"] == 1 and event["job"]["path"] == f"/api/v1/jobs/{job_id}"
        dt.datetime.fromisoformat(event["occurred_at"])
    assert started["job"]["status"] == "running" and started["job"]["progress"]["message"] == "starting"
    assert progress["job"]["progress"]["message"] == "noise schedules"
    assert completed["job"]["status"] == "succeeded" and completed["job"]["error"] is None
    assert completed["job"]["result"] == job.result
    names = {a["name"] for a in completed["job"]["artifacts"]}
    assert names == {a.name for a in job.artifacts} and "schedules.png" in names
    assert completed["job"]["artifacts_total"] == len(job.artifacts)
    png = next(a for a in completed["job"]["artifacts"] if a["name"] == "schedules.png")
    assert png["path"] == f"/api/v1/jobs/{job_id}/artifacts/schedules.png" and png["content_type"] == "image/png"
    for headers, body in receiver.received:
        assert webhooks.verify_signature(SECRET, headers["X-Diffqueue-Signature"], body)


# ------------------------------------------------------------------ concurrency
def test_two_senders_at_once_send_each_delivery_once(settings, receiver):
    factory = make_factory(settings)
    job_ids = [insert_job(factory, receiver.url, events=["completed"]) for _ in range(6)]
    for job_id in job_ids:
        run_to_completion(factory, job_id)
    results: list = []
    barrier = threading.Barrier(2)

    def sender():
        barrier.wait()
        results.extend(webhooks.deliver_due(make_factory(settings), settings))

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.state for o in results) == ["delivered"] * 6
    ids = [h["X-Diffqueue-Delivery"] for h, _ in receiver.received]
    assert len(ids) == 6 and len(set(ids)) == 6
    with factory() as session:
        rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id.in_(job_ids))).all()
    assert {(r.state, r.attempts) for r in rows} == {("delivered", 1)}


# ------------------------------------------------------------------ TLS to a pinned address
@pytest.fixture
def self_signed(tmp_path):
    """A certificate for `localhost` (and one for another name), signed by themselves."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
                .not_valid_after(now + timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        path = tmp_path / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return str(path)

    return {"localhost": make("localhost"), "other": make("other.test")}


def test_tls_to_the_checked_address_still_verifies_the_hostname(self_signed):
    good = Receiver(certfile=self_signed["localhost"])
    wrong = Receiver(certfile=self_signed["other"])
    try:
        parts = urlsplit(f"https://localhost:{good.port}/hook")
        status, _ = webhooks.post_pinned(parts, "127.0.0.1", b"{}", {}, 5, verify=self_signed["localhost"])
        assert status == 200
        [(headers, _)] = good.received
        assert headers["Host"] == f"localhost:{good.port}"
        # A server at the pinned address whose certificate is not for the URL's host is refused.
        with pytest.raises(requests.exceptions.SSLError):
            webhooks.post_pinned(urlsplit(f"https://localhost:{wrong.port}/hook"), "127.0.0.1", b"{}", {}, 5,
                                 verify=self_signed["other"])
        assert wrong.received == []
    finally:
        good.close()
        wrong.close()
