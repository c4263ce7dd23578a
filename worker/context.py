"""What a runner gets: progress, artifacts, cancellation, model resolution, logger, device.

Runners never import Celery; everything they need from the service comes through here.
"""
from __future__ import annotations

import io
import json
import logging
import mimetypes
import shutil
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import select

from shared import jobs, model_refs
from shared.config import Settings
from shared.db import with_reconnect
from shared.errors import JobCancelled, LeaseLost, ModelNotFound, WorkerShuttingDown
from shared.models import Artifact, Job, JobStatus
from shared.storage import Storage, file_digest, job_key
from shared.uploads import UploadInfo, download_upload, find_upload
from worker import failpoints, hub, weights



def artifact_kind(name: str, content_type: str) -> str:
    if name.startswith("model/"):
        return "model"
    if name.startswith("checkpoints/"):
        return "checkpoint"
    if content_type.startswith("image/"):
        return "image"
    return "file"


class JobContext:
    def __init__(
        self,
        settings: Settings,
        sessions,
        storage: Storage,
        job_id: str,
        token: int,
        logger: logging.Logger,
        stopping: threading.Event | None = None,
        pipelines=None,
    ):
        self.settings = settings
        self.stopping = stopping or threading.Event()
        # The worker's warm Stable Diffusion pipelines (worker/sd.py PipelineCache).
        self.pipelines = pipelines
        self.sessions = sessions
        self.storage = storage
        self.job_id = job_id
        self.token = token
        self.log = logger
        self.workdir = Path(tempfile.mkdtemp(prefix=f"diffqueue-{job_id}-"))
        self._last_progress_write = 0.0
        self._last_cancel_check = 0.0
        self._phase: str | None = None
        self._failpoints = failpoints.parse(settings.failpoints)
        # Set by the heartbeat when the lease could not be renewed: another attempt owns the job.
        self.lease_lost = threading.Event()
        # What the executor adds to the job's result whatever the runner returns: warnings
        # (a list) and notes (keys of their own), such as a model id that was an alias.
        self.warnings: list[str] = []
        self.notes: dict = {}

    def _db(self, fn):
        """A write of this running job (or its cancel check): once more if the database
        dropped the connection mid-way, so a blip the pool recovers from fails no job."""
        return with_reconnect(self.sessions, fn, self.log)

    # ------------------------------------------------------------- progress
    def progress(self, step: int, total: int | None, message: str | None = None, phase: str | None = None) -> None:
        """Report progress; DB writes are throttled except for a new phase and the last step."""
        new_phase = phase is not None and phase != self._phase
        if new_phase:
            self._phase = phase
        now = time.monotonic()
        due = now - self._last_progress_write >= self.settings.progress_interval_s
        if not (due or new_phase or step == total):
            return
        self._last_progress_write = now
        if not self._db(lambda session: jobs.report_progress(session, self.job_id, self.token, step, total, message,
                                                             new_phase, self.settings.webhook_progress_interval_s)):
            raise LeaseLost(f"job {self.job_id}: attempt {self.token} no longer owns the job")

    def check_cancelled(self) -> None:
        """Call at every step boundary. Raises WorkerShuttingDown when the worker is
        stopping, and JobCancelled once a cancel was requested (the DB is read at
        most every `cancel_check_interval_s`)."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id}: attempt {self.token} lost its lease")
        if self.stopping.is_set():
            raise WorkerShuttingDown(f"job {self.job_id}: worker is shutting down")
        now = time.monotonic()
        if now - self._last_cancel_check < self.settings.cancel_check_interval_s:
            return
        self._last_cancel_check = now
        if self._db(lambda session: jobs.cancel_requested(session, self.job_id)):
            raise JobCancelled(f"job {self.job_id} cancelled")

    def failpoint(self, name: str, step: int | None = None) -> None:
        """A place where a test may inject a fault (see worker/failpoints.py)."""
        if self._failpoints:
            failpoints.hit(self._failpoints, name, step, self.log)

    # ------------------------------------------------------------ artifacts
    def write_file(self, name: str, path: Path, content_type: str | None = None, meta: dict | None = None) -> None:
        content_type = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        size, sha = file_digest(path)
        self.storage.put_file(job_key(self.job_id, name), path, content_type)
        ok = self._db(lambda session: jobs.record_artifact(
            session, self.job_id, self.token, name, artifact_kind(name, content_type), content_type, size, sha, meta))
        if not ok:
            raise LeaseLost(f"job {self.job_id}: attempt {self.token} no longer owns the job")

    def write_bytes(self, name: str, data: bytes, content_type: str | None = None, meta: dict | None = None) -> None:
        path = self.workdir / "out" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.write_file(name, path, content_type, meta)

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2).encode(), "application/json")

    def write_image(self, name: str, image, meta: dict | None = None) -> None:
        """Save a PIL image as PNG, with `meta` as PNG text chunks too."""
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for key, value in (meta or {}).items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info)
        self.write_bytes(name, buf.getvalue(), "image/png", meta)

    def artifact_names(self, prefix: str) -> list[str]:
        """This job's recorded artifacts under `prefix` (recorded = completely written)."""
        with self.sessions() as session:
            return list(session.scalars(
                select(Artifact.name).where(Artifact.job_id == self.job_id, Artifact.name.startswith(prefix))
                .order_by(Artifact.name)
            ))

    def download_artifact(self, name: str) -> Path:
        path = self.workdir / "in" / name
        self.storage.download(job_key(self.job_id, name), path)
        return path

    def fetch_job_artifact(self, ref: str) -> Path:
        """`job:<id>/<name>`: another job's artifact, downloaded into this job's workdir."""
        job_id, _, name = ref[len("job:"):].partition("/")
        with self.sessions() as session:
            found = session.scalar(select(Artifact.id).where(Artifact.job_id == job_id, Artifact.name == name))
        if found is None:
            raise ValueError(f"{ref}: job {job_id} has no artifact named {name!r}")
        path = self.workdir / "in" / job_id / name
        self.storage.download(job_key(job_id, name), path)
        return path

    def delete_artifact(self, name: str) -> None:
        """Row first, then the object: a listed artifact always exists in storage."""
        if not self._db(lambda session: jobs.delete_artifact(session, self.job_id, self.token, name)):
            raise LeaseLost(f"job {self.job_id}: attempt {self.token} no longer owns the job")
        self.storage.delete(job_key(self.job_id, name))

    def write_dir(self, prefix: str, folder: Path) -> None:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            self.write_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)

    # --------------------------------------------------------------- models
    def unalias(self, ref: str) -> str:
        """The hub id to load for `ref`: itself, or where a moved hub id went, which the
        job's result then records (`model_aliases` and a warning)."""
        source = model_refs.model_source(ref, self.settings)
        if source.alias_of is None:
            return ref
        self.notes.setdefault("model_aliases", {})[ref] = source.hub_id
        self.warnings.append(f"model {ref} is no longer on the Hugging Face hub; loaded its copy {source.hub_id}")
        self.log.warning("model %s is an alias: loading %s", ref, source.hub_id)
        return source.hub_id

    def model_source(self, ref: str) -> str:
        """Where `ref` resolves from, in this order: "job" (`job:<id>`), "local" (a folder
        under DIFFQUEUE_MODELS_DIR; a plain name is always local), "hub" (an `org/name`
        that is not a local folder: a Hugging Face hub id)."""
        return model_refs.model_source(ref, self.settings).kind

    def resolve_model(self, ref: str) -> Path:
        """A local diffusers folder for `ref`: a finished training job's model/, a folder
        under DIFFQUEUE_MODELS_DIR, or a hub repo in the Hugging Face cache (see model_source)."""
        source = model_refs.model_source(ref, self.settings)
        # Checked again here, before any load or download: a link out of the models dir,
        # or a hub id the allowlist no longer permits, fails the job.
        if source.refused:
            raise ModelNotFound(f"model {ref}: {source.refused}")
        if source.kind == "job":
            return self._job_model(ref[4:])
        if source.kind == "hub":
            return self._hub_model(self.unalias(ref))
        return source.path

    def _hub_model(self, repo_id: str) -> Path:
        """A DDPMPipeline repo from the Hugging Face hub, through the normal HF cache.
        It fails within seconds, never hangs, when the hub is unreachable or the id
        unknown: HF_HUB_OFFLINE is honoured, and a look-up with a short timeout comes
        before any download (a cached copy is used when the hub cannot be reached).
        Only the pipeline's own files are fetched (safetensors weights only): no custom
        pipeline, no remote code."""
        from diffusers import DDPMPipeline

        def failed(exc: Exception) -> ModelNotFound:
            return ModelNotFound(hub.load_error(f"model {repo_id}", "offline or unknown id", exc))

        try:
            offline = hub.lookup("model", repo_id, self.log)
        except Exception as exc:
            raise failed(exc) from exc
        try:
            # use_safetensors: no pickled .bin is ever downloaded, so none can be loaded later.
            return Path(DDPMPipeline.download(repo_id, local_files_only=offline, trust_remote_code=False,
                                              use_safetensors=True))
        except Exception as exc:
            weights.raise_if_refused(f"model {repo_id}", None, exc)
            raise failed(exc) from exc

    def _job_model(self, source_id: str) -> Path:
        with self.sessions() as session:
            job = session.get(Job, source_id)
            if job is None:
                raise ModelNotFound(f"model job:{source_id}: no such job")
            if job.status != JobStatus.SUCCEEDED.value:
                raise ModelNotFound(f"model job:{source_id}: that job is {job.status}, not succeeded")
            files = [(a.name, a.sha256) for a in job.artifacts if a.name.startswith("model/")]
        if not files:
            raise ModelNotFound(f"model job:{source_id}: that job produced no model/ artifacts")
        # Cached per source job and content: a finished job's model never changes.
        digest = sorted(sha for _, sha in files)[0][:12]
        dest = Path(self.settings.cache_dir) / "job-models" / f"{source_id}-{digest}"
        if not (dest / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
            for name, _ in files:
                self.storage.download(job_key(source_id, name), tmp / name[len("model/"):])
            (tmp / ".complete").touch()
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(tmp), dest)
        return dest

    # -------------------------------------------------------------- uploads
    def fetch_upload(self, ref: str, expected_kind: str) -> tuple[Path, UploadInfo]:
        """Download `upload:<id>`, which must be an upload of `expected_kind`
        ("dataset", "image" or "prompts"), into this job's workdir; the bytes are
        checked against the row's sha256. UploadNotFound names the ref otherwise."""
        with self.sessions() as session:
            info = find_upload(session, ref, expected_kind)
        return download_upload(self.storage, info, self.workdir / "uploads"), info

    @property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
