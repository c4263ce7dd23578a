"""`diffqueue web` as a server: slow clients, framing, uploads (a real gunicorn with the
buffering worker of web/server.py), and what the app trusts of a request: the client's
address and scheme behind a proxy (ProxyFix), never the Host header in its URLs."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import requests
from PIL import Image

from tests.conftest import Services, free_port

# A generous bound: the stock gthread server took 37 s behind ten trickling bodies.
HEALTHZ_BOUND_S = 5.0


@pytest.fixture
def web(sqlite_settings, tmp_path):
    """A real `diffqueue web` (gunicorn, 1 process x 4 threads) on the embedded settings."""
    svc = Services(sqlite_settings, tmp_path)
    svc.start_web()
    yield svc
    svc.stop()


def healthz(url: str) -> tuple[bool, float]:
    """(answered 200 within HEALTHZ_BOUND_S, seconds taken)."""
    start = time.monotonic()
    try:
        ok = requests.get(url + "/healthz", timeout=HEALTHZ_BOUND_S).ok
    except requests.Timeout:
        ok = False
    return ok, time.monotonic() - start


def response(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP response from `sock`: (status, its JSON body)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, json.loads(resp.read())


def post_head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# ------------------------------------------------------------- slow clients
@pytest.mark.e2e
def test_trickling_bodies_leave_healthz_answering(web):
    """20 connections each send a head, then their body a byte a second: more than the
    server's threads. /healthz answers meanwhile, and every trickled request is still
    answered once its body is all there."""
    body = b'{"kind": "no-such-kind"}'.ljust(40)
    socks = [socket.create_connection(("127.0.0.1", web.port), timeout=30) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(post_head("/api/v1/jobs", len(body)) + body[:1])
        for sent in range(1, 5):
            time.sleep(1)
            for s in socks:
                s.sendall(body[sent:sent + 1])
            ok, seconds = healthz(web.url)
            assert ok, f"/healthz took over {HEALTHZ_BOUND_S} s behind 20 trickling bodies ({seconds:.1f} s)"
        for s in socks:
            s.sendall(body[5:])
        for s in socks:
            status, error = response(s)
            assert status == 400 and "kind" in error["fields"], error
    finally:
        for s in socks:
            s.close()


@pytest.mark.e2e
def test_pipelined_chunked_and_split_requests_are_served_in_order(web):
    """One connection: a GET, a chunked POST and another GET sent at once, then a
    request whose head and body arrive in pieces. Each is answered, in order."""
    payload = b'{"kind": "no-such-kind"}'
    chunked = (b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               + b"5\r\n" + payload[:5] + b"\r\n" + b"%x;ext=1\r\n" % (len(payload) - 5) + payload[5:] + b"\r\n"
               + b"0\r\nX-Trailer: yes\r\n\r\n")
    get = b"GET /api/v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as s:
        s.sendall(get + chunked + get)
        assert response(s)[0] == 200
        status, error = response(s)
        assert status == 400 and "kind" in error["fields"], error
        assert response(s)[0] == 200

        split = post_head("/api/v1/jobs", len(payload)) + payload
        for piece in (split[:7], split[7:40], split[40:-3], split[-3:]):
            s.sendall(piece)
            time.sleep(0.2)
        status, error = response(s)
        assert status == 400 and "kind" in error["fields"], error


@pytest.mark.e2e
def test_a_body_over_the_upload_limit_is_refused_from_its_head(web):
    """A declared body past the upload limit is not waited for: 413, then the close."""
    limit = web.settings.upload_max_bytes
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as s:
        s.sendall(post_head("/api/v1/uploads", 2 * limit, "multipart/form-data; boundary=x") + b"--x\r\n")
        status, error = response(s)
        assert status == 413 and "upload" in error["message"], error
        assert s.recv(1) == b""  # closed: the rest of that body is not read as a request


@pytest.mark.e2e
def test_cli_upload_of_megabytes_through_the_server(web, tmp_path):
    """`diffqueue upload` of a 7 MB image (its body on disk in the worker) through the server."""
    path = tmp_path / "noise.png"
    Image.frombytes("RGB", (1500, 1500), os.urandom(1500 * 1500 * 3)).save(path)
    assert path.stat().st_size > 6_000_000
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "upload", str(path), "--url", web.url],
                          env=web.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    upload_id = proc.stdout.strip().removeprefix("upload:")
    body = web.api("GET", f"/uploads/{upload_id}").json()
    assert body["kind"] == "image" and body["meta"]["width"] == 1500
    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["url"] == f"{web.url}/api/v1/uploads/{upload_id}"  # `diffqueue web`'s own address


# ------------------------------------------------------------- framing (the worker's inbox)
def inbox(body_limit: int = 1024 * 1024):
    from gunicorn.config import Config
    from web.server import _Inbox

    return _Inbox(Config(), ("127.0.0.1", 5000), body_limit)


def served_bytes(box) -> bytes:
    reader = box.reader()
    data = b""
    while piece := reader.chunk(1 << 20):
        data += piece
    return data


def test_a_body_past_the_memory_bound_is_spooled_to_disk_and_ready_at_its_last_byte():
    from web.server import SPOOL_MEMORY_BYTES

    body = os.urandom(4 * SPOOL_MEMORY_BYTES)
    request = post_head("/api/v1/uploads", len(body), "application/octet-stream") + body
    box = inbox()
    pieces = [request[i:i + 65536] for i in range(0, len(request), 65536)]
    assert not any(box.feed(piece) for piece in pieces[:-1])
    assert box.feed(pieces[-1]) and not box.truncated
    assert box.spool._rolled  # on disk: SpooledTemporaryFile moved it out of memory
    assert served_bytes(box) == request


def test_chunked_bodies_end_where_their_last_chunk_and_trailers_do():
    chunked = (b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;name=\"v\"\r\nabcd\r\n10\r\n" + b"0123456789abcdef" + b"\r\n0\r\nX-Sum: 1\r\n\r\n")
    following = b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n"
    box = inbox()
    stream = chunked + following
    ready_at = next(i for i in range(1, len(stream) + 1) if box.feed(stream[i - 1:i]))
    assert ready_at == len(chunked)  # not a byte sooner, byte by byte
    assert served_bytes(box) == chunked
    after = box.next_request()
    assert not after.ready and after.feed(following) and served_bytes(after) == following


def test_pipelined_requests_are_framed_one_at_a_time():
    first = post_head("/a", 3) + b"abc"
    second = b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    box = inbox()
    assert box.feed(first + second[:10])
    assert served_bytes(box) == first
    following = box.next_request()
    assert not following.ready and following.feed(second[10:]) and served_bytes(following) == second


@pytest.mark.parametrize("request_bytes, why", [
    (post_head("/api/v1/uploads", 10 ** 9), "a declared body over the limit"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "a chunk size that is not hex"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "two lengths"),
    (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * (2 * 1024 * 1024), "a head over every limit"),
])
def test_requests_refused_from_what_is_here_are_handed_on_at_once(request_bytes, why):
    """Not waited for: the thread's parser or the app answers them, and the connection closes."""
    box = inbox(body_limit=1024)
    assert box.feed(request_bytes), why
    assert box.truncated and served_bytes(box) == request_bytes


