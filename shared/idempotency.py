"""Idempotent submits: an `Idempotency-Key` header on POST /api/v1/jobs or /uploads
(Stripe's convention).

A client that never got the answer to a submit (the connection dropped, the database
was cut mid-request, a 5xx) cannot tell whether its job was made. With a key it sends
the same request again: the key is written in the same transaction as the job (or
upload), so either both exist or neither does, and the same key from the same user
within WINDOW answers with that resource, marked `Idempotent-Replayed: true`. The same
key with a different request (another body, or the other endpoint) is refused
(IdempotencyConflict, a 422): it is a client bug, and guessing which it meant would
hide it. Keys older than WINDOW are free again; retention deletes their rows.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import IdempotencyConflict, SpecError
from shared.models import IdempotencyKey, User, utcnow

HEADER = "Idempotency-Key"
WINDOW = timedelta(hours=24)
MAX_KEY_CHARS = 255
KEY_RE = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_KEY_CHARS)  # visible ASCII: a UUID, a hash, a name
ANONYMOUS = "-"  # the owner key with auth off


@dataclass(frozen=True)
class Claim:
    """A request that carried a key: whose, which, where to, and what it asked."""

    owner_key: str
    key: str
    endpoint: str
    fingerprint: str


def claim(raw_key: str | None, owner: User | None, endpoint: str, request_bytes: bytes) -> Claim | None:
    """The request's Claim, or None without a key; a malformed key is a SpecError naming the header."""
    if raw_key is None:
        return None
    if not KEY_RE.fullmatch(raw_key):
        reason = f"must be 1 to {MAX_KEY_CHARS} visible ASCII characters (a UUID, say)"
        raise SpecError(f"{HEADER}: {reason}", {HEADER: reason})
    return Claim(owner.id if owner is not None else ANONYMOUS, raw_key, endpoint,
                 hashlib.sha256(request_bytes).hexdigest())


def earlier(session: Session, claim: Claim, now: datetime | None = None) -> str | None:
    """The id of what the key's first request made, if it came within WINDOW; None if
    the key is new. IdempotencyConflict if it came with a different request."""
    row = session.scalar(select(IdempotencyKey).where(
        IdempotencyKey.owner_key == claim.owner_key, IdempotencyKey.key == claim.key,
        IdempotencyKey.created_at > (now or utcnow()) - WINDOW))
    if row is None:
        return None
    if (row.endpoint, row.fingerprint) != (claim.endpoint, claim.fingerprint):
        what = "another request body" if row.endpoint == claim.endpoint else f"POST /api/v1/{row.endpoint}"
        reason = (f"this key was used {row.created_at:%Y-%m-%d %H:%M} UTC with {what}; send a new key "
                  "for a new request")
        raise IdempotencyConflict(f"{HEADER}: {reason}", {HEADER: reason})
    return row.resource_id


def record(session: Session, claim: Claim | None, resource_id: str) -> None:
    """Write the key in the transaction that made `resource_id`. An older row of the same
    key (past WINDOW) gives way; two requests at once with a new key meet the unique
    constraint, and the second one's transaction, its resource included, rolls back."""
    if claim is None:
        return
    session.execute(delete(IdempotencyKey).where(
        IdempotencyKey.owner_key == claim.owner_key, IdempotencyKey.key == claim.key,
        IdempotencyKey.created_at <= utcnow() - WINDOW))
    session.add(IdempotencyKey(owner_key=claim.owner_key, key=claim.key, endpoint=claim.endpoint,
                               fingerprint=claim.fingerprint, resource_id=resource_id))
    session.flush()


def once(factory: sessionmaker[Session], claim: Claim | None, make: Callable[[], str]) -> tuple[str, bool]:
    """(resource id, replayed): what the key's first request made, or `make()`'s new one
    (`make` calls `record` in its transaction). A request racing another with the same new
    key loses on the unique constraint and answers with the winner's resource."""
    if claim is not None:
        with factory() as session:
            found = earlier(session, claim)
        if found is not None:
            return found, True
    try:
        return make(), False
    except IntegrityError:
        if claim is None:
            raise
        with factory() as session:
            found = earlier(session, claim)
        if found is None:
            raise
        return found, True


def forget_old(session: Session, now: datetime | None = None) -> int:
    """Delete keys past WINDOW (retention calls this); how many went."""
    return session.execute(delete(IdempotencyKey).where(
        IdempotencyKey.created_at <= (now or utcnow()) - WINDOW)).rowcount
