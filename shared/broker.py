"""Celery configuration shared by the publisher (web) and the consumer (worker).

The web side publishes by task *name* through `make_producer`, so it never
imports `worker` or torch.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared.config import Settings

RUN_JOB_TASK = "diffqueue.run_job"
QUEUES = ("gpu", "cpu")
MAX_PRIORITY = 9


def celery_config(settings: Settings) -> dict:
    queues = sorted(set(QUEUES) | {settings.default_queue})
    transport_options: dict = {
        "priority_steps": list(range(MAX_PRIORITY + 1)),
        "queue_order_strategy": "priority",
        # An unacked message (its worker died) is delivered again after this long.
        "visibility_timeout": settings.visibility_timeout_s,
    }
    if settings.broker_url.startswith("sqla+"):
        transport_options = {}  # kombu passes these to create_engine for this transport
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options,
        "task_queues": [Queue(name) for name in queues],
        "task_default_queue": settings.default_queue,
        "task_ignore_result": True,
        # A job's message is acknowledged only once the job is recorded finished, so a
        # worker that dies mid-job leaves the message to be delivered again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_producer(settings: Settings) -> Celery:
    app = Celery("diffqueue-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
