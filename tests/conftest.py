"""Fixtures: settings, app and client, real services (PostgreSQL, Redis, an S3 server),
real web and worker processes, and tiny models.

Services: PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379 are expected to
be running; an S3 endpoint is started here (moto's server mode) on a free port. With
DIFFQUEUE_TEST_SERVICES=1 a missing service is an error, otherwise a skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from shared.cli import wait_healthy
from shared.config import Settings
from shared.db import upgrade

PG_ADMIN_DSN = os.environ.get("DIFFQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SERVICES_REQUIRED = os.environ.get("DIFFQUEUE_TEST_SERVICES") == "1"
S3_BUCKET = "diffqueue-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def service_unavailable(what: str, why: str):
    msg = f"{what} unavailable: {why}"
    if SERVICES_REQUIRED:
        pytest.fail(msg + " (DIFFQUEUE_TEST_SERVICES=1 makes this an error)")
    pytest.skip(msg + " (set DIFFQUEUE_TEST_SERVICES=1 to make this an error)")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): every test that
    starts real processes (e2e, browser) goes to one worker, one after another, so
    they never compete with each other for the 2 cores or share a broker queue; the
    in-process tests spread over both workers around them."""
    for item in items:
        if item.get_closest_marker("e2e") or item.path.parent.name == "browser":
            item.add_marker(pytest.mark.xdist_group("processes"))


def eventually(predicate, timeout_s: float = 5.0) -> bool:
    """Poll `predicate` until it is true (True) or `timeout_s` passes (False): for changes
    that reach a web process asynchronously, such as a PostgreSQL NOTIFY (milliseconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ settings
@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    """The embedded default in a temp dir, migrated, with no progress throttling."""
    settings = replace(Settings.embedded(tmp_path / "data"), progress_interval_s=0.0, cancel_check_interval_s=0.0,
                       csrf_enabled=False)
    upgrade(settings.database_url)
    return settings


@contextmanager
def fresh_pg_database(prefix: str):
    """Create an empty PostgreSQL database, yield its SQLAlchemy URL, drop it after."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except Exception as exc:
        service_unavailable("PostgreSQL at 127.0.0.1:5432", str(exc))
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_database() -> str:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with fresh_pg_database("diffqueue_test") as url:
        yield url


@pytest.fixture(scope="module")
def own_pg_url(request) -> str:
    """A migrated PostgreSQL database of the test module's own, so that counts in it are
    exact (the session's is shared by every test); dropped after the module."""
    with fresh_pg_database("diffqueue_" + request.module.__name__.rsplit(".", 1)[-1][:30]) as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def pg_url(pg_database) -> str:
    """The session's PostgreSQL database, migrated to head."""
    upgrade(pg_database)
    return pg_database


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database number of its own, flushed before use."""
    import redis

    # Databases 1-15, one per xdist worker within a run (offset by the run's id, so that
    # two runs at once are unlikely to meet), random without xdist.
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    offset = int(run, 16) if run else uuid.uuid4().int
    db = 1 + (offset + int(worker.removeprefix("gw"))) % 15
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        service_unavailable(f"Redis at {REDIS_HOST}:{REDIS_PORT}", str(exc))
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3-compatible HTTP server (moto's server mode) on a free loopback port."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        service_unavailable("moto server", str(exc))
    for key, value in AWS_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def prod_settings(tmp_path, pg_url, redis_url, s3_endpoint) -> Settings:
    """Postgres + Redis + S3, as in production."""
    return replace(
        Settings.embedded(tmp_path / "data"),
        database_url=pg_url,
        broker_url=redis_url,
        storage_url=f"s3://{S3_BUCKET}/run-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=s3_endpoint,
        progress_interval_s=0.0,
        cancel_check_interval_s=0.0,
        csrf_enabled=False,
        auth_enabled=True,  # auth off is refused outside SQLite
    )


@pytest.fixture
def app(sqlite_settings):
    from web import create_app

    return create_app(sqlite_settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def prod_client(prod_settings):
    """A test client of the app on Postgres + Redis + S3, signed in as an admin."""
    from web import create_app

    return signed_in(create_app(prod_settings).test_client(), prod_settings)


def api_token(settings: Settings, user: str = "admin", admin: bool = True) -> str:
    """A new API token for `user` (created if missing) in the settings' database."""
    from shared import auth
    from shared.db import make_engine, make_sessionmaker, session_scope

    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            owner = auth.get_user(session, user) or auth.create_user(session, user, admin=admin)
            return auth.create_token(session, owner)[1]
    finally:
        engine.dispose()


def signed_in(client, settings: Settings, user: str = "admin", admin: bool = True):
    """`client` sending a bearer token for `user` on every request."""
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_token(settings, user, admin)}"
    return client


