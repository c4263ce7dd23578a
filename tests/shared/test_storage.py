"""Artifact storage: the same behaviour from the local-folder and the S3 backend."""
from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from shared.config import Settings
from shared.errors import StorageError
from shared.storage import LocalStorage, S3Storage, job_key, make_storage, safe_name
from tests.conftest import S3_BUCKET

PRESIGN_EXPIRY_S = 123


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Storage(
        S3_BUCKET, f"test-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint, presign_expiry_s=PRESIGN_EXPIRY_S
    )


@pytest.fixture
def s3_storage(s3_endpoint):
    return S3Storage(
        S3_BUCKET, f"test-{uuid.uuid4().hex[:12]}", endpoint_url=s3_endpoint, presign_expiry_s=PRESIGN_EXPIRY_S
    )


def test_put_get_bytes_round_trip(storage):
    data = bytes(range(256)) * 10
    storage.put_bytes("jobs/a/blob.bin", data, "application/octet-stream")
    assert storage.get_bytes("jobs/a/blob.bin") == data


def test_put_file(storage, tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"from a file\n")
    storage.put_file("jobs/a/dir/file.txt", src, "text/plain")
    assert storage.get_bytes("jobs/a/dir/file.txt") == b"from a file\n"


def test_overwrite_keeps_one_object(storage):
    storage.put_bytes("jobs/a/x.txt", b"first", "text/plain")
    storage.put_bytes("jobs/a/x.txt", b"second", "text/plain")
    assert storage.list("jobs/a") == ["jobs/a/x.txt"]
    assert storage.get_bytes("jobs/a/x.txt") == b"second"


def test_list_is_sorted_and_scoped_to_the_prefix(storage):
    for key in ["jobs/a/z.txt", "jobs/a/images/1.png", "jobs/a/b.txt", "jobs/ab/other.txt", "jobs/b/c.txt"]:
        storage.put_bytes(key, key.encode(), "text/plain")
    assert storage.list("jobs/a") == ["jobs/a/b.txt", "jobs/a/images/1.png", "jobs/a/z.txt"]
    assert storage.list("jobs/a/") == ["jobs/a/b.txt", "jobs/a/images/1.png", "jobs/a/z.txt"]
    assert storage.list("jobs/a/images") == ["jobs/a/images/1.png"]
    assert storage.list("jobs/nothing") == []


def test_exists(storage):
    assert not storage.exists("jobs/a/x.txt")
    storage.put_bytes("jobs/a/x.txt", b"x", "text/plain")
    assert storage.exists("jobs/a/x.txt")
    assert not storage.exists("jobs/a/y.txt")


def test_delete_prefix(storage):
    for key in ["jobs/a/1.txt", "jobs/a/sub/2.txt", "jobs/ab/3.txt", "jobs/b/4.txt"]:
        storage.put_bytes(key, b"x", "text/plain")
    storage.delete_prefix("jobs/a")
    assert storage.list("jobs/a") == []
    assert not storage.exists("jobs/a/1.txt")
    assert storage.list("jobs/ab") == ["jobs/ab/3.txt"]
    assert storage.list("jobs/b") == ["jobs/b/4.txt"]
    storage.delete_prefix("jobs/missing")  # deleting nothing is fine


def test_delete_one_key(storage):
    storage.put_bytes("jobs/a/1.txt", b"x", "text/plain")
    storage.put_bytes("jobs/a/2.txt", b"y", "text/plain")
    storage.delete("jobs/a/1.txt")
    assert storage.list("jobs/a") == ["jobs/a/2.txt"]
    storage.delete("jobs/a/1.txt")  # deleting a missing key is fine


def test_download(storage, tmp_path):
    storage.put_bytes("jobs/a/model/weights.bin", b"\x00\x01weights", "application/octet-stream")
    dest = tmp_path / "out" / "deep" / "weights.bin"
    storage.download("jobs/a/model/weights.bin", dest)
    assert dest.read_bytes() == b"\x00\x01weights"


