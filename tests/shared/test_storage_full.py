"""Storage that is full: a write refused for lack of space is a StorageFull, answered
507 by the web side and recorded plainly on a failed job, never the OS's or the
service's own text; and /healthz says when local storage is low on space."""
from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shared import storage as storage_module
from shared.db import make_engine, make_sessionmaker
from shared.errors import StorageFull
from shared.models import Upload
from shared.storage import LocalStorage, S3Storage, make_storage
from tests.upload_files import png_bytes

KIB = 1024


def mount_tmpfs(root: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)],
                          capture_output=True).returncode == 0


@pytest.fixture
def full_dir(tmp_path, monkeypatch) -> Path:
    """A folder whose filesystem has no space left: a 256 KiB tmpfs, filled. Mounting
    needs root; without it, storage's temp files are opened on /dev/full, whose writes
    fail with the same ENOSPC from the kernel."""
    root = tmp_path / "full"
    root.mkdir()
    mounted = mount_tmpfs(root, "256k")
    if mounted:
        try:
            with open(root / "filler", "wb") as f:
                while True:
                    f.write(bytes(64 * KIB))
                    f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    else:
        real_mkstemp = tempfile.mkstemp

        def on_dev_full(*args, **kwargs):
            fd, name = real_mkstemp(*args, **kwargs)
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
            return fd, name

        monkeypatch.setattr(storage_module.tempfile, "mkstemp", on_dev_full)
    yield root
    if mounted:
        subprocess.run(["umount", str(root)], check=True)


def left_behind(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "filler")


# ------------------------------------------------------------------ the storage boundary
@pytest.mark.parametrize("write", ["put_bytes", "put_file"])
def test_a_write_to_a_full_disk_is_storage_full(full_dir, tmp_path, write):
    data = bytes(128 * KIB)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    store = LocalStorage(full_dir)
    with pytest.raises(StorageFull) as info:
        if write == "put_bytes":
            store.put_bytes("jobs/abc/out.bin", data, "application/octet-stream")
        else:
            store.put_file("jobs/abc/out.bin", source, "application/octet-stream")
    message = str(info.value)
    assert message.startswith("storage is full: could not write jobs/abc/out.bin (No space left on device)")
    assert str(full_dir) not in message and str(tmp_path) not in message
    assert left_behind(full_dir) == []  # the temp file went with the failure


def test_a_full_quota_is_storage_full_and_other_errors_are_not(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)

    def refuse(code):
        def replace_file(src, dst):
            raise OSError(code, os.strerror(code), str(dst))
        return replace_file

    monkeypatch.setattr(storage_module.os, "replace", refuse(errno.EDQUOT))
    with pytest.raises(StorageFull, match="Disk quota exceeded"):
        store.put_bytes("jobs/abc/out.bin", b"x", "text/plain")
    monkeypatch.setattr(storage_module.os, "replace", refuse(errno.EACCES))
    with pytest.raises(PermissionError):
        store.put_bytes("jobs/abc/out.bin", b"x", "text/plain")
    assert left_behind(tmp_path) == []


@pytest.fixture
def s3_store(monkeypatch):
    """An S3Storage whose client answers from a botocore Stubber: no service runs."""
    from botocore.stub import Stubber

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    store = S3Storage("bucket", "prefix", endpoint_url="http://127.0.0.1:9")
    with Stubber(store.client) as stubber:
        yield store, stubber


@pytest.mark.parametrize("code, status", [("XMinioStorageFull", 507), ("QuotaExceeded", 403),
                                          ("SomethingNew", 507)])
@pytest.mark.parametrize("write", ["put_bytes", "put_file"])
def test_an_s3_service_out_of_space_is_storage_full(s3_store, tmp_path, code, status, write):
    store, stubber = s3_store
    stubber.add_client_error("put_object", service_error_code=code, service_message="no room at /data/disk1",
                             http_status_code=status)
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc")
    with pytest.raises(StorageFull) as info:
        if write == "put_bytes":
            store.put_bytes("jobs/abc/out.bin", b"abc", "text/plain")
        else:
            store.put_file("jobs/abc/out.bin", source, "text/plain")
    assert str(info.value).startswith("storage is full: could not write jobs/abc/out.bin")
    assert "/data/disk1" not in str(info.value) and str(source) not in str(info.value)


def test_other_s3_errors_are_left_as_they_are(s3_store):
    from botocore.exceptions import ClientError

    store, stubber = s3_store
    stubber.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(ClientError, match="AccessDenied"):
        store.put_bytes("jobs/abc/out.bin", b"abc", "text/plain")


# ------------------------------------------------------------------ the web side
def test_an_upload_to_full_storage_is_a_507_naming_storage(sqlite_settings, full_dir):
    from web import create_app

    settings = replace(sqlite_settings, storage_url=full_dir.as_uri())
    client = create_app(settings).test_client()
    resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(png_bytes(64, 64)), "cat.png")})
    assert resp.status_code == 507, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["error"] == "insufficient_storage" and set(body["fields"]) == {"storage"}
    assert body["message"].startswith("storage: no space left")
    text = resp.get_data(as_text=True)
    for leak in ("No space left on device", "Errno", "StorageFull", "uploads/", str(full_dir)):
        assert leak not in text, leak
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            assert session.scalar(select(func.count()).select_from(Upload)) == 0
    finally:
        engine.dispose()
    assert left_behind(full_dir) == []


def test_healthz_says_when_local_storage_is_low(sqlite_settings, caplog):
    from web import create_app

    root = make_storage(sqlite_settings).root
    low = create_app(replace(sqlite_settings, storage_min_free_bytes=2**50)).test_client().get("/healthz")
    assert low.status_code == 503
    checks = low.get_json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"]
    assert checks["storage"]["ok"] is False
    # Public: the bound, not the folder or what is left; the log has both.
    assert checks["storage"]["error"] == \
        "storage is low on space: less free than the 1024.0 TiB minimum (DIFFQUEUE_STORAGE_MIN_FREE_BYTES)"
    assert f"storage folder {root} is low on space: " in caplog.text and " free, below the 1024.0 TiB" in caplog.text

    ok = create_app(replace(sqlite_settings, storage_min_free_bytes=0)).test_client().get("/healthz")
    assert ok.status_code == 200 and ok.get_json()["checks"]["storage"] == {"ok": True}


def test_healthz_reports_a_full_disk_as_low(sqlite_settings, full_dir, caplog):
    from web import create_app

    if not (full_dir / "filler").exists():
        pytest.skip("no tmpfs here (not root): the disk behind /dev/full is not full")
    resp = create_app(replace(sqlite_settings, storage_url=full_dir.as_uri())).test_client().get("/healthz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["storage"]["error"].startswith("storage is low on space")
    assert "is low on space: 0 B free, below the 1.0 GiB minimum" in caplog.text


# ------------------------------------------------------------------ the worker side
def test_a_job_that_cannot_write_its_outputs_says_storage_is_full(run_inline, sqlite_settings, full_dir):
    settings = replace(sqlite_settings, storage_url=full_dir.as_uri())
    job = run_inline("ddpm.schedule_plot", {"image_size": 8, "num_timesteps_shown": 2}, settings)
    assert job.status == "failed"
    assert job.error.startswith(f"StorageFull: storage is full: could not write jobs/{job.id}/")
    assert "free space in storage, then retry" in job.error
    assert str(full_dir) not in job.error and str(full_dir) not in job.traceback
    assert job.artifacts == []