# ------------------------------------------------------- real processes
class Services:
    """Real `diffqueue web` and `diffqueue worker` processes for one test."""

    def __init__(self, settings: Settings, logdir: Path):
        self.settings = settings
        self.logdir = logdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **AWS_ENV, **settings.as_env(), "DIFFQUEUE_TORCH_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        # With auth on, the tests call the API as an admin (the CLI reads DIFFQUEUE_TOKEN).
        self.headers: dict[str, str] = {}
        if settings.auth_enabled:
            upgrade(settings.database_url)
            token = api_token(settings)
            self.headers["Authorization"] = f"Bearer {token}"
            self.env["DIFFQUEUE_TOKEN"] = token

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_web(self):
        self.start("web", ["web", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"])
        if not wait_healthy(self.url, [self.procs["web"]], timeout_s=60):
            exited = self.procs["web"].poll() is not None
            raise RuntimeError(("web exited:\n" if exited else "web did not become healthy:\n") + self.log("web"))

    def start_worker(self, name: str = "worker"):
        return self.start(name, ["worker", "--queues", "gpu,cpu", "--loglevel", "info"])

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-8000:]

    def api(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, f"{self.url}/api/v1{path}", timeout=30,
                                headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def get(self, url: str) -> requests.Response:
        """GET an absolute URL (an artifact's), signed in."""
        return requests.get(url, headers=self.headers, timeout=30)

    def wait_for(self, job_id: str, predicate, timeout_s: float = 180, what: str = "condition") -> dict:
        def check():
            job = self.api("GET", f"/jobs/{job_id}").json()
            return job if predicate(job) else None

        return self.wait_until(f"{what} on job {job_id}", check, timeout_s)

    def wait_until(self, what: str, predicate, timeout_s: float = 120, check_alive: bool = True):
        """Poll `predicate` until it returns something truthy; fail with every log if it
        never does, or (with `check_alive`) as soon as a process has exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            for name, proc in self.procs.items():
                if check_alive and proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.log(name)}")
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in self.procs)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def wait_finished(self, job_id: str, timeout_s: float = 180) -> dict:
        return self.wait_for(job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout_s,
                             "a finished status")

    def stop(self, grace_s: float = 1.0):
        """Teardown: SIGTERM every process, then SIGKILL what is still there after
        `grace_s`. An idle Celery worker takes about 4 s to exit (interpreter teardown
        after torch), which adds up over the suite; the tests that check a graceful
        stop send their own signals and wait for it."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def start_services(tmp_path):
    started: list[Services] = []

    def start(settings: Settings) -> Services:
        svc = Services(settings, tmp_path)
        started.append(svc)
        svc.start_worker()  # first: its imports (torch) overlap the web's start-up
        svc.start_web()
        return svc

    yield start
    for svc in started:
        svc.stop()


# ------------------------------------------------------- in-process runs
class InlineRunner:
    """Run jobs in this process through the real Executor (claim, runner, outcome),
    with no broker: for tests of a runner's outputs. Calls return the finished Job
    with its artifacts loaded; `job.read(name)` gives an artifact's bytes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._executors: dict = {}  # one per settings: its pipeline cache stays warm, as in a worker

    def __call__(self, kind: str, params: dict, settings: Settings | None = None):
        from shared.db import session_scope
        from shared.models import Job
        from shared.specs import KINDS, validate_params

        spec = validate_params(kind, params)
        with session_scope(self._sessions(settings)) as session:
            job = Job(kind=kind, params=spec.model_dump(mode="json"), queue=KINDS[kind].queue)
            session.add(job)
        return self.again(job.id, settings)

    def again(self, job_id: str, settings: Settings | None = None):
        """Run an existing queued (or lease-expired) job: a retry or a redelivery."""
        from shared.models import Job
        from shared.storage import job_key, make_storage
        from worker.executor import Executor

        settings = settings or self.settings
        if settings not in self._executors:
            self._executors[settings] = Executor(settings, app=None)
        self._executors[settings].perform(job_id, "inline")
        with self._sessions(settings)() as session:
            job = session.get(Job, job_id)
            job.artifacts  # load before the session closes
            session.expunge(job)
        job.read = lambda name: make_storage(settings).get_bytes(job_key(job.id, name))
        return job

    def _sessions(self, settings: Settings | None):
        from shared.db import make_engine, make_sessionmaker

        return make_sessionmaker(make_engine((settings or self.settings).database_url))


@pytest.fixture
def run_inline(sqlite_settings) -> InlineRunner:
    return InlineRunner(sqlite_settings)


@pytest.fixture
def tiny_ddpm_dir(sqlite_settings):
    """A tiny random-weight DDPMPipeline (3 channels, 16 px) saved under MODELS_DIR
    as `tiny-ddpm`, loaded later through the real diffusers loading code."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    path = Path(sqlite_settings.models_dir) / "tiny-ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_template(tmp_path_factory) -> Path:
    """The tiny SD pipeline folder, built once per test session."""
    from bench.tiny_sd import build_sd_pipeline

    return build_sd_pipeline(tmp_path_factory.mktemp("tiny-sd-build") / "tiny-sd")


@pytest.fixture
def tiny_sd_dir(sqlite_settings, tiny_sd_template) -> Path:
    """A tiny random-weight StableDiffusionPipeline saved under MODELS_DIR as `tiny-sd`
    (a copy of the session's build: a test may change its own), loaded later through
    the real diffusers loading code. Use 32 px images: 16 px latents."""
    path = Path(sqlite_settings.models_dir) / "tiny-sd"
    shutil.copytree(tiny_sd_template, path)
    return path
