"""The models a job can name without downloading: diffusers folders under
DIFFQUEUE_MODELS_DIR, and the models that finished `ddpm.train` jobs produced.

Hub ids are not listed: any `org/name` the hub has can be named.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.auth import visible
from shared.models import Artifact, Job, JobStatus, User
from shared.specs import LOCAL_OR_HUB_MODEL

log = logging.getLogger(__name__)

MAX_JOB_MODELS = 100
MODEL_INDEX = "model_index.json"


def _local_model(root: Path, folder: Path) -> dict | None:
    """A listing entry for `folder` if it holds a diffusers pipeline that a spec can name."""
    name = folder.relative_to(root).as_posix()
    if not re.fullmatch(LOCAL_OR_HUB_MODEL, name):
        return None  # the specs would refuse this name (hidden folder, spaces...)
    if root.resolve() not in folder.resolve().parents:
        return None  # a link out of the models dir, which workers refuse to load
    try:
        pipeline = json.loads((folder / MODEL_INDEX).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("models dir: skipping %s: unreadable %s (%s)", folder, MODEL_INDEX, exc)
        return None
    return {"name": name, "ref": name, "pipeline": pipeline, "source": "local"}


def list_local_models(models_dir: Path | str | None) -> list[dict]:
    """Folders `<name>` and `<org>/<name>` under `models_dir` that hold a model_index.json,
    sorted by name. A missing or unset models_dir lists nothing."""
    if models_dir is None or not Path(models_dir).is_dir():
        return []
    root = Path(models_dir)
    found = []
    for top in sorted(p for p in root.iterdir() if p.is_dir()):
        if (top / MODEL_INDEX).is_file():
            found.append(_local_model(root, top))
            continue
        # Not a pipeline itself: an `org/` folder of pipelines, as hub ids are named.
        try:
            subs = sorted(p for p in top.iterdir() if p.is_dir() and (p / MODEL_INDEX).is_file())
        except OSError as exc:
            log.warning("models dir: skipping %s (%s)", top, exc)
            continue
        found.extend(_local_model(root, sub) for sub in subs)
    return [entry for entry in found if entry is not None]


def list_job_models(session: Session, limit: int = MAX_JOB_MODELS, viewer: User | None = None) -> list[dict]:
    """Succeeded `ddpm.train` jobs that wrote a model/ folder, newest first (those `viewer` may see)."""
    rows = session.scalars(
        visible(select(Job), Job, viewer)
        .where(
            Job.kind == "ddpm.train",
            Job.status == JobStatus.SUCCEEDED.value,
            Job.artifacts.any(Artifact.name.startswith("model/", autoescape=True)),
        )
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
    )
    return [
        {
            "name": f"ddpm.train {job.id[:8]} ({job.params.get('preset')} preset)",
            "ref": f"job:{job.id}",
            "pipeline": "DDPMPipeline",
            "source": "job",
            "job_id": job.id,
            "created_at": job.created_at.isoformat() if job.created_at else None,
        }
        for job in rows
    ]
