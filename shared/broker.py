"""Celery configuration shared by the publisher (web) and the consumer (worker).

The web side publishes by task *name* through `make_producer`, so it never
imports `worker` or torch.

Priority: a job's priority is 0-9, higher first. The transports disagree on order:
kombu's Redis transport serves the lowest number first, and its SQLAlchemy transport
(the embedded SQLite broker) has no priorities at all. `broker_priority` maps the job's
priority onto the Redis order, and the embedded broker runs on `PrioritySQLiteTransport`,
kombu's SQLAlchemy transport serving the highest message priority first.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import func, text

from shared.config import Settings

RUN_JOB_TASK = "diffqueue.run_job"
QUEUES = ("gpu", "cpu")
MAX_PRIORITY = 9
SQLITE_BROKER = "sqla+sqlite:"
# The embedded broker's transport, registered under a name of its own (see celery_config).
PRIORITY_SQLITE = "diffqueue-sqlite"


def is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://"))


def broker_priority(priority: int, broker_url: str) -> int:
    """The message priority that makes `broker_url`'s transport serve a job of `priority`
    (0-9, higher first) in the service's order."""
    priority = max(0, min(MAX_PRIORITY, priority))
    return MAX_PRIORITY - priority if is_redis(broker_url) else priority


class PrioritySQLiteChannel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel, taking the queue's highest-priority visible message
    first (oldest first among equals) instead of the oldest: SQLite reads the priority
    out of the JSON payload, which kombu stores as text."""

    def _get(self, queue):
        obj = self._get_or_create(queue)
        self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))  # SQLite's writer lock, as kombu takes it
        message = self.message_cls
        priority = func.coalesce(func.json_extract(message.payload, "$.properties.priority"), 0)
        try:
            msg = (self.session.query(message)
                   .filter(message.queue_id == obj.id, message.visible.is_not(False))
                   .order_by(priority.desc(), message.sent_at, message.id)
                   .limit(1).first())
            if msg is None:
                raise kombu_sqla.Empty()
            msg.visible = False
            return kombu_sqla.loads(kombu_sqla.bytes_to_str(msg.payload))
        finally:
            self.session.commit()


class PrioritySQLiteTransport(kombu_sqla.Transport):
    Channel = PrioritySQLiteChannel


TRANSPORT_ALIASES[PRIORITY_SQLITE] = f"{__name__}:PrioritySQLiteTransport"


def transport_url(broker_url: str) -> str:
    """The URL kombu connects with: the embedded SQLite broker through its priority transport."""
    if broker_url.startswith(SQLITE_BROKER):
        return PRIORITY_SQLITE + broker_url.removeprefix("sqla")
    return broker_url


def celery_config(settings: Settings) -> dict:
    queues = sorted(set(QUEUES) | {settings.default_queue})
    transport_options: dict = {
        "priority_steps": list(range(MAX_PRIORITY + 1)),
        "queue_order_strategy": "priority",
        # An unacked message (its worker died) is delivered again after this long.
        "visibility_timeout": settings.visibility_timeout_s,
    }
    if not is_redis(settings.broker_url):
        transport_options = {}  # the SQLAlchemy transport passes these to create_engine
    return {
        "broker_url": transport_url(settings.broker_url),
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
        # Task events, so Flower and `celery events` see jobs sent, received, started
        # and finished (a solo worker busy with a job still answers no `inspect`).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def make_producer(settings: Settings) -> Celery:
    app = Celery("diffqueue-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
