"""Webhooks: a job's events POSTed to its `webhook_url`, signed, retried, logged.

Events (`webhook_events`, a subset; the default leaves out progress, which is chatty):
- `started`: a worker claimed the job (once per attempt: a re-queued job starts again);
- `progress`: a progress write, at most one per `webhook_progress_interval_s` per job;
- `completed`: the job finished: succeeded, failed or cancelled (`job.status` says which).

The outbox: `job_event` / `add_event` add a `WebhookDelivery` row in the caller's
transaction, the one that writes the status change it reports, so a rolled-back or
fenced-off write (a stale execution) sends nothing and a committed one is never lost.
Beat sends due rows on threads of its own (`DeliveryPool`, `webhook_concurrency`
senders), so that a slow receiver never delays its tick; each send must be done, whole
response included, within `webhook_timeout_s`. A failure (a non-2xx, no complete
response in time, ...) is retried after `webhook_backoff_s * 2^(attempt-1)` seconds,
and after `webhook_max_attempts` the row is `failed`. Every row stays as the job's
delivery log. A job's deliveries go out in the order they were made: one still pending
holds back the later ones.

Signature: header `X-Diffqueue-Signature: t=<unix seconds>,v1=<hex>` where hex is
HMAC-SHA256(secret, "<t>.<raw body>"). The secret is the job's `webhook_secret`, else
the server's `DIFFQUEUE_WEBHOOK_SECRET`, else a key derived from `DIFFQUEUE_SECRET_KEY`
(never that key itself: it signs web sessions). Receivers check it with
`verify_signature` and refuse old timestamps (replays).

SSRF: the URL must be http(s) with no credentials, and every address its host resolves
to must be public unless `webhook_allow_private` (so must the IPv4 address inside an
IPv4-mapped, NAT64, 6to4 or Teredo one). That is checked at submit and again at each
send, and the send connects to the address it checked (TLS still verifies
the hostname), so a DNS answer that changes in between cannot point a delivery inward.
Redirects are not followed; no proxy is used.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping
from urllib.parse import SplitResult, urlsplit, urlunsplit

import requests.certs
from requests.utils import requote_uri
from sqlalchemy import exists, func, select, text, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from shared.config import ConfigError, Settings
from shared.errors import SpecError
from shared.models import Job, WebhookDelivery, utcnow

log = logging.getLogger(__name__)

EVENTS = ("started", "progress", "completed")
DEFAULT_EVENTS = ("started", "completed")
FIELDS = ("webhook_url", "webhook_events", "webhook_secret")
MAX_URL_CHARS = 2048
SECRET_MIN_CHARS, SECRET_MAX_CHARS = 16, 256  # the column holds 256

SIGNATURE_HEADER = "X-Diffqueue-Signature"
EVENT_HEADER = "X-Diffqueue-Event"
DELIVERY_HEADER = "X-Diffqueue-Delivery"
# How old a signature's timestamp a receiver should accept, by default (seconds).
SIGNATURE_TOLERANCE_S = 300
# A sender holds a claimed row for its timeout plus this (seconds); if it dies
# mid-send, another beat sends the row again after that.
CLAIM_SLACK_S = 30.0
MAX_DELIVERIES_PER_RUN = 100  # of deliver_due
# A send in flight when beat stops gets this long to end (seconds); see DeliveryPool.stop.
STOP_GRACE_S = 5.0
# What of a refusing receiver's body is kept in last_error (characters).
ERROR_BODY_CHARS = 300
# A completed event lists at most this many artifacts (a sweep can make hundreds).
MAX_PAYLOAD_ARTIFACTS = 100
# A result larger than this (JSON characters) is summarised by its keys.
MAX_PAYLOAD_RESULT_CHARS = 4096


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


# ------------------------------------------------------------------ validation
# Refused although the ipaddress module counts them global: all of 192.0.0.0/24 (IETF
# protocol assignments; the module marks only parts), the old 6to4 relay anycast, and
# IPv6 site-local addresses (deprecated, yet still routed inside some networks).
REFUSED_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24", "fec0::/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 written as IPv6 reaches that IPv4 address, and is judged as it:
        # ::ffff:127.0.0.1 and NAT64's 64:ff9b::7f00:1 both reach 127.0.0.1.
        if ip.ipv4_mapped:
            return _is_internal(ip.ipv4_mapped)
        if ip in NAT64:
            return _is_internal(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
        # 6to4 and Teredo carry IPv4 addresses a relay delivers to: those must be public too.
        embedded = [ip.sixtofour] if ip.sixtofour else list(ip.teredo or ())
        if any(_is_internal(v4) for v4 in embedded):
            return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or any(ip in net for net in REFUSED_NETWORKS))


def split_url(url: Any) -> tuple[SplitResult, int]:
    """Check a webhook URL's form; return it split, and its port. ValueError says why it
    is refused: not a string, too long, not http(s), credentials in it, no host, a bad port."""
    if not isinstance(url, str) or not url:
        raise ValueError("must be a non-empty string (an http or https URL)")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be at most {MAX_URL_CHARS} characters, got {len(url)}")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("must not contain whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an http or https URL, got scheme {parts.scheme or '(none)'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (user:password@); sign with webhook_secret instead")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        return parts, parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ValueError("has an invalid port (allowed: 1 to 65535)") from None


def resolve_url(url: Any, allow_private: bool) -> tuple[SplitResult, list[str]]:
    """Check a webhook URL (`split_url`) and resolve its host; return the split URL and its
    addresses. ValueError says why it is refused: its form, a host that does not
    resolve, or (unless `allow_private`) any address that is not public."""
    parts, port = split_url(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"host {parts.hostname!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    # Which addresses are never said: the message would map internal DNS for whoever submits.
    if not allow_private and any(_is_internal(ipaddress.ip_address(a)) for a in addresses):
        raise ValueError(f"host {parts.hostname!r} resolves to a non-public address and is refused: only public "
                         "addresses are allowed (DIFFQUEUE_WEBHOOK_ALLOW_PRIVATE=1 allows private ones)")
    return parts, addresses


def validate_fields(data: Mapping[str, Any], settings: Settings, resolve: bool = True) -> dict[str, Any]:
    """The `webhook_*` fields of a job submit or a schedule, checked; returns the columns
    to store (all None without a URL). SpecError names each bad field and its bound.
    `resolve`: also look the host up and refuse non-public addresses now (a schedule's
    tick does not: a slow DNS answer must not hold it, and every send checks again)."""
    url, events, secret = (data.get(name) for name in FIELDS)
    errors: dict[str, str] = {}
    if url is None:
        for name in ("webhook_events", "webhook_secret"):
            if data.get(name) is not None:
                errors[name] = "given without a webhook_url"
    else:
        try:
            resolve_url(url, settings.webhook_allow_private) if resolve else split_url(url)
        except ValueError as exc:
            errors["webhook_url"] = str(exc)
        if events is None:
            events = list(DEFAULT_EVENTS)
        elif (not isinstance(events, list) or not events
              or not all(isinstance(e, str) and e in EVENTS for e in events)):
            errors["webhook_events"] = f"must be a non-empty list of {', '.join(EVENTS)}; got {events!r}"
        else:
            events = [e for e in EVENTS if e in events]  # canonical order, no repeats
        if secret is not None and (not isinstance(secret, str)
                                   or not SECRET_MIN_CHARS <= len(secret) <= SECRET_MAX_CHARS):
            got = f"{len(secret)} characters" if isinstance(secret, str) else type(secret).__name__
            errors["webhook_secret"] = (f"must be a string of {SECRET_MIN_CHARS} to {SECRET_MAX_CHARS} "
                                        f"characters, got {got}")
    if errors:
        raise SpecError("invalid webhook: " + "; ".join(f"{k}: {v}" for k, v in errors.items()), errors)
    if url is None:
        return {name: None for name in FIELDS}
    return {"webhook_url": url, "webhook_events": events, "webhook_secret": secret}


def inherited(source: Any) -> dict[str, Any]:
    """The webhook columns of a schedule (or job), for the jobs it makes."""
    return {name: getattr(source, name) for name in FIELDS}


def public_json(source: Any) -> dict | None:
    """What the API shows of a webhook: never the secret."""
    if not source.webhook_url:
        return None
    return {"url": source.webhook_url, "events": source.webhook_events or list(DEFAULT_EVENTS),
            "secret_set": bool(source.webhook_secret)}


# ------------------------------------------------------------------ signatures
def server_secret(settings: Settings) -> str:
    """The key for webhooks with no secret of their own: DIFFQUEUE_WEBHOOK_SECRET, or one
    derived from DIFFQUEUE_SECRET_KEY, which must not itself be handed to receivers
    (it signs web sessions)."""
    if settings.webhook_secret:
        return settings.webhook_secret
    return hmac.new(settings.secret_key.encode(), b"diffqueue webhook signing key", hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Diffqueue-Signature value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str | None, body: bytes, tolerance_s: float = SIGNATURE_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """For receivers: True if `header` (X-Diffqueue-Signature) signs the raw `body` with
    `secret` and its timestamp is within `tolerance_s` seconds of `now` (unix seconds).
    Any `v1=` entry may match, so a sender may list several during a key rotation."""
    if not header:
        return False
    timestamp, candidates = None, []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, c) for c in candidates)


# ------------------------------------------------------------------ the outbox
def payload(job: Job, event: str, now: datetime) -> dict[str, Any]:
    """What a delivery sends: the event, when, and the job as it is in this transaction."""
    body: dict[str, Any] = {
        "event": event,
        "occurred_at": now.isoformat(),
        "job": {
            "id": job.id,
            "kind": job.kind,
            "status": job.status,
            "attempt": job.attempt,
            "progress": {"step": job.progress_step, "total": job.progress_total, "message": job.progress_message},
            "error": job.error,
            "schedule_id": job.schedule_id,
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "path": f"/api/v1/jobs/{job.id}",
        },
    }
    if event == "completed":
        result = job.result
        if result is not None and len(json.dumps(result, default=str)) > MAX_PAYLOAD_RESULT_CHARS:
            result = {"truncated": True, "keys": sorted(result)}
        artifacts = list(job.artifacts)
        body["job"]["result"] = result
        body["job"]["artifacts_total"] = len(artifacts)
        # Paths, not absolute URLs: shared/ does not know the address the web answers on.
        body["job"]["artifacts"] = [
            {"name": a.name, "size": a.size, "content_type": a.content_type,
             "path": f"/api/v1/jobs/{job.id}/artifacts/{a.name}"}
            for a in artifacts[:MAX_PAYLOAD_ARTIFACTS]
        ]
    return body


def wants(job: Job, event: str) -> bool:
    return bool(job.webhook_url) and event in (job.webhook_events or DEFAULT_EVENTS)


def add_event(session: Session, job: Job, event: str, body: dict | None = None, now: datetime | None = None,
              progress_interval_s: float = Settings.webhook_progress_interval_s) -> WebhookDelivery | None:
    """Add the delivery of `event` for `job` to `session` (the caller commits it with the
    change it reports). None when the job has no webhook, filters the event out, or (a
    progress event) had one less than `progress_interval_s` ago."""
    assert event in EVENTS, event
    if not wants(job, event):
        return None
    now = now or utcnow()
    if event == "progress":
        last = session.scalar(select(func.max(WebhookDelivery.created_at))
                              .where(WebhookDelivery.job_id == job.id, WebhookDelivery.event == "progress"))
        if last is not None and (now - last).total_seconds() < progress_interval_s:
            return None
    delivery = WebhookDelivery(job_id=job.id, event=event, payload=body or payload(job, event, now),
                               state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=now, created_at=now)
    session.add(delivery)
    return delivery


def job_event(session: Session, job_id: str, event: str, now: datetime | None = None,
              progress_interval_s: float = Settings.webhook_progress_interval_s) -> WebhookDelivery | None:
    """`add_event` for a job just changed by an UPDATE in this transaction: re-read only
    when it has a webhook wanting the event (the common case costs one narrow SELECT)."""
    row = session.execute(select(Job.webhook_url, Job.webhook_events).where(Job.id == job_id)).first()
    if row is None or not row.webhook_url or event not in (row.webhook_events or DEFAULT_EVENTS):
        return None
    job = session.get(Job, job_id, populate_existing=True)  # the UPDATE's values, not a stale copy
    return add_event(session, job, event, now=now, progress_interval_s=progress_interval_s)


def list_deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.id)))


def delivery_json(d: WebhookDelivery) -> dict[str, Any]:
    def iso(value):
        return value.isoformat() if value else None

    return {"id": d.id, "event": d.event, "state": d.state, "attempts": d.attempts,
            "next_attempt_at": iso(d.next_attempt_at) if d.state == DeliveryState.PENDING.value else None,
            "last_status_code": d.last_status_code, "last_error": d.last_error,
            "created_at": iso(d.created_at), "delivered_at": iso(d.delivered_at)}


# ------------------------------------------------------------------ sending
class DeliveryTimeout(Exception):
    """No complete response within the delivery's deadline."""


