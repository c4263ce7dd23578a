"""GET /api/v1/jobs/<id>/archive streams its zip: written as it is sent, one storage
chunk at a time, never whole in the web process's memory."""
from __future__ import annotations

import hashlib
import os
import tracemalloc
import zipfile

from tests.web.test_api import add_artifacts, submit

MIB = 1024 * 1024


def test_the_archive_is_streamed_with_every_members_bytes(client, sqlite_settings, tmp_path):
    files = {
        "samples.png": (b"\x89PNG\r\n\x1a\n not really a png", "image/png"),
        "model/config.json": (b'{"sample_size": 16}', "application/json"),
        # Several storage chunks, and bytes deflate cannot shrink.
        "model/unet/weights.safetensors": (os.urandom(3 * MIB + 12345), "application/octet-stream"),
        "model/empty.txt": (b"", "text/plain"),
    }
    job_id = submit(client)["id"]
    add_artifacts(sqlite_settings, job_id, files)

    resp = client.get(f"/api/v1/jobs/{job_id}/archive?prefix=model/")
    assert resp.status_code == 200 and resp.mimetype == "application/zip"
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{job_id}-model.zip"'
    # A generator answers: no length is known before the end, and the body came in pieces.
    assert resp.is_streamed and "Content-Length" not in resp.headers
    path = tmp_path / "archive.zip"
    with open(path, "wb") as out:
        pieces = sum(1 for chunk in resp.response if out.write(chunk) or True)
    assert pieces > 3
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every member's CRC matches its bytes
        assert sorted(zf.namelist()) == sorted(name for name in files if name.startswith("model/"))
        for name in zf.namelist():
            assert hashlib.sha256(zf.read(name)).digest() == hashlib.sha256(files[name][0]).digest(), name


def test_a_large_artifact_never_sits_in_memory(client, sqlite_settings, tmp_path):
    size = 24 * MIB
    data = os.urandom(size)
    job_id = submit(client)["id"]
    add_artifacts(sqlite_settings, job_id, {"model/big.bin": (data, "application/octet-stream")})
    digest, data = hashlib.sha256(data).hexdigest(), None

    path = tmp_path / "archive.zip"
    tracemalloc.start()
    try:
        resp = client.get(f"/api/v1/jobs/{job_id}/archive")
        with open(path, "wb") as out:
            for chunk in resp.response:
                out.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Built in memory, the zip held the artifact and its compressed copy (78 MiB at the
    # peak, measured). Streamed, a storage chunk (1 MiB), its compressed copy, zlib's and
    # the test client's buffers: under 6 MiB, measured.
    assert peak < 12 * MIB, f"peak {peak / MIB:.1f} MiB while sending a {size // MIB} MiB artifact"
    with zipfile.ZipFile(path) as zf:
        h = hashlib.sha256()
        with zf.open("model/big.bin") as member:
            for chunk in iter(lambda: member.read(MIB), b""):
                h.update(chunk)
    assert h.hexdigest() == digest