def test_expect_100_continue_is_due_only_while_the_body_is_missing():
    head = post_head("/a", 3)[:-2] + b"Expect: 100-continue\r\n\r\n"
    waiting = inbox()
    assert not waiting.feed(head) and waiting.continue_due
    complete = inbox()
    assert complete.feed(head + b"abc") and not complete.continue_due


# ------------------------------------------------------------- URLs: the public URL, never Host
def submit(client) -> str:
    resp = client.post("/api/v1/jobs", json={"kind": "ddpm.train", "params": {}})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def job_urls(job: dict) -> list[str]:
    return [job["url"], job["progress"]["preview"]["url"], *(a["url"] for a in job["artifacts"])]


def with_artifacts(client, settings) -> str:
    from tests.web.test_api import add_artifacts

    job_id = submit(client)
    add_artifacts(settings, job_id, {"samples.png": (b"png", "image/png"),
                                     "previews/step-0001.png": (b"png", "image/png")})
    return job_id


def test_a_host_header_appears_in_no_url_of_a_job(client, sqlite_settings):
    """Without DIFFQUEUE_PUBLIC_URL, URLs are paths (the client resolves them), whatever Host says."""
    job_id = with_artifacts(client, sqlite_settings)
    resp = client.get(f"/api/v1/jobs/{job_id}", headers={"Host": "evil.example"})
    assert resp.status_code == 200 and "evil.example" not in resp.get_data(as_text=True)
    urls = job_urls(resp.get_json())
    assert len(urls) == 4 and all(u.startswith(f"/api/v1/jobs/{job_id}") for u in urls), urls
    assert client.get(urls[-1]).data == b"png"  # a path that leads to the artifact


