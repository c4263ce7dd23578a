"""What each web process keeps between requests: the users behind API tokens and session
cookies, and jobs' JSON for `GET /api/v1/jobs/<id>`, the endpoint clients poll.

Both were looked up on every request: the sign-in query was a third of a GET's time, the
job's query another third (bench/queue.py). What is kept is right at once, not after a
timeout. PostgreSQL NOTIFYs on commit (triggers of migrations 0008 and 0009, whoever
wrote: web, worker, beat, CLI, SQL by hand):
- `diffqueue_auth` when a token is revoked or a user changes or is deleted: everything
  kept is dropped (a job's JSON names its owner);
- `diffqueue_jobs` with a job's id when the job or one of its artifacts changes: that
  job's entries are dropped ('*' after a TRUNCATE: all of them).
Each process LISTENs on a connection of its own, and before every lookup looks at that
connection's socket (no round trip) and reads what has come. If the listening
connection fails, everything is dropped and nothing is kept until a new one listens.
`max_age_s` bounds an entry's life in case a notification was ever missed. A value
loaded while a notification dropped entries is not kept (it may predate the change).
SQLite has no NOTIFY: there nothing is kept.

Values are kept as plain data and handed out as copies: a detached `User` of its own
for each request, so no two requests share an ORM object.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any, Callable, Hashable

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, make_transient_to_detached

from shared import auth
from shared.models import User

log = logging.getLogger(__name__)

AUTH_CHANNEL = "diffqueue_auth"  # migrations/versions/0008_auth_changed_notify.py
JOBS_CHANNEL = "diffqueue_jobs"  # migrations/versions/0009_jobs_changed_notify.py
RELISTEN_AFTER_S = 5.0  # after the listening connection failed, try again this often
MAX_ENTRIES = 10_000  # past this, the oldest entries go first


class WebCache:
    def __init__(self, engine: Engine, max_age_s: float, max_entries: int = MAX_ENTRIES):
        self.engine = engine
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self.enabled = max_age_s > 0 and engine.dialect.name == "postgresql"
        self._lock = threading.Lock()
        # group -> {sub-key -> (expires, value)}: a job's group holds its JSON per host URL.
        self._entries: dict[str, dict[Hashable, tuple[float, Any]]] = {}
        self._generation = 0  # bumped whenever anything is dropped
        self._listener = None  # psycopg connection, LISTENing on both channels
        self._retry_at = 0.0

    # ------------------------------------------------------------ users
    def user_for_token(self, db: Session, secret: str) -> User | None:
        columns = self.get("token:" + auth.hash_token(secret), None,
                           lambda: _columns(auth.user_for_token(db, secret)))
        return None if columns is None else _detached(columns)

    def user_by_id(self, db: Session, user_id: str) -> User | None:
        columns = self.get("user:" + user_id, None, lambda: _columns(db.get(User, user_id)))
        return None if columns is None else _detached(columns)

    # ------------------------------------------------------------ any value
    def get(self, group: str, sub: Hashable, load: Callable[[], Any]) -> Any:
        """The value kept under (group, sub), or `load()`'s, kept unless None. Values
        must not be changed by callers: they are shared by requests."""
        if not self.enabled or not self._fresh():
            return load()
        with self._lock:
            hit = self._entries.get(group, {}).get(sub)
            generation = self._generation
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        value = load()
        if value is not None:
            with self._lock:
                if generation == self._generation:
                    if group not in self._entries and len(self._entries) >= self.max_entries:
                        del self._entries[next(iter(self._entries))]
                    self._entries.setdefault(group, {})[sub] = (time.monotonic() + self.max_age_s, value)
        return value

    def peek(self, group: str, sub: Hashable) -> Any:
        """The value kept under (group, sub), up to date; None if there is none."""
        if not self.enabled or not self._fresh():
            return None
        with self._lock:
            hit = self._entries.get(group, {}).get(sub)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    # ------------------------------------------------------------ listening
    def _fresh(self) -> bool:
        """True if what is kept can be trusted: the listener is up, and what it has
        received has been applied."""
        with self._lock:
            if self._listener is None and not self._listen():
                return False
            try:
                if readable(self._listener.fileno()):
                    # Readable: notifications, or the server ending the connection.
                    for note in self._listener.notifies(timeout=0):
                        self._apply(note.channel, note.payload)
                    if self._listener.closed:
                        raise OSError("the listening connection closed")
            except Exception as e:  # noqa: BLE001 - whatever went wrong, nothing kept is trusted
                log.warning("web cache: stopped listening (%s); looking things up until it listens again", e)
                self._drop_listener()
                return False
            return True

    def _apply(self, channel: str, payload: str) -> None:
        if channel == JOBS_CHANNEL and payload != "*":
            self._entries.pop("job:" + payload, None)
            # Even with nothing kept of it: a request may be loading it right now, from
            # before the change, and must not keep what it loaded.
            self._generation += 1
        else:
            self._clear()

    def _listen(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            fairy = self.engine.raw_connection()
            fairy.detach()  # its own connection, never returned to the pool
            conn = fairy.dbapi_connection
            conn.autocommit = True
            conn.execute(f"LISTEN {AUTH_CHANNEL}")
            conn.execute(f"LISTEN {JOBS_CHANNEL}")
        except Exception as e:  # noqa: BLE001 - nothing kept until it can listen; requests look things up
            log.warning("web cache: cannot LISTEN (%s); trying again in %gs", e, RELISTEN_AFTER_S)
            self._retry_at = time.monotonic() + RELISTEN_AFTER_S
            return False
        self._listener = conn
        self._clear()  # anything kept before this listened may have missed a change
        return True

    def _drop_listener(self) -> None:
        try:
            self._listener.close()
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        self._listener = None
        self._retry_at = time.monotonic() + RELISTEN_AFTER_S
        self._clear()

    def _clear(self) -> None:
        self._entries.clear()
        self._generation += 1

    def changed_users(self) -> None:
        """This process changed a user (signed them out): drop what is kept now, as the
        NOTIFY of that commit will, so this process's next request cannot come before it."""
        with self._lock:
            self._clear()

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._drop_listener()


def readable(fd: int) -> bool:
    """Whether a socket has something to read (or was closed), without waiting. poll, not
    select: select fails on descriptors past 1023."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _columns(user: User | None) -> dict | None:
    return None if user is None else {c.key: getattr(user, c.key) for c in inspect(User).column_attrs}


def _detached(columns: dict) -> User:
    """A User of its own for one request, detached as if loaded and expunged."""
    user = User(**columns)
    make_transient_to_detached(user)
    return user
