"""Training checkpoints in the job's own storage, written so a crash never loses the
last complete one.

One file per checkpoint, `checkpoints/step-000500.pt`. The storage write is atomic
(a local temp file renamed in; one S3 PUT), and the artifact row is recorded only
after it, so every listed checkpoint is complete. Older ones are deleted only after
the new one is listed. A checkpoint holds the spec and the step with the states.
"""
from __future__ import annotations

import logging
import re

import torch

from worker.context import JobContext

PREFIX = "checkpoints/"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}step-{step:06d}.pt"


def _step_of(name: str) -> int:
    match = re.search(r"step-(\d+)\.pt$", name)
    return int(match.group(1)) if match else -1


def listed(ctx: JobContext) -> list[str]:
    """This job's complete checkpoints, oldest first."""
    return sorted(ctx.artifact_names(PREFIX), key=_step_of)


def save(ctx: JobContext, step: int, state: dict, keep: int) -> None:
    tmp = ctx.workdir / "checkpoint.pt"
    torch.save(state, tmp)
    ctx.failpoint("checkpoint.writing", step)
    ctx.write_file(checkpoint_name(step), tmp, "application/octet-stream", {"step": step})
    tmp.unlink()
    ctx.failpoint("checkpoint.published", step)
    for old in listed(ctx)[:-keep]:
        ctx.delete_artifact(old)


def load_latest(ctx: JobContext, spec_params: dict, log: logging.Logger) -> dict | None:
    """The newest readable checkpoint made with the same spec, or None."""
    for name in reversed(listed(ctx)):
        try:
            state = torch.load(ctx.download_artifact(name), map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s: %s); trying an older one", name, type(exc).__name__, exc)
            continue
        if state.get("spec") != spec_params:
            log.warning("checkpoint %s was made with other params; not resuming from it", name)
            continue
        return state
    return None
