"""The `diffqueue` command.

Service commands (`up`, `web`, `worker`, `beat`, `db upgrade`) start processes by
module name, so this module never imports `web` or `worker`. `user` and `token` work
on the database directly. Client commands
(`submit`, `upload`, `status`, `wait`, `download`, `schedule ...`) talk to the JSON
API over HTTP.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NoReturn
from urllib.parse import urljoin

from shared.config import MAKE_SECRET_KEY, PREFIX, ConfigError, Settings, secret_key_problem
from shared.db import check_migrated, make_engine, upgrade
from shared.errors import DatabaseNotMigrated

SHUTDOWN_GRACE_S = 20
RETRY_PAUSE_S = 1.0  # before a client command sends its request again
FINISHED = {"succeeded", "failed", "cancelled"}


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"diffqueue: {message}", file=sys.stderr)
    sys.exit(code)


def require_migrated(settings: Settings) -> None:
    """Refuse to start on unusable settings or a database behind the code."""
    try:
        settings.check()
    except ConfigError as exc:
        fail(f"refusing to start: {exc}", 2)
    engine = make_engine(settings.database_url)
    try:
        check_migrated(engine)
    except DatabaseNotMigrated as exc:
        fail(f"refusing to start: {exc}", 2)
    finally:
        engine.dispose()


# ----------------------------------------------------------------- services
def cmd_db_upgrade(args, settings: Settings) -> None:
    upgrade(settings.database_url)
    print(f"database at head: {make_engine(settings.database_url).url.render_as_string(hide_password=True)}")


def web_command(host: str, port: int, workers: int, threads: int = 4) -> list[str]:
    """gunicorn with gthread's threads behind a loop that reads each request whole first
    (web/server.py: a slow client holds no thread). Forwarding headers are trusted in
    one place, the app's ProxyFix (DIFFQUEUE_PROXY_HOPS): gunicorn would take
    X-Forwarded-Proto from any loopback peer unless told to trust no address."""
    return [sys.executable, "-m", "gunicorn", "--bind", f"{host}:{port}", "--workers", str(workers),
            "--threads", str(threads), "--worker-class", "web.server.BufferedThreadWorker",
            "--forwarded-allow-ips", "", "--timeout", "120", "--access-logfile", "-", "web.wsgi:app"]


# Bind addresses meaning every interface: none of their URLs is the one users reach.
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def with_public_url(env: dict[str, str], host: str, port: int) -> dict[str, str]:
    """The web's environment: DIFFQUEUE_PUBLIC_URL is the address it serves on unless `env`
    names one, so that the API's URLs are absolute and work (`diffqueue up`, `diffqueue
    web`). On a wildcard host no one address is right: the URLs stay paths."""
    if env.get(PREFIX + "PUBLIC_URL") or host in WILDCARD_HOSTS:
        return env
    netloc = f"[{host}]" if ":" in host else host
    return {**env, PREFIX + "PUBLIC_URL": f"http://{netloc}:{port}"}


def worker_command(queues: str, concurrency: int, loglevel: str) -> list[str]:
    return [sys.executable, "-m", "worker", "--queues", queues, "--concurrency", str(concurrency),
            "--loglevel", loglevel]


def beat_command(loglevel: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", "beat", "--loglevel", loglevel]


def cmd_beat(args, settings: Settings) -> None:
    from shared.beat import run_beat

    # Beat signs webhooks: with no DIFFQUEUE_WEBHOOK_SECRET, with a key derived from the
    # secret key, which must then be a real one (and the same on every restart).
    problem = None if settings.webhook_secret else secret_key_problem(settings.secret_key)
    if problem is not None:
        fail(f"refusing to start: DIFFQUEUE_SECRET_KEY {problem}, and DIFFQUEUE_WEBHOOK_SECRET is not set: webhooks "
             f"would be signed with a key anyone can guess. Set one of them (make one with  {MAKE_SECRET_KEY} )", 2)
    require_migrated(settings)
    run_beat(settings, args.loglevel)


def require_secret_key(settings: Settings) -> None:
    """Refuse to start the web with auth on and no real DIFFQUEUE_SECRET_KEY (before
    gunicorn, whose every worker would refuse it, so the message is said once)."""
    try:
        settings.check_secret_key()
    except ConfigError as exc:
        fail(f"refusing to start: {exc}", 2)


def cmd_web(args, settings: Settings) -> None:
    require_secret_key(settings)
    require_migrated(settings)
    cmd = web_command(args.host, args.port, args.workers, args.threads)
    os.execve(cmd[0], cmd, with_public_url(dict(os.environ), args.host, args.port))


def cmd_worker(args, settings: Settings) -> None:
    require_migrated(settings)
    cmd = worker_command(args.queues, args.concurrency, args.loglevel)
    os.execv(cmd[0], cmd)


def cmd_up(args, _settings: Settings) -> None:
    """The embedded default: SQLite DB and broker, artifacts in the data dir, web,
    worker and beat as child processes of this one. The data dir supplies defaults; a
    DIFFQUEUE_* variable set in the environment wins over them (DIFFQUEUE_MODELS_DIR, a
    Postgres DIFFQUEUE_DATABASE_URL, ...), as everywhere else."""
    data_dir = Path(args.data_dir).resolve()
    settings = Settings.from_env({**os.environ, PREFIX + "DATA_DIR": str(data_dir)})
    try:
        settings.check()
    except ConfigError as exc:
        fail(f"refusing to start: {exc}", 2)
    upgrade(settings.database_url)
    env = {**os.environ, **settings.as_env()}  # one secret key for all three, made once here
    url = f"http://{args.host}:{args.port}"
    # Each child in a session of its own: a terminal's Ctrl-C reaches them only through this
    # process's SIGTERM, once each. A gthread web worker hit by both (the group's SIGINT,
    # then its master's signal) can deadlock in its quit handler and outlive everything.
    procs = [
        subprocess.Popen(worker_command("gpu,cpu", 1, args.loglevel), env=env, start_new_session=True),
        subprocess.Popen(beat_command(args.loglevel), env=env, start_new_session=True),
        subprocess.Popen(web_command(args.host, args.port, 1), env=with_public_url(env, args.host, args.port),
                         start_new_session=True),
    ]

    def stop(*_):
        raise KeyboardInterrupt

    # Both explicitly: a process started with SIGINT ignored (a shell's background job, a
    # script) would otherwise never turn Ctrl-C into KeyboardInterrupt.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if wait_healthy(url, procs):
            print(f"diffqueue is up: {url}  (data in {data_dir}; models in {settings.models_dir}; Ctrl-C stops)",
                  flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = [p for p in procs if p.poll() is not None]
        print(f"diffqueue: a service exited (code {failed[0].returncode}); stopping", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("diffqueue: stopping", flush=True)
        code = 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        _stop_all(procs)
    sys.exit(code)


def wait_healthy(url: str, procs, timeout_s: float = 120) -> bool:
    """Poll `url`/healthz until it answers 200 (True), a process in `procs` exits or
    `timeout_s` passes (False). `diffqueue up`, the tests and the benches wait with it."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            if requests.get(url + "/healthz", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False


def _stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cmd_alive(args, _settings: Settings) -> None:
    """A container healthcheck: exit 0 if FILE was touched in the last --max-age-s seconds."""
    from shared import liveness

    age = liveness.age_s(Path(args.file))
    if age is None:
        fail(f"{args.file} does not exist: the process has not started (or DIFFQUEUE_LIVENESS_FILE differs)")
    if age > args.max_age_s:
        fail(f"{args.file} was last touched {age:.0f} s ago, more than {args.max_age_s:g} s: the process is stuck or gone")
    print(f"alive: touched {age:.0f} s ago")


# ------------------------------------------------------------------ users and tokens
# These work on the database directly (like `db upgrade`): run them where the service's
# DIFFQUEUE_DATABASE_URL is set, e.g. `docker compose exec web diffqueue token create ...`.
def _read_password(args) -> str:
    import getpass

    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        fail("the passwords differ")
    return first


def _user_session(settings: Settings):
    from shared.db import make_sessionmaker, session_scope

    require_migrated(settings)
    return session_scope(make_sessionmaker(make_engine(settings.database_url)))


def _checked(fn, *a, **kw):
    """Run an auth function; its SpecError/AuthError becomes a one-line failure."""
    from shared.errors import AuthError, SpecError

    try:
        return fn(*a, **kw)
    except (SpecError, AuthError) as exc:
        fail(str(exc))


def cmd_user_add(args, settings: Settings) -> None:
    from shared import auth

    password = _read_password(args) if args.password or args.password_stdin else None
    with _user_session(settings) as session:
        user = _checked(auth.create_user, session, args.name, admin=args.admin, password=password)
        print(f"user {user.name}{' (admin)' if user.is_admin else ''} created")


def cmd_user_passwd(args, settings: Settings) -> None:
    from shared import auth

    with _user_session(settings) as session:
        user = auth.get_user(session, args.name) or fail(f"no user {args.name!r}")
        _checked(auth.set_password, user, _read_password(args))
        print(f"password set for {user.name}; their web sessions are signed out")


def cmd_user_list(args, settings: Settings) -> None:
    from sqlalchemy import select

    from shared.models import User

    with _user_session(settings) as session:
        for user in session.scalars(select(User).order_by(User.name)):
            print(f"{user.name:24} {'admin' if user.is_admin else 'user':6} "
                  f"{'password' if user.password_hash else 'tokens only'}")


def cmd_token_create(args, settings: Settings) -> None:
    from shared import auth

    with _user_session(settings) as session:
        user = auth.get_user(session, args.user)
        if user is None:
            user = _checked(auth.create_user, session, args.user, admin=args.admin)
            print(f"user {user.name}{' (admin)' if user.is_admin else ''} created", file=sys.stderr)
        row, secret = auth.create_token(session, user, args.name)
    print(f"token {row.prefix}… for {args.user}: shown once, store it now (send it as 'Authorization: Bearer …' "
          "or set DIFFQUEUE_TOKEN)", file=sys.stderr)
    print(secret)


def cmd_token_list(args, settings: Settings) -> None:
    from shared import auth

    with _user_session(settings) as session:
        user = (auth.get_user(session, args.user) or fail(f"no user {args.user!r}")) if args.user else None
        for row in auth.list_tokens(session, user):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "live"
            used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
            print(f"{row.id}  {row.prefix}…  {row.user.name:16} {state:18} last used {used:16} {row.name}")


def cmd_token_revoke(args, settings: Settings) -> None:
    from shared import auth

    with _user_session(settings) as session:
        row = _checked(auth.revoke_token, session, args.token)
        print(f"token {row.prefix}… of {row.user.name} revoked")


# ------------------------------------------------------------------ clients
def _api(settings: Settings, args) -> str:
    return (args.url or settings.api_url).rstrip("/") + "/api/v1"


def _request(args, method: str, url: str, timeout: float = 30, retry_once: bool = False, **kw):
    """An API call, signed with `args.token` if there is one; exits with the API's error.
    `retry_once`: send it again once after a network error (safe for a submit, which
    carries an Idempotency-Key: the server answers with the job the first one made)."""
    import requests

    headers = {**({"Authorization": f"Bearer {args.token}"} if args.token else {}), **kw.pop("headers", {})}
    for attempt in range(2 if retry_once else 1):
        try:
            resp = requests.request(method, url, timeout=timeout, headers=headers, **kw)
            break
        except requests.RequestException as exc:
            if attempt or not retry_once:
                fail(f"cannot reach {url}: {exc}")
            print(f"diffqueue: {url}: {type(exc).__name__}; sending it again", file=sys.stderr)
            time.sleep(RETRY_PAUSE_S)
    if resp.status_code >= 400:
        try:
            body = resp.json()
            detail = body.get("message", resp.text)
            if body.get("fields"):
                detail += "\n" + "\n".join(f"  {k}: {v}" for k, v in body["fields"].items())
        except ValueError:
            detail = resp.text
        fail(f"HTTP {resp.status_code}: {detail}")
    return resp


def parse_param(item: str) -> tuple[str, object]:
    if "=" not in item:
        fail(f"--param expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def cmd_submit(args, settings: Settings) -> None:
    params = json.loads(Path(args.json).read_text()) if args.json else {}
    params.update(dict(parse_param(p) for p in args.param or []))
    body = {"kind": args.kind, "params": params, "priority": args.priority}
    job = _request(args, "POST", _api(settings, args) + "/jobs", json=body, retry_once=True,
                   headers={"Idempotency-Key": str(uuid.uuid4())}).json()
    print(job["id"])


class MultipartFile:
    """A multipart/form-data body holding one file, read in chunks: requests streams
    it with a Content-Length (from `len`) instead of building the body in memory."""

    def __init__(self, field: str, path: Path):
        self.boundary = secrets.token_hex(16)
        filename = path.name.translate({ord(c): "_" for c in '"\r\n\\'})
        head = (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.len = len(head) + path.stat().st_size + len(tail)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.parts = [io.BytesIO(head), open(path, "rb"), io.BytesIO(tail)]

    def read(self, size: int = -1) -> bytes:
        out = b""
        while self.parts and (size < 0 or len(out) < size):
            chunk = self.parts[0].read(-1 if size < 0 else size - len(out))
            if not chunk:
                self.parts.pop(0).close()
            out += chunk
        return out

    def __iter__(self):
        return iter(lambda: self.read(1024 * 1024), b"")

    def __enter__(self) -> "MultipartFile":
        return self

    def __exit__(self, *exc) -> None:
        for part in self.parts:
            part.close()


def cmd_upload(args, settings: Settings) -> None:
    path = Path(args.file)
    if not path.is_file():
        fail(f"{path}: no such file")
    with MultipartFile("file", path) as body:
        # The server checks every image header of a dataset before it answers: allow minutes.
        upload = _request(args, "POST", _api(settings, args) + "/uploads", timeout=600, data=body,
                          headers={"Content-Type": body.content_type}).json()
    kind, meta = upload["kind"], upload["meta"]
    if kind == "dataset":
        detail = f"{meta['num_images']} images, " + (f"{len(meta['classes'])} classes" if meta["classes"] else "unlabelled")
    elif kind == "image":
        detail = f"{meta['width']}x{meta['height']} {meta['mode']}"
    else:
        detail = f"{meta['num_prompts']} prompts"
    print(f"{kind} {upload['filename']}: {detail}", file=sys.stderr)
    print(upload["ref"])


def cmd_status(args, settings: Settings) -> None:
    print(json.dumps(_request(args, "GET", f"{_api(settings, args)}/jobs/{args.id}").json(), indent=2))


def cmd_pin(pinned: bool):
    def run(args, settings: Settings) -> None:
        job = _request(args, "POST", f"{_api(settings, args)}/jobs/{args.id}/{'pin' if pinned else 'unpin'}").json()
        expiry = f": retention deletes it after {job['expires_at']}" if job["expires_at"] else ""
        print(f"job {job['id']} pinned: retention keeps it" if job["pinned"] else f"job {job['id']} unpinned{expiry}")
    return run


def cmd_wait(args, settings: Settings) -> None:
    from tqdm import tqdm

    url = f"{_api(settings, args)}/jobs/{args.id}"
    deadline = time.monotonic() + args.timeout if args.timeout else None
    with tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        while True:
            job = _request(args, "GET", url).json()
            p = job["progress"]
            if p["total"] and bar.total != p["total"]:
                bar.reset(total=p["total"])
            bar.n = p["step"] or 0
            bar.set_description(job["status"])
            bar.set_postfix_str(p["message"] or "", refresh=False)
            bar.refresh()
            if job["status"] in FINISHED:
                break
            if deadline and time.monotonic() > deadline:
                fail(f"timed out after {args.timeout} s; job {args.id} is {job['status']}", 3)
            time.sleep(args.interval)
    print(f"job {args.id} {job['status']}" + (f": {job['error']}" if job["error"] else ""))
    if job["status"] != "succeeded":
        sys.exit(1)


def cmd_download(args, settings: Settings) -> None:
    job = _request(args, "GET", f"{_api(settings, args)}/jobs/{args.id}").json()
    dest = Path(args.dir)
    for a in job["artifacts"]:
        if args.prefix and not a["name"].startswith(args.prefix):
            continue
        path = (dest / a["name"]).resolve()
        if dest.resolve() not in path.parents:
            fail(f"artifact name {a['name']!r} escapes {dest}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # A path when the service has no DIFFQUEUE_PUBLIC_URL: it is on the API's host.
        path.write_bytes(_request(args, "GET", urljoin(_api(settings, args), a["url"])).content)
        print(path)


# -------------------------------------------------------------------- schedules
def _print_schedules(rows: list[dict]) -> None:
    for s in rows:
        state = "enabled" if s["enabled"] else "paused"
        nxt = s["next_run_at"] or "-"
        print(f"{s['id']}  {state:8}  {s['cron']:<16} {s['timezone']:<16} next {nxt}  {s['kind']}  {s['name']}")


def cmd_schedule_add(args, settings: Settings) -> None:
    params = json.loads(Path(args.json).read_text()) if args.json else {}
    params.update(dict(parse_param(p) for p in args.param or []))
    body = {
        "name": args.name, "cron": args.cron, "timezone": args.timezone, "kind": args.kind, "params": params,
        "priority": args.priority, "enabled": not args.paused, "missed_runs": args.missed_runs,
        "max_concurrent": args.max_concurrent, "overlap": args.overlap,
    }
    schedule = _request(args, "POST", _api(settings, args) + "/schedules", json=body).json()
    print(f"next run {schedule['next_run_at'] or '- (paused)'}", file=sys.stderr)
    print(schedule["id"])


def cmd_schedule_list(args, settings: Settings) -> None:
    _print_schedules(_request(args, "GET", _api(settings, args) + "/schedules?limit=200").json()["schedules"])


def cmd_schedule_set_enabled(enabled: bool):
    def run(args, settings: Settings) -> None:
        s = _request(args, "PATCH", f"{_api(settings, args)}/schedules/{args.id}", json={"enabled": enabled}).json()
        _print_schedules([s])
    return run


def cmd_schedule_rm(args, settings: Settings) -> None:
    _request(args, "DELETE", f"{_api(settings, args)}/schedules/{args.id}")
    print(f"deleted {args.id}", file=sys.stderr)


def cmd_schedule_run_now(args, settings: Settings) -> None:
    print(_request(args, "POST", f"{_api(settings, args)}/schedules/{args.id}/run-now").json()["id"])


# -------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffqueue", description="Job queue for diffusion training and sampling.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="embedded service: SQLite, SQLite broker, local storage; web + worker + beat")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=os.environ.get("DIFFQUEUE_DATA_DIR", "diffqueue-data"))
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("web", help="the web app and API under gunicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    p.add_argument("--threads", type=int, default=4, help="threads per worker process")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("worker", help="a Celery worker that runs jobs")
    p.add_argument("--queues", default="gpu,cpu", help="comma-separated queues (gpu, cpu)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="Celery beat: enqueue scheduled jobs as they fall due")
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("alive", help="healthcheck: exit 0 if a worker's or beat's liveness file is fresh")
    p.add_argument("file", help="its DIFFQUEUE_LIVENESS_FILE")
    p.add_argument("--max-age-s", type=float, default=90.0)
    p.set_defaults(func=cmd_alive)

    p = sub.add_parser("db", help="database commands")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="migrate the database to the latest revision").set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("user", help="users who sign in to the web pages (auth on)")
    usub = p.add_subparsers(dest="user_command", required=True)
    p = usub.add_parser("add", help="add a user")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="sees and manages every user's jobs")
    p.add_argument("--password", action="store_true", help="prompt for a web sign-in password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_user_add)
    p = usub.add_parser("passwd", help="set a user's web sign-in password (prompted, or a line on stdin)")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_user_passwd, password=True)
    usub.add_parser("list", help="list users").set_defaults(func=cmd_user_list)

    p = sub.add_parser("token", help="API tokens: create (shown once), list, revoke")
    tsub = p.add_subparsers(dest="token_command", required=True)
    p = tsub.add_parser("create", help="create a token for a user (added if new) and print it once")
    p.add_argument("--user", required=True)
    p.add_argument("--name", default="", help="a label, e.g. the machine it is for")
    p.add_argument("--admin", action="store_true", help="make a new user an admin")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("list", help="list tokens (their first characters, never the secret)")
    p.add_argument("--user")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", help="revoke a token by its id or its first characters")
    p.add_argument("token")
    p.set_defaults(func=cmd_token_revoke)

    def add_client(parsers, name: str, help: str, func):
        p = parsers.add_parser(name, help=help)
        p.add_argument("--url", help="API base URL (default: DIFFQUEUE_URL or http://127.0.0.1:8000)")
        p.add_argument("--token", help="API token, when the service has auth on (default: DIFFQUEUE_TOKEN)")
        p.set_defaults(func=func)
        return p

    def client(name: str, help: str, func):
        return add_client(sub, name, help, func)

    p = client("submit", "submit a job and print its id", cmd_submit)
    p.add_argument("kind")
    p.add_argument("--param", "-p", action="append", metavar="KEY=VALUE", help="a param; VALUE is JSON or a string")
    p.add_argument("--json", metavar="FILE", help="params from a JSON file (--param entries override)")
    p.add_argument("--priority", type=int, default=0)

    p = client("upload", "upload a dataset zip, an image or a prompts file and print its upload:<id> ref", cmd_upload)
    p.add_argument("file")

    client("status", "print a job as JSON", cmd_status).add_argument("id")
    client("pin", "pin a job: retention never deletes it", cmd_pin(True)).add_argument("id")
    client("unpin", "unpin a job: retention deletes it DIFFQUEUE_RETENTION_DAYS after it finished",
           cmd_pin(False)).add_argument("id")

    p = client("wait", "show a progress bar until the job finishes; non-zero exit unless it succeeded", cmd_wait)
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=0, help="seconds (0: no limit)")

    p = client("download", "download a job's artifacts into DIR", cmd_download)
    p.add_argument("id")
    p.add_argument("dir")
    p.add_argument("--prefix", default="", help="only artifacts whose name starts with this, e.g. model/")

    p = sub.add_parser("schedule", help="recurring jobs: add, list, pause, resume, rm, run-now")
    ssub = p.add_subparsers(dest="schedule_command", required=True)

    def schedule_client(name: str, help: str, func):
        return add_client(ssub, name, help, func)

    p = schedule_client("add", "add a schedule and print its id", cmd_schedule_add)
    p.add_argument("kind")
    p.add_argument("--name", required=True)
    p.add_argument("--cron", required=True, help='5-field cron, e.g. "0 2 * * *" (02:00 every day)')
    p.add_argument("--timezone", "--tz", default="UTC", help="IANA timezone, e.g. Europe/Berlin (default UTC)")
    p.add_argument("--param", "-p", action="append", metavar="KEY=VALUE", help="a param; VALUE is JSON or a string")
    p.add_argument("--json", metavar="FILE", help="params from a JSON file (--param entries override)")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--missed-runs", choices=["skip", "catch_up_once"], default="skip",
                   help="after downtime: skip to the next occurrence, or run once for the missed window")
    p.add_argument("--max-concurrent", type=int, default=1, help="at most this many of its jobs queued or running")
    p.add_argument("--overlap", choices=["skip", "queue"], default="skip",
                   help="at max-concurrent: skip the occurrence, or hold it until a job finishes")
    p.add_argument("--paused", action="store_true", help="create it paused")
    schedule_client("list", "list schedules", cmd_schedule_list)
    schedule_client("pause", "pause a schedule", cmd_schedule_set_enabled(False)).add_argument("id")
    schedule_client("resume", "resume a schedule from its next occurrence", cmd_schedule_set_enabled(True)).add_argument("id")
    schedule_client("rm", "delete a schedule (its jobs stay)", cmd_schedule_rm).add_argument("id")
    schedule_client("run-now", "enqueue a schedule's job now and print its id", cmd_schedule_run_now).add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    if hasattr(args, "token") and not args.token:
        args.token = settings.api_token
    args.func(args, settings)


if __name__ == "__main__":
    main()
