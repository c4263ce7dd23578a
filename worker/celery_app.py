"""`make_celery(settings)`: the worker's Celery app, its queues and its tasks."""
from __future__ import annotations

from celery import Celery

from shared.broker import celery_config
from shared.config import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("diffqueue")
    app.conf.update(celery_config(settings))
    from worker.tasks import register_tasks

    register_tasks(app, settings)
    return app