class Unreachable(Exception):
    """The address could not be connected to: another of the host's may be tried."""


@functools.lru_cache(maxsize=4)
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """None: the CA bundle requests uses (certifi's: slim images may have no OS store)."""
    return ssl.create_default_context(cafile=ca_file or requests.certs.where())


def post_pinned(parts: SplitResult, address: str, body: bytes, headers: dict[str, str], timeout_s: float,
                ca_file: str | None = None) -> tuple[int, bytes]:
    """POST `body` to the URL `parts`, connected to `address` rather than a fresh DNS
    answer, with TLS sending SNI for, and checking the certificate against, the URL's own
    hostname (trusting `ca_file`, default certifi's bundle); return the status code and,
    for a non-2xx, the start of the body. All of it (connect, handshake, request,
    response) must be done within `timeout_s`, however slowly the receiver trickles its
    bytes: DeliveryTimeout otherwise. No redirects, no proxies, no retries. Unreachable:
    the connect failed; ssl.SSLError, OSError or http.client.HTTPException: the exchange
    failed after it."""
    deadline = time.monotonic() + timeout_s
    https = parts.scheme.lower() == "https"
    try:
        sock = socket.create_connection((address, parts.port or (443 if https else 80)), timeout=timeout_s)
    except TimeoutError:
        raise DeliveryTimeout(f"no complete response within {timeout_s:g} s") from None
    except OSError as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}") from None
    if https:  # no handshake yet: the watchdog below must already cover it
        sock = _tls_context(ca_file).wrap_socket(sock, server_hostname=parts.hostname, do_handshake_on_connect=False)
    cut_off = threading.Event()

    def cut() -> None:
        # A socket timeout bounds each read, and a byte every few seconds never trips it:
        # shutting the socket down ends whatever read or write is blocked at the deadline.
        # The plain socket's shutdown: SSLSocket's also drops TLS state under that read.
        cut_off.set()
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        if https:
            sock.do_handshake()
        connection = http.client.HTTPConnection(parts.hostname)
        connection.sock = sock  # connected already, to the checked address
        connection.auto_open = 0  # and never a connection of its own, to a fresh DNS answer
        netloc = parts.netloc if parts.netloc.isascii() else parts.netloc.encode("idna").decode("ascii")
        path = requote_uri(urlunsplit(("", "", parts.path or "/", parts.query, "")))
        connection.request("POST", path, body, {**headers, "Host": netloc})
        with connection.getresponse() as response:
            start = b""
            if not 200 <= response.status < 300:
                # The status is the answer; a refusal's body is a courtesy, and one that never
                # ends (or is cut off at the deadline) leaves last_error with the status alone.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    start = response.read(ERROR_BODY_CHARS)
            return response.status, start
    except (OSError, http.client.HTTPException):
        if cut_off.is_set() or time.monotonic() >= deadline:
            raise DeliveryTimeout(f"no complete response within {timeout_s:g} s") from None
        raise
    finally:
        watchdog.cancel()
        sock.close()


