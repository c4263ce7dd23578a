"""Claim a job, run its runner, record the outcome: the one guarded place.

Like rq's `perform_job`: every outcome (succeeded, failed with message and
traceback, cancelled) is written here, conditional on the claim's token, and
nothing is swallowed.
"""
from __future__ import annotations

import logging
import os
import threading
import traceback

from celery import Celery
from celery.exceptions import Reject

from shared import jobs
from shared.config import Settings
from shared.db import check_migrated, make_engine, make_sessionmaker, with_reconnect
from shared.errors import JobCancelled, LeaseLost, WorkerShuttingDown
from shared.models import Job, JobStatus
from shared.specs import validate_params
from shared.storage import make_storage
from worker import coalesce, failpoints
from worker.context import JobContext
from worker.runners import RUNNERS
from worker.sd import PipelineCache
from worker.server_paths import hide_server_paths, server_roots

log = logging.getLogger(__name__)


def failure(job_id: str, exc: Exception, settings: Settings) -> tuple:
    """(status, result, error, traceback) for what a runner raised; status None when
    this execution lost its claim (the row is left alone). The error and traceback are
    shown to the job's owner, so server paths in them become names (hide_server_paths);
    the worker's log keeps them whole."""
    if isinstance(exc, JobCancelled):
        return JobStatus.CANCELLED, None, "cancelled by request", None
    if isinstance(exc, LeaseLost):
        log.warning("job %s: this execution lost its claim; leaving the row alone", job_id)
        return None, None, None, None
    error = f"{type(exc).__name__}: {exc}"
    log.error("job %s failed: %s", job_id, error)
    roots = server_roots(settings)
    tb = "".join(traceback.format_exception(exc))
    return JobStatus.FAILED, None, hide_server_paths(error, roots), hide_server_paths(tb, roots)


def with_notes(result: dict, ctx: JobContext) -> dict:
    """A runner's result with what its context noted on the way (worker/context.py)."""
    if ctx.warnings:
        result["warnings"] = [*result.get("warnings", []), *ctx.warnings]
    return {**ctx.notes, **result}