def test_open_stream(storage):
    data = b"stream me " * 1000
    storage.put_bytes("jobs/a/s.txt", data, "text/plain")
    assert b"".join(storage.open_stream("jobs/a/s.txt")) == data


def test_missing_key_raises_storage_error(storage):
    with pytest.raises(StorageError):
        storage.get_bytes("jobs/a/missing.txt")
    with pytest.raises(StorageError):
        storage.open_stream("jobs/a/missing.txt")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "", "a/../b", "./a"])
def test_bad_keys_are_refused(storage, bad):
    with pytest.raises(StorageError):
        storage.put_bytes(bad, b"x", "text/plain")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "", "a/..", "a/./b"])
def test_safe_name_rejects(bad):
    with pytest.raises(StorageError):
        safe_name(bad)


def test_safe_name_accepts():
    assert safe_name("images/0.png") == "images/0.png"
    assert safe_name("model/unet/config.json") == "model/unet/config.json"


def test_job_key():
    assert job_key("abc", "images/0.png") == "jobs/abc/images/0.png"
    with pytest.raises(StorageError):
        job_key("abc", "../other/x")


# ------------------------------------------------------------------ presigned URLs
def test_s3_presigned_url_fetches_the_bytes(s3_storage):
    data = b"\x89PNG fake image bytes"
    s3_storage.put_bytes("jobs/a/images/0.png", data, "image/png")
    url = s3_storage.presigned_url("jobs/a/images/0.png")
    assert url and url.startswith("http://127.0.0.1:")
    assert f"X-Amz-Expires={PRESIGN_EXPIRY_S}" in url
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["Content-Type"] == "image/png"


def test_s3_presigned_url_uses_the_public_endpoint(s3_endpoint):
    store = S3Storage(S3_BUCKET, "p", endpoint_url=s3_endpoint, public_endpoint_url="http://public.example:9000")
    url = store.presigned_url("jobs/a/x.txt")
    assert url.startswith("http://public.example:9000/")


def test_local_presigned_url_is_none(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/a/x.txt", b"x", "text/plain")
    assert store.presigned_url("jobs/a/x.txt") is None


def test_local_check_creates_the_folder(tmp_path):
    store = LocalStorage(tmp_path / "new" / "root")
    store.check()
    assert (tmp_path / "new" / "root").is_dir()


# ------------------------------------------------------------------ make_storage
def _settings(tmp_path, **kw) -> Settings:
    return replace(Settings.embedded(tmp_path), **kw)


def test_make_storage_file_url(tmp_path):
    root = tmp_path / "art ifacts"
    store = make_storage(_settings(tmp_path, storage_url=root.as_uri()))
    assert isinstance(store, LocalStorage)
    assert Path(store.root) == root  # percent-decoded
    store.put_bytes("jobs/x/a.txt", b"a", "text/plain")
    assert (root / "jobs" / "x" / "a.txt").read_bytes() == b"a"


def test_make_storage_s3_url(tmp_path, s3_endpoint):
    settings = _settings(
        tmp_path, storage_url=f"s3://{S3_BUCKET}/some/prefix", s3_endpoint_url=s3_endpoint, presign_expiry_s=77
    )
    store = make_storage(settings)
    assert isinstance(store, S3Storage)
    assert store.bucket == S3_BUCKET and store.prefix == "some/prefix"
    store.put_bytes("jobs/x/a.txt", b"a", "text/plain")
    assert store.get_bytes("jobs/x/a.txt") == b"a"
    assert "X-Amz-Expires=77" in store.presigned_url("jobs/x/a.txt")
    store.check()


@pytest.mark.parametrize("url", ["ftp://x", "s3://", "s3:///prefix", "relative/path"])
def test_make_storage_rejects(tmp_path, url):
    with pytest.raises(StorageError):
        make_storage(_settings(tmp_path, storage_url=url))
