"""The users behind recently seen API tokens and session cookies, kept by each web process.

Looking the user up was a third of a GET's time (bench/queue.py): a query for the token
and its user on every request. The cache keeps the user's columns, and every lookup,
kept or not, answers with a detached `User` of its own, so no two requests share an ORM
object and none outlives its DB session attached to it.

It is right at once, not after a timeout: migration 0008 has PostgreSQL NOTIFY
`diffqueue_auth` on commit whenever a token is revoked or a user changes or is deleted,
whoever wrote it (the web, the CLI, SQL by hand). Each process LISTENs on a connection of
its own, and before every lookup it looks at that connection's socket (no round trip):
a notification drops everything kept. If the listening connection fails, the cache
empties and is not used until a new one listens. `max_age_s` bounds an entry's life in
case a notification was ever missed. SQLite has no NOTIFY: there it keeps nothing.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from typing import Callable

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, make_transient_to_detached

from shared import auth
from shared.models import User

log = logging.getLogger(__name__)

CHANNEL = "diffqueue_auth"  # migrations/versions/0008_auth_changed_notify.py
RELISTEN_AFTER_S = 5.0  # after the listening connection failed, try again this often


class AuthCache:
    def __init__(self, engine: Engine, max_age_s: float):
        self.engine = engine
        self.max_age_s = max_age_s
        self.enabled = max_age_s > 0 and engine.dialect.name == "postgresql"
        self._lock = threading.Lock()
        self._users: dict[str, tuple[float, dict]] = {}  # key -> (expires, User columns)
        self._generation = 0  # bumped whenever the cache empties
        self._listener = None  # psycopg connection, LISTENing on CHANNEL
        self._retry_at = 0.0

    # ------------------------------------------------------------ lookups
    def user_for_token(self, db: Session, secret: str) -> User | None:
        return self._cached("token:" + auth.hash_token(secret), lambda: auth.user_for_token(db, secret))

    def user_by_id(self, db: Session, user_id: str) -> User | None:
        return self._cached("user:" + user_id, lambda: db.get(User, user_id))

    def _cached(self, key: str, load: Callable[[], User | None]) -> User | None:
        if not self.enabled or not self._fresh():
            user = load()
            return None if user is None else _detached(_columns(user))
        with self._lock:
            hit = self._users.get(key)
            generation = self._generation
        if hit is not None and hit[0] > time.monotonic():
            return _detached(hit[1])
        user = load()
        if user is None:
            return None
        columns = _columns(user)
        with self._lock:
            # A notification that emptied the cache since this load began may be about
            # this very user: then what was loaded is not kept.
            if generation == self._generation:
                self._users[key] = (time.monotonic() + self.max_age_s, columns)
        return _detached(columns)

    # ------------------------------------------------------------ listening
    def _fresh(self) -> bool:
        """True if what is kept can be trusted: the listener is up and has no unread
        notification (any there empties the cache first)."""
        with self._lock:
            if self._listener is None and not self._listen():
                return False
            try:
                if select.select([self._listener.fileno()], [], [], 0)[0]:
                    # Readable: notifications, or the server ending the connection.
                    for _ in self._listener.notifies(timeout=0):
                        self._clear()
                    if self._listener.closed:
                        raise OSError("the listening connection closed")
            except Exception as e:  # noqa: BLE001 - whatever went wrong, nothing kept is trusted
                log.warning("auth cache: stopped listening for %s (%s); looking users up until it listens again",
                            CHANNEL, e)
                self._drop_listener()
                return False
            return True

    def _listen(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            fairy = self.engine.raw_connection()
            fairy.detach()  # its own connection, never returned to the pool
            conn = fairy.dbapi_connection
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
        except Exception as e:  # noqa: BLE001 - no cache until it can listen; requests look users up
            log.warning("auth cache: cannot LISTEN %s (%s); trying again in %gs", CHANNEL, e, RELISTEN_AFTER_S)
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
        self._users.clear()
        self._generation += 1

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._drop_listener()


def _columns(user: User) -> dict:
    return {c.key: getattr(user, c.key) for c in inspect(User).column_attrs}


def _detached(columns: dict) -> User:
    """A User of its own for one request, detached as if loaded and expunged."""
    user = User(**columns)
    make_transient_to_detached(user)
    return user
