"""Webhooks: a job's events POSTed to its `webhook_url`, signed, retried, logged.

Events (`webhook_events`, a subset; the default leaves out progress, which is chatty):
- `started`: a worker claimed the job (once per attempt: a re-queued job starts again);
- `progress`: a progress write, at most one per `webhook_progress_interval_s` per job;
- `completed`: the job finished: succeeded, failed or cancelled (`job.status` says which).

The outbox: `job_event` / `add_event` add a `WebhookDelivery` row in the caller's
transaction, the one that writes the status change it reports, so a rolled-back or
fenced-off write (a stale execution) sends nothing and a committed one is never lost.
Beat sends due rows (`deliver_due`, each tick after the reaper); a failure is retried
after `webhook_backoff_s * 2^(attempt-1)` seconds, and after `webhook_max_attempts` the
row is `failed`. Every row stays as the job's delivery log. A job's deliveries go out
in the order they were made: one still pending holds back the later ones.

Signature: header `X-Diffqueue-Signature: t=<unix seconds>,v1=<hex>` where hex is
HMAC-SHA256(secret, "<t>.<raw body>"). The secret is the job's `webhook_secret`, else
the server's `DIFFQUEUE_WEBHOOK_SECRET`, else a key derived from `DIFFQUEUE_SECRET_KEY`
(never that key itself: it signs web sessions). Receivers check it with
`verify_signature` and refuse old timestamps (replays).

SSRF: the URL must be http(s) with no credentials, and every address its host resolves
to must be public unless `webhook_allow_private`. That is checked at submit and again at
each send, and the send connects to the address it checked (TLS still verifies the
hostname), so a DNS answer that changes in between cannot point a delivery inward.
Redirects are not followed.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping
from urllib.parse import SplitResult, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import exists, func, select, text, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from shared.config import Settings
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
MAX_DELIVERIES_PER_TICK = 100
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
def _is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


def resolve_url(url: Any, allow_private: bool) -> tuple[SplitResult, list[str]]:
    """Check a webhook URL and resolve its host; return the split URL and its addresses.
    ValueError says why it is refused: not http(s), credentials in it, too long, a host
    that does not resolve, or (unless `allow_private`) any address that is not public."""
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
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ValueError("has an invalid port (allowed: 1 to 65535)") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"host {parts.hostname!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    if not allow_private:
        internal = [a for a in addresses if _is_internal(ipaddress.ip_address(a))]
        if internal:
            raise ValueError(
                f"host {parts.hostname!r} resolves to {', '.join(internal)}: private, loopback, link-local, "
                "multicast and reserved addresses are refused (DIFFQUEUE_WEBHOOK_ALLOW_PRIVATE=1 allows them)"
            )
    return parts, addresses


def validate_fields(data: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The `webhook_*` fields of a job submit or a schedule, checked; returns the columns
    to store (all None without a URL). SpecError names each bad field and its bound."""
    url, events, secret = (data.get(name) for name in FIELDS)
    errors: dict[str, str] = {}
    if url is None:
        for name in ("webhook_events", "webhook_secret"):
            if data.get(name) is not None:
                errors[name] = "given without a webhook_url"
    else:
        try:
            resolve_url(url, settings.webhook_allow_private)
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
class _PinnedAdapter(HTTPAdapter):
    """Connects to the address in the request URL (the one that was checked) while TLS
    sends SNI for, and checks the certificate against, the webhook's own hostname."""

    def __init__(self, hostname: str):
        self._hostname = hostname  # before super().__init__, which builds the pool manager
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, server_hostname=self._hostname, assert_hostname=self._hostname, **kwargs)


def post_pinned(parts: SplitResult, address: str, body: bytes, headers: dict[str, str], timeout_s: float,
                verify: bool | str = True) -> tuple[int, bytes]:
    """POST `body` to the URL `parts`, connected to `address` rather than a fresh DNS
    answer; return the status code and the start of the response body. No redirects,
    no proxies from the environment, no retries here."""
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    with requests.Session() as session:
        session.trust_env = False  # an HTTP(S)_PROXY would connect elsewhere than the checked address
        adapter = _PinnedAdapter(parts.hostname)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        with session.post(target, data=body, headers={**headers, "Host": parts.netloc}, timeout=timeout_s,
                          allow_redirects=False, stream=True, verify=verify) as response:
            return response.status_code, response.raw.read(ERROR_BODY_CHARS, decode_content=True)


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
    # The next address only when this one could not be reached (no IPv6 route, ...). A
    # resend after a dropped connection can duplicate: receivers dedupe by delivery id.
    for address in addresses:
        try:
            status_code, start = post_pinned(parts, address, body, headers, settings.webhook_timeout_s)
            break
        except requests.ConnectionError as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
        except requests.RequestException as exc:  # a read timeout, ...: it may have arrived, try later
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


def deliver_due(factory: sessionmaker[Session], settings: Settings, now: datetime | None = None,
                budget_s: float | None = None) -> list[Outcome]:
    """Send the deliveries due at `now` (default: the clock, read per delivery), at most
    MAX_DELIVERIES_PER_TICK, and no new one after `budget_s` seconds, so a slow receiver
    cannot hold up beat's other work for long. Returns each attempt's outcome."""
    started = time.monotonic()
    outcomes: list[Outcome] = []
    seen: set[int] = set()
    for _ in range(MAX_DELIVERIES_PER_TICK):
        if budget_s is not None and time.monotonic() - started > budget_s:
            break
        at = now or utcnow()
        claimed = _claim_next(factory, settings, at, seen)
        if claimed is None:
            break
        if isinstance(claimed, Outcome):
            seen.add(claimed.delivery_id)
            outcomes.append(claimed)
            continue
        seen.add(claimed.id)
        status_code, error = _send(claimed, settings, at)
        outcomes.append(_record(factory, settings, claimed, status_code, error, now or utcnow()))
    return outcomes