@dataclass
class Claimed:
    """A delivery a sender holds: what it needs to send, read under the claim."""

    id: int
    job_id: str
    event: str
    payload: dict
    attempts: int  # including this one
    url: str | None
    secret: str | None


@dataclass
class Outcome:
    delivery_id: int
    state: str
    status_code: int | None
    error: str | None


def _lock_for_claim(session: Session) -> None:
    """SQLite: take the single-writer lock before reading, so two senders never pick
    the same row (PostgreSQL skips locked rows instead)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("BEGIN IMMEDIATE"))


def _claim_next(factory: sessionmaker[Session], settings: Settings, now: datetime,
                seen: set[int]) -> Claimed | Outcome | None:
    """Take the next due delivery, whose job has no earlier one pending, and hold it by
    pushing its next_attempt_at past this send (an Outcome: it was given up on instead).
    The lock is kept only for this short transaction, never across the HTTP request: on
    SQLite that would stall every writer, and the pushed next_attempt_at keeps other
    senders off the row meanwhile."""
    earlier = aliased(WebhookDelivery)
    with factory() as session:
        _lock_for_claim(session)
        row = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.state == DeliveryState.PENDING.value, WebhookDelivery.next_attempt_at <= now,
                   WebhookDelivery.id.not_in(seen),
                   ~exists().where(earlier.job_id == WebhookDelivery.job_id, earlier.id < WebhookDelivery.id,
                                   earlier.state == DeliveryState.PENDING.value))
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        ).first()
        if row is None:
            session.rollback()
            return None
        if row.attempts >= settings.webhook_max_attempts:  # its last sender died mid-send
            row.state, row.next_attempt_at = DeliveryState.FAILED.value, None
            row.last_error = row.last_error or f"gave up after {row.attempts} attempts (the last was interrupted)"
            session.commit()
            return Outcome(row.id, row.state, row.last_status_code, row.last_error)
        job = session.get(Job, row.job_id)
        row.attempts += 1
        row.next_attempt_at = now + timedelta(seconds=settings.webhook_timeout_s + CLAIM_SLACK_S)
        claimed = Claimed(row.id, row.job_id, row.event, row.payload, row.attempts, job.webhook_url,
                          job.webhook_secret)
        session.commit()
    return claimed


def _send(claimed: Claimed, settings: Settings, now: datetime) -> tuple[int | None, str | None]:
    """POST one delivery; (status code, error) where error is None on a 2xx."""
    if not claimed.url:
        return None, "the job has no webhook_url"
    try:
        parts, addresses = resolve_url(claimed.url, settings.webhook_allow_private)
    except ValueError as exc:  # e.g. its DNS now answers a private address (rebinding)
        return None, f"refused: webhook_url {exc}"
    body = json.dumps(claimed.payload, separators=(",", ":"), sort_keys=True).encode()
    secret = claimed.secret or server_secret(settings)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "diffqueue-webhooks/1",
        EVENT_HEADER: claimed.event,
        DELIVERY_HEADER: str(claimed.id),
        SIGNATURE_HEADER: sign(secret, body, int(now.timestamp())),
    }
    error = "no address to connect to"
    timed_out = f"no complete response within {settings.webhook_timeout_s:g} s"
    deadline = time.monotonic() + settings.webhook_timeout_s
    # The next address only when this one could not be reached (no IPv6 route, ...), all
    # within the one deadline. A resend after a dropped connection can duplicate:
    # receivers dedupe by delivery id.
    for address in addresses:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return None, timed_out
        try:
            status_code, start = post_pinned(parts, address, body, headers, remaining_s)
            break
        except Unreachable as exc:
            error = str(exc)[:1000]
        except DeliveryTimeout:
            return None, timed_out
        except (OSError, http.client.HTTPException) as exc:  # it may have arrived: try again later
            return None, f"{type(exc).__name__}: {exc}"[:1000]
    else:
        return None, error
    if 200 <= status_code < 300:
        return status_code, None
    snippet = start.decode("utf-8", "replace").strip()
    return status_code, f"HTTP {status_code}" + (f": {snippet}" if snippet else "")


def _record(factory: sessionmaker[Session], settings: Settings, claimed: Claimed, status_code: int | None,
            error: str | None, now: datetime) -> Outcome:
    """Write the attempt's outcome, if this sender still holds the row (same attempt count)."""
    values: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    if error is None:
        values.update(state=DeliveryState.DELIVERED.value, delivered_at=now, next_attempt_at=None)
    elif claimed.attempts >= settings.webhook_max_attempts:
        values.update(state=DeliveryState.FAILED.value, next_attempt_at=None)
    else:
        backoff_s = settings.webhook_backoff_s * 2 ** (claimed.attempts - 1)
        values.update(next_attempt_at=now + timedelta(seconds=backoff_s))
    with factory() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == claimed.id, WebhookDelivery.attempts == claimed.attempts,
                   WebhookDelivery.state == DeliveryState.PENDING.value)
            .values(**values)
        )
        session.commit()
    state = values.get("state", DeliveryState.PENDING.value)
    if state == DeliveryState.FAILED.value:
        log.warning("webhook delivery %d (job %s, %s) failed after %d attempts: %s", claimed.id, claimed.job_id,
                    claimed.event, claimed.attempts, error)
    return Outcome(claimed.id, state, status_code, error)


