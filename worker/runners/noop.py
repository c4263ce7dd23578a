"""noop: do nothing, or sleep `sleep_s`, and succeed. It measures the queue's own
overhead (bench/queue.py: submit to running, claim to finished) with no model, torch
work or artifact in the way. Enabled with DIFFQUEUE_ENABLE_NOOP=1.
"""
from __future__ import annotations

import time

from shared.specs import NoopSpec
from worker.context import JobContext

TICK_S = 0.1  # a sleeping noop looks for a cancel or a SIGTERM this often


def run(spec: NoopSpec, ctx: JobContext) -> dict:
    started = time.monotonic()
    deadline = started + spec.sleep_s
    # 1. Sleep in ticks, so a cancel or a stopping worker ends it as any other job.
    while (left := deadline - time.monotonic()) > 0:
        ctx.check_cancelled()
        time.sleep(min(TICK_S, left))
    # 2. One progress write: the job's last step, as a real runner reports it.
    ctx.progress(1, 1, "done")
    return {"slept_s": round(time.monotonic() - started, 6)}
