"""Failpoints: named places in the worker where a test can inject a fault.

`DIFFQUEUE_FAILPOINTS` is a comma-separated list of `name[@step]=action`, e.g.
`checkpoint.published@4=pause`. Actions: `pause` (block, so a test can SIGKILL
the worker at a known point), `kill` (SIGKILL this process), `raise` (an
exception, which fails the job). Empty in production: `hit` is then a dict lookup.
Like FreeBSD's fail(9) and TiKV's fail-rs, much smaller.
"""
from __future__ import annotations

import logging
import os
import signal
import time

ACTIONS = ("pause", "kill", "raise")


class InjectedFault(RuntimeError):
    """Raised by a `raise` failpoint."""


def parse(spec: str) -> dict[tuple[str, int | None], str]:
    points: dict[tuple[str, int | None], str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, action = item.partition("=")
        name, _, step = where.partition("@")
        if action not in ACTIONS or not name:
            raise ValueError(f"bad failpoint {item!r}: expected name[@step]=action with action in {ACTIONS}")
        points[(name, int(step) if step else None)] = action
    return points


def hit(points: dict[tuple[str, int | None], str], name: str, step: int | None, log: logging.Logger) -> None:
    action = points.get((name, step)) or points.get((name, None))
    if action is None:
        return
    log.warning("failpoint %s@%s: %s", name, step, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise InjectedFault(f"failpoint {name}@{step}")
    while True:  # pause until the test kills this process
        time.sleep(3600)
