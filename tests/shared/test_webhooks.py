"""Webhooks against a real HTTP receiver on 127.0.0.1 (`webhook_allow_private` on, as
loopback is refused otherwise): the outbox rows the lifecycle writes, signatures,
retries with backoff driven by a controlled clock, the SSRF re-check at send time,
TLS to a pinned address, and two senders at once on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import ssl
import threading
import time
from dataclasses import replace
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from sqlalchemy import delete, select

from shared import jobs, webhooks
from shared.db import make_engine, make_sessionmaker
from shared.errors import SpecError
from shared.models import Job, JobStatus, WebhookDelivery, utcnow
from tests.webhook_receiver import Receiver, Trickler

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


# ------------------------------------------------------------------ the SSRF filter
@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1",
    "2002:7f00:1::", "2002:a9fe:a9fe::",  # 6to4 of loopback and of the metadata address
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "fec0::1", "fefe::1",  # site-local (fec0::/10)
    "192.0.0.9", "192.0.0.255",  # IETF protocol assignments, all of 192.0.0.0/24
    "192.88.99.1",  # the 6to4 relay anycast
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1",  # NAT64 of loopback, metadata, 10.0.0.1
    "2001:0:7f00:1::1",  # Teredo, server 127.0.0.1
    "2001:0:808:808::3f57:fffe",  # Teredo, public server, client 192.168.0.1 (stored inverted)
])
def test_non_public_addresses_are_refused_without_echoing_them(address):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(ValueError) as refused:
        webhooks.resolve_url(f"http://{host}/hook", allow_private=False)
    message = str(refused.value)
    assert message.startswith(f"host {address!r} resolves to a non-public address and is refused")
    assert "DIFFQUEUE_WEBHOOK_ALLOW_PRIVATE=1" in message
    assert message.count(address) == 1  # the host as given, and nothing it resolves to
    parts, addresses = webhooks.resolve_url(f"http://{host}/hook", allow_private=True)
    assert [ipaddress.ip_address(a) for a in addresses] == [ipaddress.ip_address(address)]


@pytest.mark.parametrize("address", [
    "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8",
    "2002:808:808::1",  # 6to4 of a public address
    "64:ff9b::808:808",  # NAT64 of a public address: what DNS64 answers on an IPv6-only network
])
def test_public_addresses_and_their_ipv6_forms_are_accepted(address):
    host = f"[{address}]" if ":" in address else address
    _, addresses = webhooks.resolve_url(f"https://{host}/hook", allow_private=False)
    assert [ipaddress.ip_address(a) for a in addresses] == [ipaddress.ip_address(address)]


def test_a_name_resolving_inward_is_refused_without_its_address(sqlite_settings):
    with pytest.raises(SpecError) as refused:
        webhooks.validate_fields({"webhook_url": "http://localhost:8080/hook"}, sqlite_settings)
    message = refused.value.fields["webhook_url"]
    assert message.startswith("host 'localhost' resolves to a non-public address and is refused")
    assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)


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
    assert outcome.status_code is None and outcome.error.startswith("ConnectionRefusedError")
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
    assert outcome.error.startswith("refused: webhook_url host '127.0.0.1' resolves to a non-public address")
    assert outcome.error.count("127.0.0.1") == 1  # the host as given, not what it resolves to
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
        status, _ = webhooks.post_pinned(parts, "127.0.0.1", b"{}", {}, 5, ca_file=self_signed["localhost"])
        assert status == 200
        [(headers, _)] = good.received
        assert headers["Host"] == f"localhost:{good.port}"
        # A server at the pinned address whose certificate is not for the URL's host is refused.
        with pytest.raises(ssl.SSLCertVerificationError):
            webhooks.post_pinned(urlsplit(f"https://localhost:{wrong.port}/hook"), "127.0.0.1", b"{}", {}, 5,
                                 ca_file=self_signed["other"])
        assert wrong.received == []
    finally:
        good.close()
        wrong.close()


# ------------------------------------------------------------------ a receiver that trickles
def test_a_trickling_receiver_is_cut_off_at_the_deadline_and_retried(sqlite_only):
    """One byte every 0.5 s never trips a per-read timeout; the delivery's deadline on the
    whole response ends it, as a failed attempt with the usual backoff."""
    trickler = Trickler(interval_s=0.5)
    settings = replace(sqlite_only, webhook_timeout_s=2.0)
    try:
        factory = make_factory(settings)
        job_id = insert_job(factory, trickler.url, events=["completed"])
        run_to_completion(factory, job_id)
        t0 = utcnow()
        outcomes: list = []
        # On a thread, so that a sender with no deadline fails this test instead of hanging it.
        sender = threading.Thread(target=lambda: outcomes.extend(webhooks.deliver_due(factory, settings, t0)),
                                  daemon=True)
        started = time.monotonic()
        sender.start()
        sender.join(timeout=30)
        elapsed = time.monotonic() - started
        assert not sender.is_alive(), "the send to a trickling receiver did not end at its deadline"
        assert 2.0 <= elapsed < 10, elapsed  # at the 2 s deadline (generously), not minutes later
        assert trickler.connections == 1
        [outcome] = outcomes
        assert (outcome.state, outcome.status_code) == ("pending", None)
        assert outcome.error == "no complete response within 2 s"
        [d] = deliveries(factory, job_id)
        assert (d.attempts, d.last_error) == (1, "no complete response within 2 s")
        assert d.next_attempt_at == t0 + timedelta(seconds=settings.webhook_backoff_s)
    finally:
        trickler.close()


def test_a_tls_receiver_trickling_its_answer_is_cut_off_at_the_deadline(self_signed):
    trickler = Trickler(interval_s=0.3, certfile=self_signed["localhost"])
    try:
        parts = urlsplit(f"https://localhost:{trickler.port}/hook")
        started = time.monotonic()
        with pytest.raises(webhooks.DeliveryTimeout, match="no complete response within 1.5 s"):
            webhooks.post_pinned(parts, "127.0.0.1", b"{}", {}, 1.5, ca_file=self_signed["localhost"])
        assert 1.5 <= time.monotonic() - started < 8
        assert trickler.connections == 1
    finally:
        trickler.close()


def test_the_pool_sends_each_jobs_events_in_order_past_a_receiver_that_hangs(settings, receiver):
    """Beat's senders: eight threads, one of them held by a trickling receiver, while
    three jobs' events still go out at once and each job's in the order made."""
    trickler = Trickler(interval_s=0.5)
    settings = replace(settings, webhook_timeout_s=60.0, beat_interval_s=0.1)
    factory = make_factory(settings)
    stuck = insert_job(factory, trickler.url, events=["completed"])
    run_to_completion(factory, stuck)
    job_ids = [insert_job(factory, receiver.url, events=["started", "progress", "completed"]) for _ in range(3)]
    for job_id in job_ids:
        with factory() as session:
            token = jobs.claim(session, job_id, "w1", 60)
            assert jobs.report_progress(session, job_id, token, 1, 2, "half", webhook_progress_interval_s=0)
            assert jobs.finish(session, job_id, token, JobStatus.SUCCEEDED, result={})
    pool = webhooks.DeliveryPool(factory, settings).start()
    try:
        deadline = time.monotonic() + 30
        while len(receiver.received) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(receiver.received) == 9
        assert trickler.connections == 1 and trickler.hung_up == 0  # still hanging on to its send
        for job_id in job_ids:
            sent = [json.loads(body)["event"] for _, body in receiver.received
                    if json.loads(body)["job"]["id"] == job_id]
            assert sent == ["started", "progress", "completed"]
    finally:
        stopping = time.monotonic()
        pool.stop(grace_s=1.0)
        stopped_in = time.monotonic() - stopping
        trickler.close()
    assert stopped_in < 5  # the grace, not the trickling send's 60 s deadline
    with factory() as session:
        [held] = webhooks.list_deliveries(session, stuck)
    assert (held.state, held.attempts) == ("pending", 1)  # claimed: no other sender takes it within its deadline
