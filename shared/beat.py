"""`diffqueue beat`: Celery beat with a database-backed scheduler, in the manner of
django-celery-beat's DatabaseScheduler. Its one periodic entry runs in the beat
process every `beat_interval_s`: the schedules tick (`shared.schedules.tick`: due
schedules become job rows and `diffqueue.run_job` messages), then the reaper
(`shared.reaper.reap`: jobs of dead workers re-queued, lost messages re-published).

Running two beats by mistake is safe: the tick locks each due schedule (see
shared/schedules.py), so an occurrence is enqueued once.
"""
from __future__ import annotations

import logging

from celery import Celery, beat

from shared import reaper, schedules
from shared.broker import make_producer
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker

log = logging.getLogger(__name__)


class ScheduleTicker(beat.Scheduler):
    """Celery beat's scheduler, with the schedules table as its schedule."""

    def __init__(self, app: Celery, *args, **kwargs):
        self.settings: Settings = app.conf.diffqueue_settings
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))
        super().__init__(app, *args, **kwargs)
        self.max_interval = self.settings.beat_interval_s

    def setup_schedule(self) -> None:
        """No static entries: the tick reads the schedules table."""

    def tick(self, *args, **kwargs) -> float:
        """Enqueue what is due, then reap; return the seconds until the next tick.
        A failure (the database or broker away) is logged, and the next tick tries again."""
        try:
            for job in schedules.tick(self.sessions, self.app, self.settings):
                log.info("schedule %s: enqueued job %s for %s", job.schedule_id, job.id, job.scheduled_for.isoformat())
        except Exception:
            log.exception("schedules tick failed; trying again in %g s", self.settings.beat_interval_s)
        try:
            reaper.reap(self.sessions, self.app, self.settings)
        except Exception:
            log.exception("reaper failed; trying again in %g s", self.settings.beat_interval_s)
        return self.settings.beat_interval_s

    @property
    def info(self) -> str:
        return f"schedules table and reaper, ticking every {self.settings.beat_interval_s:g} s"


def run_beat(settings: Settings, loglevel: str = "info") -> None:
    """Run beat in this process until SIGTERM or Ctrl-C."""
    app = make_producer(settings)
    app.conf.diffqueue_settings = settings
    app.Beat(scheduler=ScheduleTicker, loglevel=loglevel, max_interval=settings.beat_interval_s,
             schedule=None).run()
