"""Cross-job batching ("coalescing"): a worker that claims a job it can batch also
claims compatible queued jobs and renders them all as one denoising batch.

Compatible means the same batch key: sd.txt2img and sd.sweep jobs share one if
model, variant, dtype, VAE, size, steps and scheduler match (both are rows of
prompt-conditioned guidance); ddpm.sample jobs if model, steps and scheduler match
(the model fixes the size). A job is batched if it has one step count, and its
images with the batch's stay within `coalesce_max_rows` (the worker's cap, which in a
batch stands in for each job's own `batch_size`: a 9-scale sweep of batch 8 joins
one); colour-guided sampling, img2img, prompts files and `compile` always run alone.

The job row stays the truth: partners are claimed with `jobs.claim` (queued ->
running, each with its own fencing token), so their own broker messages, arriving
later here or at another worker, find them not claimable and are dropped. Each job
keeps its own seeds, progress, cancel, lease, artifacts and outcome; the executor
records those (worker/executor.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import select

from shared import jobs
from shared.config import Settings
from shared.errors import WorkerShuttingDown
from shared.models import Job, JobStatus
from shared.specs import Spec, validate_params

log = logging.getLogger(__name__)

SD_KINDS = ("sd.txt2img", "sd.sweep")
POLL_S = 0.01  # between looks for partners while the wait lasts


def batch_key(kind: str, spec: Spec) -> tuple | None:
    """What a job must share with another to be rendered in its batch; None: always alone."""
    if kind in SD_KINDS:
        if spec.compile:
            return None  # a compiled UNet is specialised to its batch shape
        if kind == "sd.txt2img" and spec.prompts is None:
            return None  # a prompts file: its row count is unknown until it is read
        step_counts = (spec.steps_list or [spec.steps]) if kind == "sd.sweep" else [spec.steps]
        if len(set(step_counts)) != 1:
            return None
        return ("sd", spec.model, spec.variant, spec.torch_dtype, spec.vae, spec.vae_tiling, spec.width, spec.height,
                step_counts[0], spec.scheduler)
    if kind == "ddpm.sample":
        if spec.guidance is not None:
            return None  # guidance takes a gradient through each batch of its own
        return ("ddpm", spec.model, spec.steps, spec.scheduler)
    return None


def batch_rows(kind: str, spec: Spec) -> int:
    """Images the job puts into the batch."""
    if kind == "sd.txt2img":
        return len(spec.prompts) * spec.num_images_per_prompt
    if kind == "sd.sweep":
        return len(spec.guidance_scales) * len(spec.seeds) * len(spec.steps_list or [spec.steps])
    return spec.num_images


@dataclass
class Member:
    """A claimed job of a batch."""

    job_id: str
    token: int
    kind: str
    spec: Spec


def gather(sessions, settings: Settings, leader: Member, worker_id: str) -> list[Member]:
    """Claim queued jobs with the leader's batch key, highest priority and oldest
    first, until `coalesce_max_rows` images are reached or `coalesce_wait_s` has
    passed. A queued job whose params do not validate, or that another worker claims
    first, is left alone. Returns the partners (the leader not included)."""
    key = batch_key(leader.kind, leader.spec)
    if key is None:
        return []
    kinds = SD_KINDS if leader.kind in SD_KINDS else (leader.kind,)
    rows = batch_rows(leader.kind, leader.spec)
    partners: list[Member] = []
    passed: set[str] = {leader.job_id}  # looked at and not taken: not looked at again
    deadline = time.monotonic() + settings.coalesce_wait_s
    try:
        while rows < settings.coalesce_max_rows:
            with sessions() as session:
                queued = session.execute(
                    select(Job.id, Job.kind, Job.params)
                    .where(Job.status == JobStatus.QUEUED.value, Job.kind.in_(kinds),
                           Job.cancel_requested.is_(False), Job.id.not_in(passed))
                    .order_by(Job.priority.desc(), Job.created_at)
                    .limit(settings.coalesce_max_rows)
                ).all()
            for job_id, kind, params in queued:
                passed.add(job_id)
                try:
                    spec = validate_params(kind, params)
                except Exception:  # its own worker will fail it, with the message
                    continue
                if batch_key(kind, spec) != key or rows + batch_rows(kind, spec) > settings.coalesce_max_rows:
                    continue
                with sessions() as session:
                    token = jobs.claim(session, job_id, worker_id, settings.lease_s, settings.max_attempts)
                if token is None:  # another worker was first
                    continue
                log.info("job %s (%s) coalesced into job %s's batch, attempt %d", job_id, kind, leader.job_id, token)
                partners.append(Member(job_id, token, kind, spec))
                rows += batch_rows(kind, spec)
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
    except Exception:  # the database blinked: the jobs claimed so far are this batch, the rest wait their turn
        log.exception("job %s: looking for jobs to batch with failed; going on with %d", leader.job_id, len(partners))
    return partners


def each_live(live: list[int], on_error: Callable[[int, Exception], None], fn: Callable[[int], None]) -> list[int]:
    """Run `fn(k)` for each job k still in the batch; those whose `fn` raises leave it
    (reported through `on_error`). WorkerShuttingDown stops the whole batch."""
    kept = []
    for k in live:
        try:
            fn(k)
        except WorkerShuttingDown:
            raise
        except Exception as exc:
            on_error(k, exc)
        else:
            kept.append(k)
    return kept


def plan(member: Member, ctx, loaded: dict):
    """A batched job's plan, through its runner's own `plan`."""
    from worker.runners import ddpm_sample, sd_sweep, sd_txt2img

    if member.kind == "ddpm.sample":
        return ddpm_sample.plan(member.spec, ctx, loaded)
    return {"sd.txt2img": sd_txt2img.plan, "sd.sweep": sd_sweep.plan}[member.kind](member.spec, ctx)


def render(kind: str, plans: list, device: str, on_error: Callable[[int, Exception], None]) -> dict:
    """Every plan's images as one denoising batch: {plan index: images}."""
    if kind == "ddpm.sample":
        from worker.diffusion import ddpm_denoise_coalesced

        return ddpm_denoise_coalesced(plans, device, on_error)
    from worker.sd import render_coalesced

    return render_coalesced(plans, on_error)
