"""Fault test 10: S3 errors during upload.

A small threaded HTTP proxy stands in front of the moto S3 server and answers
chosen requests with S3's own 500/503 errors instead of forwarding them. The
job runs in process through the real Executor, JobContext.write_file and boto3,
so what is checked is the service's whole upload path, against an S3 that fails
the way S3 does:
- botocore retries a failed upload, to the same key, and each artifact lands
  once: one row per name, whose sha256 is the stored object's, and nothing else
  under the job's prefix;
- when the failures outlast the retries, the job fails with the S3 error on its
  row, and no row names the object that never landed.
"""
from __future__ import annotations

import hashlib
import http.client
import threading
import uuid
from collections import defaultdict
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from shared.storage import S3Storage, job_key
from tests.conftest import S3_BUCKET

pytestmark = pytest.mark.services

# Checkpoints every step with one kept: the upload path also prunes (DELETE) while S3 fails.
TRAIN = {"preset": "tiny", "max_steps": 2, "checkpoint_every": 1, "checkpoints_keep": 1, "sample_steps": 2,
         "num_samples": 2}
WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"
S3_ERRORS = {  # status: (code, message) as S3 answers them; neither code counts as throttling in botocore
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("ServiceUnavailable", "Please reduce your request rate."),
}


class FlakyS3:
    """A proxy to the S3 server at `upstream`. `fail(method, key, n)` sees each request
    (n: how many requests with that method and key came before) and returns a status
    from S3_ERRORS to answer instead of forwarding, or None to forward. `requests`
    logs (method, key, status) in arrival order; keys are relative to `prefix`."""

    def __init__(self, upstream: str, prefix: str, fail):
        self.requests: list[tuple[str, str, int]] = []
        self._seen: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        upstream_netloc = urlsplit(upstream).netloc
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` as botocore sends it

            def _handle(self) -> None:
                url = urlsplit(self.path)
                key = unquote(url.path).lstrip("/").removeprefix(f"{S3_BUCKET}/{prefix}/")
                if "partNumber" in url.query:  # a multipart upload's part: its own retry unit
                    key += f"#part{parse_qs(url.query)['partNumber'][0]}"
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "the proxy reads bodies by length"
                with proxy._lock:
                    n = proxy._seen[(self.command, key)]
                    proxy._seen[(self.command, key)] += 1
                status = fail(self.command, key, n)
                if status is not None:
                    code, message = S3_ERRORS[status]
                    self._answer(status, {"Content-Type": "application/xml"}, (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                        f"</Message><RequestId>flaky-s3</RequestId></Error>").encode())
                else:
                    upstream_conn = http.client.HTTPConnection(upstream_netloc, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                    upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream_conn.getresponse()
                    status, data = resp.status, resp.read()
                    kept = {k: v for k, v in resp.getheaders()
                            if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                    if self.command == "HEAD":  # no body, but the object's length
                        kept["Content-Length"] = resp.getheader("Content-Length", "0")
                    upstream_conn.close()
                    self._answer(status, kept, data)
                with proxy._lock:
                    proxy.requests.append((self.command, key, status))

            def _answer(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, *args) -> None:  # quiet: the test reads `requests`
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="flaky-s3")
        self._thread.start()

    def statuses(self, method: str) -> dict[str, list[int]]:
        """key: the statuses answered to its `method` requests, in order."""
        out: dict[str, list[int]] = defaultdict(list)
        for m, key, status in self.requests:
            if m == method:
                out[key].append(status)
        return dict(out)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_endpoint, sqlite_settings):
    """flaky_s3(fail) -> (proxy, settings whose storage goes through it, direct storage)."""
    proxies = []

    def start(fail):
        prefix = f"flaky-{uuid.uuid4().hex[:8]}"
        proxy = FlakyS3(s3_endpoint, prefix, fail)
        proxies.append(proxy)
        settings = replace(sqlite_settings, storage_url=f"s3://{S3_BUCKET}/{prefix}", s3_endpoint_url=proxy.url)
        # The test's own view of the bucket goes straight to the S3 server, past the faults.
        return proxy, settings, S3Storage(S3_BUCKET, prefix, endpoint_url=s3_endpoint)

    yield start
    for proxy in proxies:
        proxy.close()


def assert_one_intact_object_per_row(job, storage) -> None:
    names = [a.name for a in job.artifacts]
    assert len(names) == len(set(names))
    assert storage.list(f"jobs/{job.id}/") == sorted(job_key(job.id, name) for name in names)  # no orphans
    for artifact in job.artifacts:
        data = storage.get_bytes(job_key(job.id, artifact.name))
        assert (len(data), hashlib.sha256(data).hexdigest()) == (artifact.size, artifact.sha256), artifact.name


def test_failed_uploads_are_retried_to_the_same_key_and_land_once(flaky_s3, run_inline):
    """Every upload's first two attempts get a 500 and then a 503; botocore's retries
    carry each one through, to the key it was first sent to."""
    proxy, settings, storage = flaky_s3(lambda method, key, n: (500, 503)[n] if method == "PUT" and n < 2 else None)
    job = run_inline("ddpm.train", TRAIN, settings=settings)
    assert job.status == "succeeded", job.traceback

    puts = proxy.statuses("PUT")
    job_prefix = f"jobs/{job.id}/"
    pruned = job_prefix + "checkpoints/step-000001.safetensors"
    assert set(puts) == {job_prefix + a.name for a in job.artifacts} | {pruned}
    assert WEIGHTS in {a.name for a in job.artifacts} and len(puts) >= 8
    # Same key three times: failed, failed, stored; never a second copy under another key.
    assert all(statuses == [500, 503, 200] for statuses in puts.values()), puts
    assert proxy.statuses("DELETE") == {pruned: [204]}
    assert_one_intact_object_per_row(job, storage)


def test_failures_that_outlast_the_retries_fail_the_job_with_the_s3_error(flaky_s3, run_inline):
    """The model's weights never get through: botocore gives up after its retries
    (shared/storage.py: 5, standard mode), and the error is the job's, not swallowed."""
    proxy, settings, storage = flaky_s3(lambda method, key, n: 500 if method == "PUT" and key.endswith(WEIGHTS)
                                        else None)
    job = run_inline("ddpm.train", TRAIN, settings=settings)
    assert job.status == "failed"
    assert job.error.startswith("S3UploadFailedError: Failed to upload ")
    assert f"jobs/{job.id}/{WEIGHTS}" in job.error
    assert ("An error occurred (InternalError) when calling the PutObject operation (reached max retries: 5): "
            "We encountered an internal error.") in job.error
    assert "S3UploadFailedError" in job.traceback

    assert proxy.statuses("PUT")[f"jobs/{job.id}/{WEIGHTS}"] == [500] * 6  # one try and five retries
    names = {a.name for a in job.artifacts}
    # What landed before the failure is recorded; the weights and all after them (metrics.json) are not.
    assert WEIGHTS not in names and "metrics.json" not in names
    assert {"checkpoints/step-000002.safetensors", "model/unet/config.json"} <= names
    assert_one_intact_object_per_row(job, storage)
