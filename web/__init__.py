"""The Flask app: JSON API under /api/v1 and a small set of HTML pages.

It publishes jobs by task name through `shared.jobs` and never imports `worker`.
"""
from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app, g
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.broker import make_producer
from shared.config import Settings
from shared.db import check_migrated, make_engine, make_sessionmaker
from shared.storage import Storage, make_storage
from web.cache import WebCache

csrf = CSRFProtect()


@dataclass
class Services:
    settings: Settings
    sessions: sessionmaker[Session]  # transactions: every write but a one-statement one
    reads: sessionmaker[Session]  # autocommit: see `reads()`
    producer: Celery
    storage: Storage
    cache: WebCache  # users and jobs' JSON, kept between requests


def services() -> Services:
    return current_app.extensions["diffqueue"]


def reads() -> Session:
    """This request's read session, opened on first use and closed when the request ends.

    It runs in autocommit: no BEGIN and ROLLBACK round trips, and one pool checkout (one
    pre-ping) shared by the sign-in check and the view. So it is for reads, and for
    writes of one statement (a token's last use); a view that must write atomically
    opens its own transaction with `services().sessions()`.
    """
    if "_reads" not in g:
        g._reads = services().reads()
    return g._reads


def _close_reads(_exc: BaseException | None) -> None:
    session = g.pop("_reads", None)
    if session is not None:
        session.close()


def create_app(settings: Settings, check_schema: bool = True) -> Flask:
    """Build the app. Refuses (DatabaseNotMigrated) on a database that is not at head,
    and (ConfigError) auth off outside the embedded mode, or auth on without a real
    DIFFQUEUE_SECRET_KEY (gunicorn's workers each build one app: they must share it)."""
    settings.check()
    settings.check_secret_key()
    engine = make_engine(settings.database_url)
    if check_schema:
        check_migrated(engine)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        WTF_CSRF_ENABLED=settings.csrf_enabled,
        JSON_SORT_KEYS=False,
    )
    if settings.proxy_hops:
        # Behind that many proxies, the client's address, scheme and host are those they
        # forwarded: rate limits count per client, not per proxy, and request.is_secure
        # is the client's. With 0 these headers are whatever a client wrote: ignored.
        hops = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    app.extensions["diffqueue"] = Services(
        settings=settings,
        sessions=make_sessionmaker(engine),
        reads=make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT")),
        producer=make_producer(settings),
        storage=make_storage(settings),
        cache=WebCache(engine, settings.web_cache_s),
    )
    from web import api, auth, errors, limits, metrics, pages

    limits.init_app(app, settings)  # first: CSRF reads the form, within the limits
    csrf.init_app(app)

    # The JSON API is exempt from the form check: token calls carry no cookie, and a
    # cookie-signed API write is checked by `auth.load_user` instead.
    csrf.exempt(api.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    metrics.init_app(app)  # GET /metrics, behind auth.load_user like every page
    auth.init_app(app)
    errors.init_app(app)
    app.teardown_appcontext(_close_reads)
    return app
