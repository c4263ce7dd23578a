"""Celery tasks. They are thin: ids in, and the executor does the work."""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from shared import liveness
from shared.broker import RUN_JOB_TASK
from shared.config import Settings


def register_tasks(app: Celery, settings: Settings) -> None:
    from worker.executor import Executor

    executor = Executor(settings, app)

    @worker_ready.connect(weak=False)
    def _show_alive(**_):
        liveness.keep_touching(settings.liveness_file, settings.heartbeat_s)

    @worker_shutting_down.connect(weak=False)
    def _stop_running_job(**_):
        executor.stopping.set()

    @app.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self, job_id: str) -> str:
        return executor.perform(job_id, worker=self.request.hostname or "worker")