def deliver(factory: sessionmaker[Session], settings: Settings, claimed: Claimed,
            now: datetime | None = None) -> Outcome:
    """Send a claimed delivery and record the attempt."""
    status_code, error = _send(claimed, settings, now or utcnow())
    return _record(factory, settings, claimed, status_code, error, now or utcnow())


def deliver_due(factory: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> list[Outcome]:
    """Send the deliveries due at `now` (default: the clock, read per delivery) one after
    another, at most MAX_DELIVERIES_PER_RUN; return each attempt's outcome. For tests and
    one-off runs: beat sends on a DeliveryPool, where a slow receiver holds up nothing else."""
    outcomes: list[Outcome] = []
    seen: set[int] = set()
    for _ in range(MAX_DELIVERIES_PER_RUN):
        claimed = _claim_next(factory, settings, now or utcnow(), seen)
        if claimed is None:
            break
        if isinstance(claimed, Outcome):
            seen.add(claimed.delivery_id)
            outcomes.append(claimed)
            continue
        seen.add(claimed.id)
        outcomes.append(deliver(factory, settings, claimed, now))
    return outcomes


class DeliveryPool:
    """Beat's webhook senders, on `webhook_concurrency` threads of its own: no receiver,
    however slow, holds up the schedule tick or the reaper, and a slow one holds up only
    its own job's later events (the claim skips a delivery whose job has one pending).

    A dispatcher thread claims a due delivery whenever a sender is free, never ahead of
    one (a claim waiting for a sender would spend its deadline unsent), and looks again as
    soon as a send ends, or after beat_interval_s when nothing was due."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings):
        if settings.webhook_concurrency < 1:
            raise ConfigError(f"DIFFQUEUE_WEBHOOK_CONCURRENCY must be at least 1, got {settings.webhook_concurrency}")
        self.factory, self.settings = factory, settings
        self._free = threading.Semaphore(settings.webhook_concurrency)
        self._wake = threading.Event()  # a send ended, or stop
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._senders: set[threading.Thread] = set()
        self._dispatcher = threading.Thread(target=self._dispatch, name="webhook-dispatcher", daemon=True)

    def start(self) -> DeliveryPool:
        self._dispatcher.start()
        return self

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Claim nothing more, and give the sends in flight up to `grace_s` to end. One
        still going then ends with the process (its threads are daemons): its claim runs
        out and a beat sends it again."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + grace_s
        with self._lock:
            threads = [self._dispatcher, *self._senders]
        for thread in threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _dispatch(self) -> None:
        interval_s = self.settings.beat_interval_s
        while not self._stopping.is_set():
            if not self._free.acquire(timeout=interval_s):
                continue  # every sender busy
            self._wake.clear()  # before the claim: a send ending during it makes the next look immediate
            claimed = None
            try:
                claimed = _claim_next(self.factory, self.settings, utcnow(), set())
            except Exception:
                log.exception("webhook claim failed; trying again in %g s", interval_s)
            if isinstance(claimed, Claimed):
                sender = threading.Thread(target=self._deliver, args=(claimed,), name=f"webhook-{claimed.id}",
                                          daemon=True)
                with self._lock:
                    self._senders.add(sender)
                sender.start()
                continue
            self._free.release()
            if not isinstance(claimed, Outcome):  # nothing due, or the database away
                self._wake.wait(interval_s)

    def _deliver(self, claimed: Claimed) -> None:
        try:
            deliver(self.factory, self.settings, claimed)
        except Exception:  # e.g. the database away when recording: the claim runs out and it is sent again
            log.exception("webhook delivery %d (job %s, %s): attempt %d not recorded", claimed.id, claimed.job_id,
                          claimed.event, claimed.attempts)
        finally:
            with self._lock:
                self._senders.discard(threading.current_thread())
            self._free.release()
            self._wake.set()
