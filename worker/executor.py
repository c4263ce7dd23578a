"""Claim a job, run its runner, record the outcome: the one guarded place.

Like rq's `perform_job`: every outcome (succeeded, failed with message and
traceback, cancelled) is written here, conditional on the claim's token, and
nothing is swallowed.
"""
from __future__ import annotations

import logging
import os
import traceback

from shared import jobs
from shared.config import Settings
from shared.db import check_migrated, make_engine, make_sessionmaker
from shared.errors import JobCancelled, LeaseLost
from shared.models import Job, JobStatus
from shared.specs import validate_params
from shared.storage import make_storage
from worker.context import JobContext
from worker.runners import RUNNERS

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, settings: Settings):
        self.settings = settings
        engine = make_engine(settings.database_url)
        check_migrated(engine)
        self.sessions = make_sessionmaker(engine)
        self.storage = make_storage(settings)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)

    def perform(self, job_id: str, worker: str) -> str:
        worker_id = f"{worker}:{os.getpid()}"
        with self.sessions() as session:
            token = jobs.claim(session, job_id, worker_id)
            if token is None:
                log.info("job %s not claimable (duplicate delivery, cancelled or unknown); dropping", job_id)
                return "skipped"
            job = session.get(Job, job_id)
            kind, params = job.kind, job.params
        log.info("job %s (%s) claimed by %s, attempt %d", job_id, kind, worker_id, token)

        ctx = JobContext(self.settings, self.sessions, self.storage, job_id, token, log)
        status, result, error, tb = JobStatus.SUCCEEDED, None, None, None
        try:
            spec = validate_params(kind, params)
            result = RUNNERS[kind](spec, ctx) or {}
        except JobCancelled:
            status, error = JobStatus.CANCELLED, "cancelled by request"
        except LeaseLost:
            log.warning("job %s: this execution lost its claim; leaving the row alone", job_id)
            return "lease-lost"
        except Exception as exc:  # recorded on the job, never swallowed
            status, error, tb = JobStatus.FAILED, f"{type(exc).__name__}: {exc}", traceback.format_exc()
            log.error("job %s failed: %s", job_id, error)
        finally:
            ctx.close()

        with self.sessions() as session:
            if not jobs.finish(session, job_id, token, status, result=result, error=error, traceback=tb):
                log.warning("job %s: outcome %s not recorded, the claim is stale", job_id, status.value)
                return "lease-lost"
        log.info("job %s %s", job_id, status.value)
        return status.value
