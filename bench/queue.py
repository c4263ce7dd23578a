"""The queue's own overhead on Redis + Postgres, with `noop` jobs and an idle worker.

Starts its own stack: a fresh PostgreSQL database (created with a unique name,
migrated, dropped at the end), a Redis database number of its own (flushed before
and after), `diffqueue web` under gunicorn and one `diffqueue worker` on the cpu
queue, with auth on and DIFFQUEUE_ENABLE_NOOP=1. Every request carries an admin
token, as a production client's does. The rate limits and the queued-jobs quota are
raised out of the way (the defaults would throttle a benchmark at 20 requests/s and
500 queued jobs); the limiter still counts every request in Redis, as deployed.

Measures:
1. submit -> running of `noop` jobs, one at a time (each waits for the last to
   finish, so the worker is idle when the job arrives): the rows' created_at ->
   started_at (server clocks: commit, publish, broker delivery, claim), and on the
   client POST sent -> started_at (adds HTTP, auth, validation); same machine, one clock.
2. submit throughput: jobs/s through POST /api/v1/jobs from several client threads
   (the worker runs the jobs meanwhile, as it would).
3. GET /api/v1/jobs/<id> throughput: keep-alive clients in two processes for a fixed
   time, `--get-repeats` times, the median run reported; req/s, p50/p99 latency, and
   the server's CPU per request (the client shares the same cores, which a 2-core
   machine makes visible: its CPU is reported too). `--only get` measures only this.
4. scaling: with the worker stopped, the queue filled to each size (rows added
   directly, as `add_job` makes them, to save time): submit latency p50, list-page
   latencies and pg_database_size at each size.

Prints a table against the targets and appends JSON lines to `--out`.

    .venv/bin/python bench/queue.py [--jobs 200] [--scaling 10,100,1000,10000] [--quick]
    .venv/bin/python bench/queue.py --only get [--web-workers 2 --web-threads 4]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder heads sys.path, and this file would shadow the
# standard library's `queue` (which concurrent.futures and multiprocessing import).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import resource
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from importlib import metadata

import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import select  # noqa: E402

from shared import auth, jobs  # noqa: E402
from shared.cli import wait_healthy  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import make_engine, make_sessionmaker, session_scope, upgrade  # noqa: E402
from shared.models import Job, User  # noqa: E402

PG_ADMIN_DSN = os.environ.get("DIFFQUEUE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
TARGET_SUBMIT_TO_RUNNING_P50_MS = 50.0
TARGET_GET_REQ_S = 1000.0
POLL_S = 0.005  # how often the bench looks at a job's row while it waits (the figures come from the row)
SCALING_SAMPLES = 20  # submits and list requests timed at each queue size
FILL_CHUNK = 500  # rows per transaction when filling the queue


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def machine_info() -> dict:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"cores": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch_version}


# ------------------------------------------------------------------ the stack
class Stack:
    """A fresh Postgres database, a Redis db of its own, gunicorn web and one worker."""

    def __init__(self, tmp: Path, redis_db: int, web_workers: int, web_threads: int = 4):
        self.tmp = tmp
        self.redis_db = redis_db
        self.web_workers = web_workers
        self.web_threads = web_threads
        self.db_name = f"diffqueue_bench_{uuid.uuid4().hex[:10]}"
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "Stack":
        self.admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
        self.admin.execute(f'CREATE DATABASE "{self.db_name}"')
        base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        self.database_url = f"{base}/{self.db_name}"
        upgrade(self.database_url)
        self.redis = redis.Redis(REDIS_HOST, REDIS_PORT, db=self.redis_db, socket_connect_timeout=3)
        self.redis.flushdb()
        self.settings = replace(
            Settings.embedded(self.tmp / "data"),
            database_url=self.database_url,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            # As deployed: the limits are counted in Redis, shared by the gunicorn processes.
            ratelimit_storage_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            auth_enabled=True,
            enable_noop=True,
            rate_limit="10000000/minute",
            rate_limit_submit="10000000/minute",
            max_queued_per_user=10_000_000,
        )
        self.engine = make_engine(self.database_url)
        self.sessions = make_sessionmaker(self.engine)
        with session_scope(self.sessions) as session:
            user = auth.create_user(session, "bench", admin=True)
            self.token = auth.create_token(session, user)[1]
            self.user_id = user.id
        self.env = {**os.environ, **self.settings.as_env(), "DIFFQUEUE_TORCH_THREADS": "1"}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {self.token}"}
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.engine.dispose()
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        self.admin.close()
        self.redis.flushdb()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_worker(self) -> None:
        self.start("worker", ["worker", "--queues", "cpu", "--loglevel", "warning"])
        # Ready once it has registered with the broker: a first noop job runs.
        job_id = self.api("POST", "/jobs", json={"kind": "noop", "params": {}}).json()["id"]
        self.wait_status(job_id, ("succeeded",), timeout_s=120)

    def start_web(self) -> None:
        self.start("web", ["web", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
                           str(self.web_workers), "--threads", str(self.web_threads)])
        if not wait_healthy(self.url, [self.procs["web"]], timeout_s=60):
            exited = self.procs["web"].poll() is not None
            raise RuntimeError(("web exited:\n" if exited else "web did not become healthy:\n") + self.log("web"))

    def stop(self, name: str, grace_s: float = 10.0) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def api(self, method: str, path: str, session=None, **kw) -> requests.Response:
        resp = (session or requests).request(method, f"{self.url}/api/v1{path}", headers=self.headers, timeout=60,
                                             **kw)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:500]}")
        return resp

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout_s: float = 60) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.sessions() as session:
                job = session.get(Job, job_id)
                if job.status in statuses:
                    session.expunge(job)
                    return job
            time.sleep(POLL_S)
        raise RuntimeError(f"job {job_id} not {statuses} after {timeout_s} s\n{self.log('worker')}")

    def wait_drained(self, timeout_s: float = 600) -> None:
        """Until the worker has run every queued job: the next measure finds it idle."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.sessions() as session:
                if session.scalar(select(Job.id).where(Job.status.in_(("queued", "running"))).limit(1)) is None:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"jobs still queued after {timeout_s} s\n{self.log('worker')}")

    def db_size_bytes(self) -> int:
        return self.admin.execute("SELECT pg_database_size(%s)", (self.db_name,)).fetchone()[0]

    def web_pids(self) -> list[int]:
        master = psutil.Process(self.procs["web"].pid)
        return [master.pid] + [p.pid for p in master.children(recursive=True)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


# ------------------------------------------------------------ 1. submit -> running
def submit_to_running(stack: Stack, n: int) -> dict:
    http_session = requests.Session()
    sent, returned, ids = [], [], []
    for _ in range(n):
        t0 = time.time()
        job_id = stack.api("POST", "/jobs", session=http_session, json={"kind": "noop", "params": {}}).json()["id"]
        returned.append(time.time())
        sent.append(t0)
        ids.append(job_id)
        stack.wait_status(job_id, ("succeeded", "failed"))
    with stack.sessions() as session:
        rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
    failed = [i for i in ids if rows[i].status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} noop jobs failed: {rows[failed[0]].error}")
    ms = lambda a, b: (b - a) * 1000  # noqa: E731
    server = [ms(rows[i].created_at.timestamp(), rows[i].started_at.timestamp()) for i in ids]
    client = [ms(t0, rows[i].started_at.timestamp()) for t0, i in zip(sent, ids)]
    after_return = [ms(t1, rows[i].started_at.timestamp()) for t1, i in zip(returned, ids)]
    post = [ms(t0, t1) for t0, t1 in zip(sent, returned)]
    run = [ms(rows[i].started_at.timestamp(), rows[i].finished_at.timestamp()) for i in ids]
    return {
        "jobs": n,
        "created_to_started_p50_ms": pct(server, 50), "created_to_started_p99_ms": pct(server, 99),
        "post_sent_to_started_p50_ms": pct(client, 50), "post_sent_to_started_p99_ms": pct(client, 99),
        # Negative where the worker claimed the job before the POST's answer reached the client.
        "post_returned_to_started_p50_ms": pct(after_return, 50),
        "post_latency_p50_ms": pct(post, 50), "post_latency_p99_ms": pct(post, 99),
        "started_to_finished_p50_ms": pct(run, 50),
    }


# ------------------------------------------------------------ 2. submit throughput
def submit_throughput(stack: Stack, n: int, threads: int) -> dict:
    local = threading.local()

    def submit(_):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        t0 = time.perf_counter()
        stack.api("POST", "/jobs", session=local.session, json={"kind": "noop", "params": {}})
        return time.perf_counter() - t0

    pids = stack.web_pids()
    cpu0, start = cpu_seconds(pids), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        latencies = list(pool.map(submit, range(n)))
    wall = time.perf_counter() - start
    web_cpu = cpu_seconds(pids) - cpu0
    return {"jobs": n, "threads": threads, "jobs_per_s": n / wall, "latency_p50_ms": pct(latencies, 50) * 1000,
            "latency_p99_ms": pct(latencies, 99) * 1000, "web_cpu_ms_per_submit": web_cpu / n * 1000}


# ------------------------------------------------------------ 3. GET throughput
def _get_client(port: int, path: str, headers: dict, threads: int, seconds: float, out) -> None:
    """One client process: `threads` keep-alive connections GETting `path` for `seconds`."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def loop():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        deadline = time.perf_counter() + seconds
        while (now := time.perf_counter()) < deadline:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - now)
            if resp.status != 200:
                errors[0] += 1
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put((latencies, errors[0]))


def one_finished_job(stack: Stack) -> str:
    job_id = stack.api("POST", "/jobs", json={"kind": "noop", "params": {}}).json()["id"]
    if stack.wait_status(job_id, ("succeeded", "failed")).status != "succeeded":
        raise RuntimeError(f"noop job {job_id} failed")
    return job_id


def get_throughput_median(stack: Stack, job_id: str, clients: int, seconds: float, repeats: int) -> dict:
    """The run with the median rate of `repeats` (a shared VM's runs vary by a fifth), with all rates."""
    runs = sorted((get_throughput(stack, job_id, clients, seconds) for _ in range(repeats)),
                  key=lambda r: r["req_per_s"])
    return {**runs[len(runs) // 2], "repeats": repeats, "all_req_per_s": [round(r["req_per_s"]) for r in runs]}


def get_throughput(stack: Stack, job_id: str, clients: int, seconds: float) -> dict:
    processes = 2 if clients >= 2 else 1
    out = multiprocessing.Queue()
    path = f"/api/v1/jobs/{job_id}"
    pids = stack.web_pids()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, start = cpu_seconds(pids), time.perf_counter()
    procs = [multiprocessing.Process(target=_get_client, args=(stack.port, path, stack.headers,
                                                               clients // processes + (i < clients % processes),
                                                               seconds, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    web_cpu = cpu_seconds(pids) - cpu0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    latencies = [x for lat, _ in results for x in lat]
    errors = sum(e for _, e in results)
    if errors:
        raise RuntimeError(f"{errors} GETs were not 200")
    n = len(latencies)
    return {"clients": clients, "seconds": round(wall, 2), "requests": n, "req_per_s": n / wall,
            "latency_p50_ms": pct(latencies, 50) * 1000, "latency_p99_ms": pct(latencies, 99) * 1000,
            "web_cpu_ms_per_request": web_cpu / n * 1000, "client_cpu_share": client_cpu / (wall * os.cpu_count())}


# ------------------------------------------------------------------ 4. scaling
def fill_queue(stack: Stack, size: int) -> int:
    """Queued rows up to `size`, made by `jobs.create` (through the door: validated, owned), never published."""
    with stack.sessions() as session:
        queued = len(session.scalars(select(Job.id).where(Job.status == "queued")).all())
    while queued < size:
        with session_scope(stack.sessions) as session:
            owner = session.get(User, stack.user_id)
            for _ in range(min(FILL_CHUNK, size - queued)):
                jobs.create(session, stack.settings, "noop", {}, owner=owner)
                queued += 1
    return queued


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def scaling(stack: Stack, sizes: list[int]) -> list[dict]:
    http_session = requests.Session()
    results = []
    for size in sizes:
        queued = fill_queue(stack, size)
        submit = timed(lambda: stack.api("POST", "/jobs", session=http_session,
                                         json={"kind": "noop", "params": {}}), SCALING_SAMPLES)
        listing = timed(lambda: stack.api("GET", "/jobs", session=http_session), SCALING_SAMPLES)
        queued_listing = timed(lambda: stack.api("GET", "/jobs?status=queued", session=http_session),
                               SCALING_SAMPLES)
        page = timed(lambda: http_session.get(stack.url + "/jobs", headers=stack.headers, timeout=60)
                     .raise_for_status(), SCALING_SAMPLES)
        results.append({"queued": queued, "submit_p50_ms": pct(submit, 50), "api_list_p50_ms": pct(listing, 50),
                        "api_list_queued_p50_ms": pct(queued_listing, 50), "jobs_page_p50_ms": pct(page, 50),
                        "db_size_mb": stack.db_size_bytes() / 2**20})
    return results


# ------------------------------------------------------------------ main
def get_rows(gets: dict) -> list[tuple[str, str, str, str]]:
    return [(f"GET /jobs/<id> ({gets['clients']} keep-alive clients; median of {gets['all_req_per_s']})",
             f"{gets['req_per_s']:.0f} req/s",
             f">= {TARGET_GET_REQ_S:g} req/s", "yes" if gets["req_per_s"] >= TARGET_GET_REQ_S else "NO"),
            ("  latency p50 / p99", f"{gets['latency_p50_ms']:.1f} / {gets['latency_p99_ms']:.1f} ms", "", ""),
            ("  web CPU per GET; client's share of all cores",
             f"{gets['web_cpu_ms_per_request']:.2f} ms; {gets['client_cpu_share']:.0%}", "", "")]


def append(out: Path, info: dict, measures: list[tuple[str, dict]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for name, values in measures:
            rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}
            f.write(json.dumps({"bench": "queue", "measure": name, **info, **rounded}) + "\n")
    print(f"appended to {out}")


def table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="noop jobs for submit -> running, one at a time")
    parser.add_argument("--throughput-jobs", type=int, default=400, help="jobs submitted for the throughput")
    parser.add_argument("--threads", type=int, default=4, help="client threads submitting")
    parser.add_argument("--get-clients", type=int, default=8, help="keep-alive GET clients")
    parser.add_argument("--get-seconds", type=float, default=10.0)
    parser.add_argument("--get-repeats", type=int, default=3, help="GET runs; the median is reported")
    parser.add_argument("--scaling", default="10,100,1000,10000", help="queue sizes, comma-separated")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--web-threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument("--redis-db", type=int, default=15, help="a Redis db number of its own; flushed")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", choices=["get"], help="only this measure (get: GET throughput on one job)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "queue.jsonl"))
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.throughput_jobs, args.get_seconds, args.scaling = 20, 40, 3.0, "10,100"
    sizes = [int(s) for s in args.scaling.split(",") if s.strip()]

    info = {**machine_info(), "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "web_workers": args.web_workers, "web_threads": args.web_threads, "quick": args.quick}
    print(f"queue overhead: {info['cores']} cores, {info['platform']}, python {info['python']}, torch {info['torch']}")
    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-queue-") as tmp, \
            Stack(Path(tmp), args.redis_db, args.web_workers, args.web_threads) as stack:
        stack.start_web()
        stack.start_worker()
        print(f"stack up: database {stack.db_name}, redis db {args.redis_db}, web {stack.url}")
        if args.only == "get":
            gets = get_throughput_median(stack, one_finished_job(stack), args.get_clients, args.get_seconds,
                                         args.get_repeats)
            print(table([("measure", "value", "target", "met"), *get_rows(gets)]))
            append(Path(args.out), info, [("get_job", gets)])
            return
        latency = submit_to_running(stack, args.jobs)
        throughput = submit_throughput(stack, args.throughput_jobs, args.threads)
        stack.wait_drained()
        finished = stack.api("GET", "/jobs?status=succeeded&limit=1").json()["jobs"][0]["id"]
        gets = get_throughput_median(stack, finished, args.get_clients, args.get_seconds, args.get_repeats)
        stack.stop("worker")
        grown = scaling(stack, sizes)

    ok = lambda good: "yes" if good else "NO"  # noqa: E731
    rows = [("measure", "value", "target", "met"),
            (f"submit->running p50 (created_at->started_at, {latency['jobs']} jobs)",
             f"{latency['created_to_started_p50_ms']:.1f} ms", f"<= {TARGET_SUBMIT_TO_RUNNING_P50_MS:g} ms",
             ok(latency["created_to_started_p50_ms"] <= TARGET_SUBMIT_TO_RUNNING_P50_MS)),
            ("submit->running p99 (created_at->started_at)", f"{latency['created_to_started_p99_ms']:.1f} ms", "", ""),
            ("POST sent->started_at p50 / p99 (client clock)",
             f"{latency['post_sent_to_started_p50_ms']:.1f} / {latency['post_sent_to_started_p99_ms']:.1f} ms",
             f"<= {TARGET_SUBMIT_TO_RUNNING_P50_MS:g} ms",
             ok(latency["post_sent_to_started_p50_ms"] <= TARGET_SUBMIT_TO_RUNNING_P50_MS)),
            ("POST returned->started_at p50", f"{latency['post_returned_to_started_p50_ms']:.1f} ms", "", ""),
            ("POST /jobs latency p50 / p99 (idle)",
             f"{latency['post_latency_p50_ms']:.1f} / {latency['post_latency_p99_ms']:.1f} ms", "", ""),
            ("noop started->finished p50", f"{latency['started_to_finished_p50_ms']:.1f} ms", "", ""),
            (f"submit throughput ({throughput['threads']} threads)", f"{throughput['jobs_per_s']:.0f} jobs/s", "", ""),
            ("  web CPU per submit", f"{throughput['web_cpu_ms_per_submit']:.1f} ms", "", ""),
            *get_rows(gets)]
    for g in grown:
        rows.append((f"queued {g['queued']}: submit / API list / queued list / jobs page p50",
                     f"{g['submit_p50_ms']:.1f} / {g['api_list_p50_ms']:.1f} / {g['api_list_queued_p50_ms']:.1f} / "
                     f"{g['jobs_page_p50_ms']:.1f} ms; db {g['db_size_mb']:.1f} MB", "", ""))
    print(table(rows))

    append(Path(args.out), info, [("submit_to_running", latency), ("submit_throughput", throughput),
                                  ("get_job", gets)] + [("scaling", g) for g in grown])


if __name__ == "__main__":
    main()
