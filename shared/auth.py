"""Users, API tokens and who may see what.

A token is random, shown once, and stored as its SHA-256 (a fast hash is enough for
256 random bits; passwords, which people choose, get werkzeug's salted scrypt).
Every job, upload and schedule has an `owner_id`. A viewer sees their own rows;
an admin, or nobody signed in with auth off (the embedded single-user mode), sees all.
Rows of others are reported as not found, never as forbidden, so ids leak nothing.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, joinedload
from werkzeug.security import check_password_hash, generate_password_hash

from shared.errors import AuthError, QuotaExceeded, SpecError
from shared.models import ApiToken, Job, JobStatus, User, utcnow

TOKEN_PREFIX = "dq_"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
# A refused submit over the queued-jobs cap asks the client to come back after this long.
QUOTA_RETRY_AFTER_S = 30
# last_used_at is a hint for the token listing; writing it on every request would turn
# every GET into a write, so it is refreshed at most this often.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Compared against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = generate_password_hash("not a password")
# `job:<32 hex>` at the start of a param value: a model or an image another job wrote.
JOB_REF = re.compile(r"^job:([0-9a-f]{32})(?:/|$)")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ------------------------------------------------------------------ users
def check_user_name(name: str) -> str:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise SpecError(
            f"user name {name!r} must be 1-64 characters: letters, digits and _ . @ -, starting with a letter or digit",
            {"user": "1-64 of A-Z a-z 0-9 _ . @ -"},
        )
    return name


def get_user(session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def create_user(session: Session, name: str, admin: bool = False, password: str | None = None) -> User:
    """A new user (SpecError if the name is taken or malformed)."""
    check_user_name(name)
    if get_user(session, name) is not None:
        raise SpecError(f"user {name!r} already exists", {"user": "already exists"})
    user = User(name=name, is_admin=admin)
    if password is not None:
        set_password(user, password)
    session.add(user)
    session.flush()
    return user


def set_password(user: User, password: str) -> None:
    """Set the user's password, and end every web session they had: a password is
    changed because someone else may know the old one, and may hold a cookie too."""
    if len(password) < MIN_PASSWORD:
        raise SpecError(f"password must be at least {MIN_PASSWORD} characters", {"password": f">= {MIN_PASSWORD} chars"})
    user.password_hash = generate_password_hash(password)
    # In Python, not `User.session_epoch + 1`: a new user (create_user) is not inserted yet.
    user.session_epoch = (user.session_epoch or 0) + 1


def end_sessions(session: Session, user_id: str) -> None:
    """End every web session of the user (sign-out): the cookies they were given carry
    the old epoch, which web/auth.py refuses. One UPDATE, so two at once both count."""
    session.execute(update(User).where(User.id == user_id).values(session_epoch=User.session_epoch + 1))


def check_password(session: Session, name: str, password: str) -> User | None:
    """The user with this name and password, or None (the same time either way)."""
    user = get_user(session, name) if isinstance(name, str) else None
    stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
    ok = check_password_hash(stored, password or "")
    return user if ok and user is not None and user.password_hash else None


# ------------------------------------------------------------------ tokens
def create_token(session: Session, user: User, name: str = "") -> tuple[ApiToken, str]:
    """A new token for `user`: the row, and the secret, which is not stored and is
    shown to the caller once."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name[:100], token_hash=hash_token(secret), prefix=secret[:10])
    session.add(row)
    session.flush()
    return row, secret


def user_for_token(session: Session, secret: str) -> User | None:
    """The user a live token belongs to, or None. Looked up by hash: equal hashes are
    the only match, so there is no timing to compare."""
    if not secret or not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    # The user in the same query: this runs before every request with a token.
    row = session.scalar(select(ApiToken).options(joinedload(ApiToken.user))
                         .where(ApiToken.token_hash == hash_token(secret)))
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return row.user


def list_tokens(session: Session, user: User | None = None) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.created_at)
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(session.scalars(query))


def revoke_token(session: Session, token_id: str, viewer: User | None = None) -> ApiToken:
    """Revoke by id or by prefix; a non-admin viewer only their own."""
    row = session.get(ApiToken, token_id) or session.scalar(select(ApiToken).where(ApiToken.prefix == token_id))
    if row is None or not can_see(row.user_id, viewer):
        raise AuthError(f"no token {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


# ------------------------------------------------------------------ ownership
def owner_id_of(viewer: User | None) -> str | None:
    return viewer.id if viewer is not None else None


def can_see(owner_id: str | None, viewer: User | None) -> bool:
    """None (auth off) and admins see everything; anyone else only their own rows."""
    return viewer is None or viewer.is_admin or owner_id == viewer.id


def visible(query, model, viewer: User | None):
    """`query` restricted to the rows of `model` that `viewer` may see."""
    if viewer is None or viewer.is_admin:
        return query
    return query.where(model.owner_id == viewer.id)


def check_job_refs(session: Session, params: dict[str, Any], viewer: User | None) -> None:
    """A `job:<id>` param (a model, an init image) must name a job the viewer may see:
    another user's model is 'not found', as its id would be anywhere else."""
    for name, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            match = JOB_REF.match(item) if isinstance(item, str) else None
            if match is None:
                continue
            job = session.get(Job, match.group(1))
            if job is None or not can_see(job.owner_id, viewer):
                reason = f"job:{match.group(1)} not found"
                raise SpecError(f"{name}: {reason}", {name: reason})


def check_quota(session: Session, owner: User | None, max_queued: int | None) -> None:
    """Refuse (QuotaExceeded) a new queued job for an owner who already has `max_queued`
    (None: no cap). The owner's row is locked first (Postgres), so two submits at once
    cannot both pass."""
    if max_queued is None:
        return
    if owner is not None and session.bind.dialect.name == "postgresql":
        session.execute(select(User.id).where(User.id == owner.id).with_for_update())
    queued = session.scalar(
        select(func.count()).select_from(Job).where(
            Job.owner_id.is_(None) if owner is None else Job.owner_id == owner.id,
            Job.status == JobStatus.QUEUED.value,
        )
    )
    if queued >= max_queued:
        raise QuotaExceeded(
            f"{queued} jobs are already queued for {owner.name if owner else 'this service'}; "
            f"the limit is {max_queued} (DIFFQUEUE_MAX_QUEUED_PER_USER): wait for some to start",
            retry_after_s=QUOTA_RETRY_AFTER_S,
        )