class Heartbeat:
    """Renews the running job's lease every `heartbeat_s` from a thread, so a worker
    that dies stops renewing and its job can be claimed again once the lease expires.
    A failed renewal (another attempt owns the job) sets `lost`; the runner sees it
    at its next step boundary."""

    def __init__(self, sessions, job_id: str, token: int, settings: Settings, lost: threading.Event):
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sessions, job_id, token, settings, lost), name=f"heartbeat-{job_id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, sessions, job_id: str, token: int, settings: Settings, lost: threading.Event) -> None:
        while not self._stop.wait(settings.heartbeat_s):
            try:
                # A connection cut under the renewal is replaced at once, not a beat later:
                # a lease of a few beats must not run out over one dropped connection.
                if not with_reconnect(sessions, lambda session: jobs.renew_lease(session, job_id, token,
                                                                                 settings.lease_s), log):
                    lost.set()
                    return
            except Exception:  # the database is away: try again next beat, the lease has slack
                log.exception("job %s: lease renewal failed", job_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Executor:
    def __init__(self, settings: Settings, app: Celery):
        self.settings = settings
        self.app = app
        # Set from the worker's SIGTERM handler; the running job sees it at its next step.
        self.stopping = threading.Event()
        engine = make_engine(settings.database_url)
        check_migrated(engine)
        engine.dispose()  # no pooled connection may cross a fork into pool children
        self.sessions = make_sessionmaker(engine)
        self.storage = make_storage(settings)
        self.pipelines = PipelineCache(settings.model_cache_size)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)

    def perform(self, job_id: str, worker: str) -> str:
        worker_id = f"{worker}:{os.getpid()}"
        if self.stopping.is_set():
            # A message fetched during shutdown goes back to the broker unclaimed.
            raise Reject("worker shutting down", requeue=True)
        with self.sessions() as session:
            token = jobs.claim(session, job_id, worker_id, self.settings.lease_s, self.settings.max_attempts)
            if token is None:
                log.info("job %s not claimable (duplicate delivery, cancelled or unknown); dropping", job_id)
                return "skipped"
            job = session.get(Job, job_id)
            kind, params = job.kind, job.params
        log.info("job %s (%s) claimed by %s, attempt %d", job_id, kind, worker_id, token)
        if self.settings.failpoints:  # tests: e.g. "job.claimed=kill", a worker that dies on every job
            failpoints.hit(failpoints.parse(self.settings.failpoints), "job.claimed", token, log)

        if self.settings.coalesce:
            batch = self._batch(job_id, token, kind, params, worker_id)
            if batch:
                return self._perform_batch(batch)

        ctx = JobContext(self.settings, self.sessions, self.storage, job_id, token, log, self.stopping, self.pipelines)
        heartbeat = Heartbeat(self.sessions, job_id, token, self.settings, ctx.lease_lost)
        status, result, error, tb = JobStatus.SUCCEEDED, None, None, None
        try:
            spec = validate_params(kind, params)
            result = with_notes(RUNNERS[kind](spec, ctx) or {}, ctx)
        except WorkerShuttingDown:
            return self._requeue(job_id, token)
        except Exception as exc:  # recorded on the job, never swallowed
            status, result, error, tb = failure(job_id, exc, self.settings)
        finally:
            heartbeat.stop()
            ctx.close()
        return self._record(job_id, token, status, result, error, tb)

    def _batch(self, job_id: str, token: int, kind: str, params: dict, worker_id: str) -> list:
        """The leader (first, with its spec) and the queued jobs claimed to share its
        batch; [] when it runs alone (no batch key, no partner, or params that do not
        validate: the plain path fails the job with the message)."""
        try:
            spec = validate_params(kind, params)
        except Exception:
            return []
        leader = coalesce.Member(job_id, token, kind, spec)
        partners = coalesce.gather(self.sessions, self.settings, leader, worker_id)
        return [leader] + partners if partners else []

    def _perform_batch(self, members: list[coalesce.Member]) -> str:
        """Several claimed jobs as one denoising batch (worker/coalesce.py). Each job
        has its own context and heartbeat, and its own outcome: a failure in one job's
        plan or outputs, its cancel or its lost lease takes only that job out of the
        batch. SIGTERM re-queues every job of the batch that has no outcome yet."""
        ctxs = [JobContext(self.settings, self.sessions, self.storage, m.job_id, m.token, log, self.stopping,
                           self.pipelines) for m in members]
        heartbeats = [Heartbeat(self.sessions, m.job_id, m.token, self.settings, ctx.lease_lost)
                      for m, ctx in zip(members, ctxs)]
        outcomes: dict[int, tuple] = {}

        def fail(k: int, exc: Exception) -> None:
            outcomes[k] = failure(members[k].job_id, exc, self.settings)

        ids = [m.job_id for m in members]
        rows = sum(coalesce.batch_rows(m.kind, m.spec) for m in members)
        log.info("jobs %s coalesced into one batch", ", ".join(ids))
        stopped = False
        try:
            loaded: dict = {}  # ddpm.sample: the shared model, loaded once
            plans, planned = [], []
            for k, (member, ctx) in enumerate(zip(members, ctxs)):
                try:
                    plans.append(coalesce.plan(member, ctx, loaded))
                    planned.append(k)
                except WorkerShuttingDown:
                    raise
                except Exception as exc:
                    fail(k, exc)
            images = coalesce.render(members[0].kind, plans, ctxs[0].device,
                                     lambda i, exc: fail(planned[i], exc)) if plans else {}
            for i, k in enumerate(planned):
                if i not in images:
                    continue
                try:
                    result = with_notes(plans[i].finish(images[i]) or {}, ctxs[k])
                except WorkerShuttingDown:
                    raise
                except Exception as exc:
                    fail(k, exc)
                    continue
                result["batched_with"] = [other for other in ids if other != ids[k]]
                result["batch_rows"] = rows
                outcomes[k] = (JobStatus.SUCCEEDED, result, None, None)
        except WorkerShuttingDown:
            stopped = True
        except Exception as exc:  # the batch itself broke (say, out of memory): every job left fails with it
            for k in range(len(members)):
                if k not in outcomes:
                    fail(k, exc)
        finally:
            for heartbeat, ctx in zip(heartbeats, ctxs):
                heartbeat.stop()
                ctx.close()
        done = [self._record(m.job_id, m.token, *outcomes[k]) if k in outcomes
                else self._requeue(m.job_id, m.token) if stopped else "lease-lost"
                for k, m in enumerate(members)]
        return done[0]

    def _record(self, job_id: str, token: int, status: JobStatus | None, result, error, tb) -> str:
        """Write a job's outcome, conditional on its claim's token (None: the lease was lost)."""
        if status is None:
            return "lease-lost"
        if not with_reconnect(self.sessions, lambda session: jobs.finish(session, job_id, token, status, result=result,
                                                                          error=error, traceback=tb), log):
            log.warning("job %s: outcome %s not recorded, the claim is stale", job_id, status.value)
            return "lease-lost"
        log.info("job %s %s", job_id, status.value)
        return status.value

    def _requeue(self, job_id: str, token: int) -> str:
        """The worker is stopping: give the job back to the queue for another worker."""
        with self.sessions() as session:
            if not jobs.release(session, job_id, token, "re-queued: its worker shut down"):
                return "lease-lost"
            job = session.get(Job, job_id)
        jobs.publish(self.sessions, self.app, job)
        log.warning("job %s re-queued: worker shutting down", job_id)
        return "requeued"