def test_urls_are_built_on_the_public_url(sqlite_settings):
    from tests.web.test_schedules_api import BODY
    from web import create_app

    client = create_app(replace(sqlite_settings, public_url="https://dq.example.com")).test_client()
    evil = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    job_id = with_artifacts(client, sqlite_settings)
    job = client.get(f"/api/v1/jobs/{job_id}", headers=evil).get_json()
    listed = client.get("/api/v1/jobs", headers=evil).get_json()["jobs"][0]
    upload = client.post("/api/v1/uploads", data={"file": (io.BytesIO(b"a cat\n"), "p.txt")}, headers=evil).get_json()
    schedule = client.post("/api/v1/schedules", json=BODY, headers=evil).get_json()
    urls = [*job_urls(job), listed["url"], upload["url"], schedule["url"]]
    assert all(u.startswith("https://dq.example.com/api/v1/") for u in urls), urls
    assert upload["url"] == f"https://dq.example.com/api/v1/uploads/{upload['id']}"


def test_a_kept_job_json_is_one_for_every_host(prod_client):
    """On Postgres a polled job's JSON is kept between requests: one copy for all hosts."""
    job_id = submit(prod_client)
    for host in ("evil.example", "other.example", "evil.example"):
        body = prod_client.get(f"/api/v1/jobs/{job_id}", headers={"Host": host}).get_data(as_text=True)
        assert ".example" not in body and f'"url":"/api/v1/jobs/{job_id}"' in body


@pytest.mark.parametrize("public_url", ["diffqueue.example.com", "ftp://x", "https://x/?q=1", "https://"])
def test_a_public_url_that_is_no_address_is_refused(sqlite_settings, public_url):
    from shared.config import ConfigError, Settings

    settings = Settings.from_env({**sqlite_settings.as_env(), "DIFFQUEUE_PUBLIC_URL": public_url})
    with pytest.raises(ConfigError, match="DIFFQUEUE_PUBLIC_URL must be an http:// or https:// address"):
        settings.check()


def test_public_url_and_proxy_hops_from_env_and_back(tmp_path):
    from shared.config import ConfigError, Settings

    env = {"DIFFQUEUE_DATA_DIR": str(tmp_path), "DIFFQUEUE_PUBLIC_URL": "https://dq.example.com/",
           "DIFFQUEUE_PROXY_HOPS": "2"}
    settings = Settings.from_env(env)
    assert (settings.public_url, settings.proxy_hops) == ("https://dq.example.com", 2)
    assert Settings.from_env({**settings.as_env(), "DIFFQUEUE_DATA_DIR": str(tmp_path)}) == settings
    unset = Settings.from_env({"DIFFQUEUE_DATA_DIR": str(tmp_path)})
    assert (unset.public_url, unset.proxy_hops) == ("", 0) and "DIFFQUEUE_PUBLIC_URL" not in unset.as_env()
    with pytest.raises(ConfigError, match="DIFFQUEUE_PROXY_HOPS must be 0 or more"):
        replace(unset, proxy_hops=-1).check()


def test_diffqueue_web_and_up_give_the_web_their_own_address():
    from shared.cli import with_public_url

    assert with_public_url({}, "127.0.0.1", 8000)["DIFFQUEUE_PUBLIC_URL"] == "http://127.0.0.1:8000"
    assert with_public_url({}, "::1", 8000)["DIFFQUEUE_PUBLIC_URL"] == "http://[::1]:8000"
    assert "DIFFQUEUE_PUBLIC_URL" not in with_public_url({}, "0.0.0.0", 8000)  # which address? paths
    mine = {"DIFFQUEUE_PUBLIC_URL": "https://dq.example.com"}
    assert with_public_url(mine, "127.0.0.1", 8000) == mine


def test_cli_download_resolves_paths_against_the_api(monkeypatch, tmp_path):
    from shared import cli
    from shared.config import Settings

    fetched = []

    def fake_request(args, method, url, **kw):
        fetched.append(url)
        if url.endswith("/jobs/j1"):
            return SimpleNamespace(json=lambda: {"artifacts": [
                {"name": "a.png", "url": "/api/v1/jobs/j1/artifacts/a.png"},
                {"name": "b.png", "url": "https://cdn.example/b.png"}]})
        return SimpleNamespace(content=b"bytes of " + url.encode())

    monkeypatch.setattr(cli, "_request", fake_request)
    args = SimpleNamespace(id="j1", dir=str(tmp_path), prefix=None, url="http://dq.internal:8000/", token=None)
    cli.cmd_download(args, Settings.embedded(tmp_path / "data"))
    assert fetched[1:] == ["http://dq.internal:8000/api/v1/jobs/j1/artifacts/a.png", "https://cdn.example/b.png"]
    assert (tmp_path / "a.png").read_bytes() == b"bytes of " + fetched[1].encode()


