"""Artifact storage: one interface, a local-folder backend and an S3 backend.

Keys are deterministic (`jobs/<id>/<name>`), so a retried upload overwrites
rather than duplicates.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol
from urllib.parse import unquote, urlparse

from shared.config import Settings
from shared.errors import StorageError, StorageFull, StorageLow

CHUNK_BYTES = 1024 * 1024
# What a full disk or an exhausted quota looks like: errno from a local write, and the
# error codes S3-compatible services answer with (MinIO: XMinioStorageFull, HTTP 507;
# Ceph RGW: QuotaExceeded). MinIO answers a disk that filled mid-write with a plain
# 500 InternalError whose message says "no space left on device".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_S3_CODES = ("XMinioStorageFull", "InsufficientStorage", "QuotaExceeded")
NO_SPACE_S3_STATUS = 507


def job_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{safe_name(name)}"


def upload_key(upload_id: str) -> str:
    """Where an upload's bytes live: `uploads/<id>/data` (the original filename is on
    the row; the key depends on the id alone)."""
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id or ""):
        raise StorageError(f"invalid upload id {upload_id!r}: expected 32 hex digits")
    return f"uploads/{upload_id}/data"


def safe_name(name: str) -> str:
    """An artifact name as a relative POSIX path with no `..`, or StorageError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise StorageError(f"invalid artifact name {name!r}: must be a relative path without '..'")
    return str(path)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the limits are set)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def storage_full(key: str, reason: str) -> StorageFull:
    """The refusal of a write for lack of space. It names the key (not a server path):
    a job that failed this way says what it could not write."""
    return StorageFull(f"storage is full: could not write {key} ({reason}); free space in storage, then retry")


def file_digest(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class _ZipSink(io.RawIOBase):
    """Where zipfile writes a streamed archive: it keeps what was written until taken.
    It cannot seek, so zipfile puts each member's sizes after its data."""

    def __init__(self):
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def zip_stream(storage: "Storage", members: list[tuple[str, str, int]]) -> Iterator[bytes]:
    """A deflated zip of storage objects, yielded as it is written: `members` are (key,
    name in the zip, size in bytes). Each object is read in CHUNK_BYTES chunks, so
    memory holds about one chunk whatever the objects' sizes."""
    sink = _ZipSink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, name, size in members:
            info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16  # what ZipFile.writestr gives a member
            # zipfile chooses zip64 from the declared size before writing the data; a
            # stream cannot go back to change the header afterwards.
            info.file_size = size
            with zf.open(info, "w") as dest:
                for chunk in storage.open_stream(key):
                    dest.write(chunk)
                    if data := sink.take():
                        yield data
            if data := sink.take():
                yield data
    if data := sink.take():  # the central directory, written on close
        yield data


class Storage(Protocol):
    def put_file(self, key: str, path: Path, content_type: str) -> None: ...
    def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, dest: Path) -> None: ...
    def open_stream(self, key: str) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def presigned_url(self, key: str) -> str | None: ...
    def check(self) -> None: ...


class LocalStorage:
    """Artifacts in a folder. Writes go to a temp file first, then are renamed in.
    /healthz calls `check`, which also wants `min_free_bytes` free on its disk."""

    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes

    def _path(self, key: str) -> Path:
        path = (self.root / safe_name(key)).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"key {key!r} escapes the storage root")
        return path

    def _atomic_write(self, key: str, write) -> None:
        dest = self._path(key)
        tmp = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dest)
        except BaseException as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
                # The OS's text names the temp file's absolute path: not for users.
                raise storage_full(key, os.strerror(exc.errno)) from None
            raise

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES))

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no object at {key!r}") from None

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), dest)

    def open_stream(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no object at {key!r}")

        def chunks():
            with open(path, "rb") as f:
                yield from iter(lambda: f.read(CHUNK_BYTES), b"")

        return chunks()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root).as_posix())
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / safe_name(prefix.rstrip("/")), ignore_errors=True)

    def presigned_url(self, key: str) -> str | None:
        return None  # served through the API

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage folder {self.root} is not writable")
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            bound = f"the {human_bytes(self.min_free_bytes)} minimum (DIFFQUEUE_STORAGE_MIN_FREE_BYTES)"
            raise StorageLow(f"storage folder {self.root} is low on space: {human_bytes(free)} free, below {bound}",
                             f"storage is low on space: less free than {bound}")


class S3Storage:
    """S3-compatible storage (AWS, MinIO) through boto3, with presigned GET URLs."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        presign_expiry_s: int = 300,
    ):
        import boto3
        from botocore.config import Config

        # A 500/503 or a dropped connection is retried with backoff, to the same key, up to
        # 5 retries (botocore's `max_attempts` counts retries: 6 tries in all); then the
        # error reaches the job (tests/test_s3_faults.py).
        config = Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"})
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.presign_client = (
            boto3.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self.client
        )
        self.presign_expiry_s = presign_expiry_s

    def _key(self, key: str) -> str:
        key = safe_name(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})
        except Exception as exc:
            full = self._no_space(key, exc)
            if full is None:
                raise
            raise full from None

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        except Exception as exc:
            full = self._no_space(key, exc)
            if full is None:
                raise
            raise full from None

    @staticmethod
    def _no_space(key: str, exc: BaseException) -> StorageFull | None:
        """StorageFull when the service refused the write for lack of space, else None.
        upload_file wraps the ClientError in an S3UploadFailedError, so look down the chain."""
        from botocore.exceptions import ClientError

        while exc is not None and not isinstance(exc, ClientError):
            exc = exc.__cause__ or exc.__context__
        if exc is None:
            return None
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if (error.get("Code") in NO_SPACE_S3_CODES or status == NO_SPACE_S3_STATUS
                or "no space left on device" in str(error.get("Message", "")).lower()):
            return storage_full(key, f"the S3 service answered {error.get('Code') or status}")
        return None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise StorageError(f"no object at {key!r}") from None

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(dest))

    def open_stream(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise StorageError(f"no object at {key!r}") from None
        return body.iter_chunks(CHUNK_BYTES)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(k)} for k in keys[i : i + 1000]]},
            )

    def presigned_url(self, key: str) -> str | None:
        return self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=self.presign_expiry_s
        )

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_storage(settings: Settings) -> Storage:
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        return LocalStorage(Path(unquote(url.path)), settings.storage_min_free_bytes)
    if url.scheme == "s3":
        if not url.netloc:
            raise StorageError(f"storage URL {settings.storage_url!r} names no bucket: use s3://bucket/prefix")
        return S3Storage(
            url.netloc,
            url.path,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            presign_expiry_s=settings.presign_expiry_s,
        )
    raise StorageError(f"unsupported storage URL {settings.storage_url!r}: use file:///abs/dir or s3://bucket/prefix")
