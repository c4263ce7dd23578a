"""A file a process touches while it is alive, for container healthchecks.

A busy Celery worker on the solo pool runs its job in the thread that would answer
`celery inspect ping`, so a ping says a healthy worker training for an hour is dead. A
worker instead touches DIFFQUEUE_LIVENESS_FILE from a thread every heartbeat, and beat
at every tick; `diffqueue alive FILE --max-age-s N` (the healthcheck) fails once the
file is older than N seconds: the process hung, or is gone.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path


def touch(path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def age_s(path: Path) -> float | None:
    """Seconds since `path` was last touched; None if it does not exist."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None


def keep_touching(path: Path | None, every_s: float) -> threading.Event | None:
    """Touch `path` now and every `every_s` from a daemon thread; set the returned event to stop."""
    if path is None:
        return None
    stop = threading.Event()

    def run() -> None:
        while True:
            touch(path)
            if stop.wait(every_s):
                return

    threading.Thread(target=run, name="liveness", daemon=True).start()
    return stop