# ------------------------------------------------------------- behind a proxy: ProxyFix
def whoami_client(settings):
    from flask import request

    from web import create_app

    app = create_app(settings)

    @app.get("/test-whoami")
    def whoami():
        return {"addr": request.remote_addr, "scheme": request.scheme, "host": request.host}

    return app.test_client()


FORWARDED = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "X-Forwarded-Proto": "https",
             "X-Forwarded-Host": "dq.example.com"}


def test_one_trusted_hop_gives_the_address_the_proxy_saw(sqlite_settings):
    """The proxy appends the address it saw to X-Forwarded-For; what a client wrote before
    it (203.0.113.9 here) is not believed."""
    client = whoami_client(replace(sqlite_settings, proxy_hops=1))
    seen = client.get("/test-whoami", headers=FORWARDED, environ_base={"REMOTE_ADDR": "172.18.0.5"}).get_json()
    assert seen == {"addr": "198.51.100.7", "scheme": "https", "host": "dq.example.com"}


def test_no_trusted_hop_ignores_forwarding_headers(sqlite_settings):
    client = whoami_client(sqlite_settings)  # DIFFQUEUE_PROXY_HOPS defaults to 0
    seen = client.get("/test-whoami", headers=FORWARDED, environ_base={"REMOTE_ADDR": "172.18.0.5"}).get_json()
    assert seen == {"addr": "172.18.0.5", "scheme": "http", "host": "localhost"}


@pytest.mark.parametrize("hops, other_client_refused", [(1, False), (0, True)])
def test_rate_limits_count_per_forwarded_address(sqlite_settings, hops, other_client_refused):
    """Behind one proxy every request comes from its address: the limiter must count each
    client by the address the proxy forwarded, or one busy client locks out everyone."""
    from web import create_app

    client = create_app(replace(sqlite_settings, proxy_hops=hops, rate_limit="2/minute")).test_client()

    def get(client_addr: str) -> int:
        return client.get("/api/v1/kinds", headers={"X-Forwarded-For": client_addr},
                          environ_base={"REMOTE_ADDR": "172.18.0.5"}).status_code

    assert [get("198.51.100.7") for _ in range(3)] == [200, 200, 429]
    assert get("198.51.100.8") == (429 if other_client_refused else 200)


@pytest.mark.e2e
def test_through_nginx_each_client_is_counted_by_its_own_address(sqlite_settings, tmp_path):
    """deploy/nginx.conf in front of a real `diffqueue web` trusting one hop: two clients
    (127.0.0.2 and 127.0.0.3) have a rate limit each, whatever X-Forwarded-For they
    write; a body over the upload limit is refused by nginx, in JSON."""
    import shutil

    from tests.test_compose import NGINX_CONF

    exe = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if exe is None:
        pytest.skip("nginx is not installed (Debian's nginx-light will do)")
    svc = Services(replace(sqlite_settings, proxy_hops=1, rate_limit="3/minute"), tmp_path)
    svc.start_web()
    port = free_port()
    site = (NGINX_CONF.read_text().replace("resolver 127.0.0.11", "# resolver")
            .replace("listen 80;", f"listen 127.0.0.1:{port};").replace("http://web:8000", svc.url))
    (tmp_path / "site.conf").write_text(site)
    temps = " ".join(f"{kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'nginx-error.log'}; daemon off;\n"
        f"events {{}}\nhttp {{ access_log off; {temps} include {tmp_path / 'site.conf'}; }}\n")
    nginx = subprocess.Popen([exe, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                             stderr=subprocess.STDOUT, stdout=open(tmp_path / "nginx.log", "wb"))
    try:
        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        svc.wait_until("nginx listening", listening, 30)

        def get(client_addr: str, forged: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(client_addr, 0))
            conn.request("GET", "/api/v1/kinds", headers={"X-Forwarded-For": forged})
            status = conn.getresponse().status
            conn.close()
            return status

        assert [get("127.0.0.2", f"203.0.113.{i}") for i in range(4)] == [200, 200, 200, 429]
        assert get("127.0.0.3", "127.0.0.2") == 200

        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(post_head("/api/v1/uploads", 2 * 1024**3, "multipart/form-data; boundary=x"))
            status, error = response(s)
        assert status == 413 and error["fields"] == {"body": "larger than the 1025 MiB limit of the proxy"}
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        svc.stop()
