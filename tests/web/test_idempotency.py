"""Idempotency-Key on POST /api/v1/jobs and /uploads, on Postgres as deployed: a request
sent again gets the first one's resource, never a second; a different request with the
same key is a 422; and the CLI's submit, whose answer a network error lost, sends it
again and gets the same job."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError

from shared.db import make_engine, make_sessionmaker, session_scope
from shared.models import IdempotencyKey, Job, Upload
from tests.conftest import free_port, signed_in
from tests.upload_files import png_bytes

BODY = {"kind": "ddpm.schedule_plot", "params": {"num_timesteps_shown": 4}}


@pytest.fixture
def settings(prod_settings, own_pg_url):
    settings = replace(prod_settings, database_url=own_pg_url)
    with session_scope(make_sessionmaker(make_engine(own_pg_url))) as session:
        for model in (IdempotencyKey, Job, Upload):
            session.execute(delete(model))
    return settings


@pytest.fixture
def api(settings):
    from web import create_app

    app = create_app(settings)
    return signed_in(app.test_client(), settings, user="idem-alice", admin=False)


def count(settings, model, **where) -> int:
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return session.scalar(query)


def post(api, body=BODY, key="k-1"):
    return api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key} if key is not None else {})


def test_the_same_key_gets_the_first_job_back(api, settings):
    first, again = post(api), post(api)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert count(settings, Job) == 1
    third = post(api, key="k-2")  # a new key is a new job; no key, as before, a new one each time
    assert third.get_json()["id"] != first.get_json()["id"]
    assert post(api, key=None).get_json()["id"] != post(api, key=None).get_json()["id"]
    assert count(settings, Job) == 4


def test_the_same_key_with_another_request_is_a_422_and_makes_nothing(api, settings):
    assert post(api).status_code == 202
    resp = post(api, {**BODY, "priority": 5})
    assert resp.status_code == 422, resp.get_json()
    assert "another request body" in resp.get_json()["fields"]["Idempotency-Key"]
    upload = api.post("/api/v1/uploads", data={"file": (io.BytesIO(png_bytes()), "a.png")},
                      headers={"Idempotency-Key": "k-1"})
    assert upload.status_code == 422 and "POST /api/v1/jobs" in upload.get_json()["fields"]["Idempotency-Key"]
    assert count(settings, Job) == 1 and count(settings, Upload) == 0


def test_keys_are_per_user_and_last_24_hours(api, settings):
    from web import create_app

    bob = signed_in(create_app(settings).test_client(), settings, user="idem-bob", admin=False)
    mine, his = post(api), post(bob)
    assert mine.get_json()["id"] != his.get_json()["id"]
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        session.execute(update(IdempotencyKey).values(created_at=func.now() - timedelta(hours=25)))
        session.commit()
    later = post(api)  # a day on, the key is free again
    assert later.status_code == 202 and later.get_json()["id"] != mine.get_json()["id"]
    assert "Idempotent-Replayed" not in later.headers
    engine.dispose()


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "a b"])
def test_a_malformed_key_is_a_400_naming_the_header(api, settings, key):
    resp = post(api, key=key)
    assert resp.status_code == 400 and "Idempotency-Key" in resp.get_json()["fields"], resp.get_json()
    assert count(settings, Job) == 0


def test_a_submit_whose_answer_failed_is_found_by_its_key(api, settings, monkeypatch):
    """The storm the key is for: the job was committed, then the request failed (here the
    read after the commit: a 503), and the client sends it again."""
    from shared import jobs

    real = jobs.get_job
    calls = {"n": 0}

    def cut_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("SELECT 1", {}, ConnectionResetError("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "get_job", cut_once)
    failed = post(api)
    assert failed.status_code == 503 and count(settings, Job) == 1
    again = post(api)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert count(settings, Job) == 1


def test_two_requests_at_once_with_a_new_key_make_one_job(settings):
    from web import create_app

    app = create_app(settings)
    clients = [signed_in(app.test_client(), settings, user="idem-carol", admin=False) for _ in range(6)]
    start, answers = threading.Barrier(len(clients)), []

    def send(client):
        start.wait()
        answers.append(post(client, key="race"))

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [a.status_code for a in answers] == [202] * len(clients)
    assert len({a.get_json()["id"] for a in answers}) == 1
    assert count(settings, Job) == 1 and count(settings, IdempotencyKey) == 1


def test_an_upload_sent_again_is_the_same_upload(api, settings):
    def upload(data: bytes):
        return api.post("/api/v1/uploads", data={"file": (io.BytesIO(data), "cat.png")},
                        headers={"Idempotency-Key": "u-1"})

    first, again = upload(png_bytes()), upload(png_bytes())
    assert first.status_code == again.status_code == 201
    assert first.get_json()["id"] == again.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = upload(png_bytes(32, 32))
    assert other.status_code == 422
    assert count(settings, Upload) == 1


class DropFirstAnswer:
    """A TCP proxy in front of the web that forwards the first request but drops the
    connection before its answer, then forwards everything: the lost answer of a submit."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target = ("127.0.0.1", target_port)
        self.dropped = 0
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        upstream = socket.create_connection(self.target)
        drop = self.dropped == 0
        self.dropped += drop

        def forward(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=forward, args=(client, upstream), daemon=True).start()
        if drop:
            upstream.recv(65536)  # the answer comes, and the client never sees it
            for sock in (client, upstream):  # shutdown first: the forwarding thread still holds them
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            return
        forward(upstream, client)

    def close(self):
        self.listener.close()


@pytest.mark.e2e
def test_the_cli_sends_a_submit_again_after_a_lost_answer_and_gets_one_job(settings, tmp_path):
    from tests.conftest import Services

    svc = Services(settings, tmp_path)
    proxy = None
    try:
        svc.start_web()
        proxy = DropFirstAnswer(svc.port)
        env = {**svc.env, "DIFFQUEUE_URL": f"http://127.0.0.1:{proxy.port}"}
        out = subprocess.run([sys.executable, "-m", "shared.cli", "submit", "ddpm.schedule_plot", "-p",
                              "num_timesteps_shown=4"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert proxy.dropped == 1 and "sending it again" in out.stderr
        job_id = out.stdout.strip()
        assert svc.api("GET", f"/jobs/{job_id}").status_code == 200
        assert count(settings, Job) == 1
    finally:
        if proxy is not None:
            proxy.close()
        svc.stop()
