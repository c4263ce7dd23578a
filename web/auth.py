"""Who is asking, and how often: API tokens and web sign-in, then the rate limits.

Every request but the public ones (health, sign-in, static files) needs a user when
auth is on: `Authorization: Bearer <token>` for scripts, a signed session cookie for
the pages (and for the pages' own calls to the API, which then need the CSRF header
on anything but a GET). With auth off (the embedded single-user mode) `g.user` is
None and every row is visible, as before.
"""
from __future__ import annotations

import hashlib
import re
import time
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Blueprint, Flask, current_app, g, redirect, render_template, request, session, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import BadRequest

from shared import auth
from shared.models import User
from web import csrf, reads, services
from web.errors import error_response

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = {"auth.login", "static", "pages.root_healthz", "api.healthz_v1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def current_user() -> User | None:
    """The signed-in user; None when auth is off (who then sees everything)."""
    return g.get("user")


def _rate_key() -> str:
    user = g.get("user")
    return f"user:{user.id}" if user is not None else f"addr:{get_remote_address()}"


def default_limit() -> str:
    """Every request's limit, read from the app's settings at each request: the limiter is
    one object for every app a process builds (the tests build many), and limits given
    in config would be those of the first."""
    return services().settings.rate_limit


# No X-RateLimit-* headers on every response: reading the window for them costs two
# Redis round trips a request, a quarter of a GET's time. A refusal still says when to
# come back (`_retry_after`).
limiter = Limiter(key_func=_rate_key, key_prefix="diffqueue", headers_enabled=False, default_limits=[default_limit])


def _retry_after(response):
    """A rate-limit refusal's Retry-After: seconds until its window resets (a quota refusal
    sets its own)."""
    if response.status_code != 429 or "Retry-After" in response.headers:
        return response
    limit = limiter.current_limit
    if limit is not None:
        try:
            seconds = limit.reset_at - time.time()
        except Exception:  # the limit store went away since it refused: a whole window
            seconds = limit.limit.get_expiry()
        response.headers["Retry-After"] = str(max(1, int(seconds)))
    return response


def submit_limit() -> str:
    return services().settings.rate_limit_submit


# Every path by which a user makes work (a job by the API or the form, run-now, retry, an
# upload) draws on one budget per user: DIFFQUEUE_RATE_LIMIT_SUBMIT. POST only, so a form
# page can be looked at freely.
submit_limited = limiter.shared_limit(submit_limit, scope="submit", methods=["POST"])


def login_limit() -> str:
    return services().settings.rate_limit_login


def _login_account_key() -> str:
    """The sign-in limit's second key: the account guessed at, whatever the address (many
    addresses could otherwise share out the guesses at one). In lower case, because names
    differing only in case are one guess to whoever picks them; hashed, because the posted
    name can be anything up to the body limit."""
    name = request.form.get("user", "").strip().lower()
    return "login-user:" + hashlib.sha256(name.encode()).hexdigest()[:32]


# Answered like the API (401, never a redirect to the sign-in page): scrapers follow no forms.
MACHINE_ENDPOINTS = {"metrics.metrics"}


def _unauthenticated(message: str):
    if request.path.startswith("/api/") or request.endpoint in MACHINE_ENDPOINTS:
        resp, status = error_response(401, "unauthorized", message)
        resp.headers["WWW-Authenticate"] = 'Bearer realm="diffqueue"'
        return resp, status
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def load_user():
    """Before every request: set g.user, or answer 401 / send to the sign-in page."""
    g.user = None
    svc = services()
    if not svc.settings.auth_enabled or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    header = request.headers.get("Authorization")
    db = reads()
    if header is not None:
        scheme, _, token = header.partition(" ")
        user = svc.cache.user_for_token(db, token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            return _unauthenticated("the bearer token is not valid (unknown, malformed or revoked)")
        g.user = user
        return None
    user = svc.cache.user_by_id(db, session["user_id"]) if "user_id" in session else None
    if user is None or not _session_is_current(user):
        session.clear()
        return _unauthenticated("sign in: send 'Authorization: Bearer <token>' (diffqueue token create --user NAME)")
    g.user = user
    # A cookie rides along on cross-site requests, so the API's writes need the CSRF
    # header when signed in by cookie (pages' forms are protected by CSRFProtect).
    if request.blueprint == "api" and request.method not in SAFE_METHODS and current_app.config["WTF_CSRF_ENABLED"]:
        csrf.protect()
    return None


def _session_is_current(user: User) -> bool:
    """A session cookie holds until its user signs out or changes password (either bumps
    `session_epoch`: every copy of the cookie ends too), and for session_lifetime_s after
    sign-in, however much it is used since. Compared with the user as kept by the cache
    (web/cache.py, dropped on any change to the user's row): no query of its own."""
    signed_in_at = session.get("signed_in_at")
    return (session.get("epoch") == user.session_epoch and isinstance(signed_in_at, (int, float))
            and time.time() - signed_in_at < services().settings.session_lifetime_s)


# Control characters (CR and LF among them) in a redirect target.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _next_target() -> str:
    """Where to go after signing in: `next` if it is a path on this site, else the index."""
    nxt = request.values.get("next", "")
    if CONTROL_CHARS.search(nxt):
        # Not a path anyone links to; werkzeug refuses it in a Location header (a 500).
        raise BadRequest("next: must be a path on this site, without control characters (CR, LF, tab)")
    target = urlsplit(nxt)
    # Browsers read '\\' as '/' and '///host' as '//host': both would leave the site.
    if target.scheme or target.netloc or not nxt.startswith("/") or nxt[1:2] in ("/", "\\"):
        return url_for("pages.index")
    return nxt


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(login_limit, methods=["POST"], key_func=get_remote_address)
@limiter.limit(login_limit, methods=["POST"], key_func=_login_account_key)
def login():
    nxt = _next_target()
    if not services().settings.auth_enabled:
        return redirect(nxt)
    if request.method == "GET":
        return render_template("login.html", next=nxt, error=None)
    with services().sessions() as db:
        user = auth.check_password(db, request.form.get("user", ""), request.form.get("password", ""))
    if user is None:
        return render_template("login.html", next=nxt, error="Wrong user name or password.",
                               name=request.form.get("user", "")), 401
    session.clear()  # a fresh session on sign-in: no fixation
    session["user_id"] = user.id
    session["epoch"] = user.session_epoch
    session["signed_in_at"] = int(time.time())
    session.permanent = True
    return redirect(nxt)


@bp.post("/logout")
def logout():
    user = current_user()
    if user is not None and session.get("user_id") == user.id:
        # Every session of the user ends, not only this browser's: a copy of the cookie
        # would otherwise still work (it is signed, and the server keeps nothing of it).
        # Signed in by a token only, there is no session to end.
        svc = services()
        with svc.sessions.begin() as db:
            auth.end_sessions(db, user.id)
        svc.cache.changed_users()
    session.clear()
    return redirect(url_for("auth.login"))


def init_app(app: Flask) -> None:
    settings = app.extensions["diffqueue"].settings
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        # The cookie's own expiry; `_session_is_current` holds the server to it as well.
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=settings.session_lifetime_s),
        RATELIMIT_STORAGE_URI=settings.ratelimit_storage_url,
        # If the limit store (Redis) is down, serve rather than fail every request.
        RATELIMIT_SWALLOW_ERRORS=True,
        RATELIMIT_HEADERS_ENABLED=False,
    )
    # Before the limiter's own hook, so its key is the user, not only the address.
    app.before_request(load_user)
    app.after_request(_retry_after)
    app.register_blueprint(bp)
    limiter.init_app(app)
    for endpoint in ("static", "pages.root_healthz", "api.healthz_v1"):
        view = app.view_functions.get(endpoint)
        if view is not None:
            limiter.exempt(view)

    @app.context_processor
    def user_in_templates():
        return {"current_user": current_user(), "auth_enabled": settings.auth_enabled}
