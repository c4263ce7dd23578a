"""Where a job's model and dataset references may lead.

- `job:<id>`: a finished training job's model (whose owner check is shared/auth's).
- `name` or `org/name` that is a folder under DIFFQUEUE_MODELS_DIR: it must stay inside
  that dir once symlinks are resolved. A link in the models dir to /etc, or to a folder
  the service was never meant to serve, is refused rather than followed. A plain `name`
  with no such folder is refused too: it is no hub id either (a typo such as `tyni-sd`
  is a 400 at submit, not a failure on the worker minutes later).
- Any other `org/name` is a Hugging Face hub id, and must match one of the
  comma-separated fnmatch patterns of DIFFQUEUE_HUB_MODELS_ALLOW (`*`: any). A hub id
  that moved (`HUB_ALIASES`: `runwayml/stable-diffusion-v1-5`, deleted from the hub in
  2024) resolves to where it went; the allowlist is checked against that id, the one
  downloaded, and the job's result names the alias.
- Hub datasets (`hf:<name>[:split]`) follow the same list: both are downloads from the
  hub onto the workers, so one setting says what the service may fetch.

The API checks at submit, so a refusal names the field and creates nothing; workers
check again before any load or download, since the settings or the models dir may
have changed while the job waited.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.specs import KINDS


# Hub ids that are gone from the hub, and the copies that replaced them.
HUB_ALIASES = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}


def allow_patterns(allow: str) -> list[str]:
    return [p.strip() for p in allow.split(",") if p.strip()]


def hub_refusal(repo_id: str, allow: str, what: str = "hub id") -> str | None:
    """Why the hub repo `repo_id` may not be fetched under the allowlist `allow`, or None."""
    patterns = allow_patterns(allow)
    # Case-sensitive: an allowlist written `google/*` must not be widened by `GOOGLE/x`.
    if any(fnmatch.fnmatchcase(repo_id, p) for p in patterns):
        return None
    listed = ", ".join(patterns) if patterns else "no hub ids (it is empty)"
    return f"{what} {repo_id!r} is not allowed: DIFFQUEUE_HUB_MODELS_ALLOW permits {listed}"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "job", "local" or "hub"
    path: Path | None = None  # local: the folder, symlinks resolved
    refused: str | None = None  # why the reference may not be used
    hub_id: str | None = None  # hub: the id to load (an alias resolved)
    alias_of: str | None = None  # hub: the id asked for, when it was an alias


def model_source(ref: str, settings: Settings) -> ModelSource:
    """Where `ref` resolves from, in this order: a `job:<id>`; a folder under the models
    dir (a plain name is always local); else a hub id. `refused` says why it may not be used."""
    if ref.startswith("job:"):
        return ModelSource("job")
    # The specs' patterns already refuse these; the worker may meet rows older than them.
    if not ref or ref.startswith("/") or "\\" in ref or any(p in ("", ".", "..") for p in ref.split("/")):
        return ModelSource("local", refused=f"{ref!r} must be a folder name under DIFFQUEUE_MODELS_DIR or a hub "
                                            "id org/name: no absolute path, no empty, . or .. parts")
    root = settings.models_dir
    if root is not None:
        candidate = Path(root) / ref
        if candidate.is_symlink() or candidate.exists():
            resolved = candidate.resolve()
            if Path(root).resolve() not in resolved.parents:
                return ModelSource("local", refused=f"folder {ref!r} in DIFFQUEUE_MODELS_DIR is a link that leads "
                                                    "out of it; only folders inside it can be loaded")
            if not resolved.is_dir():
                return ModelSource("local", refused=f"{ref!r} in DIFFQUEUE_MODELS_DIR is not a folder")
            return ModelSource("local", path=resolved)
    if "/" not in ref:
        where = "DIFFQUEUE_MODELS_DIR" if root is not None else "DIFFQUEUE_MODELS_DIR, which is not set"
        return ModelSource("local", refused=f"{ref!r} is not a folder under {where} (GET /api/v1/models lists "
                                            "the models there), and not a hub id (org/name)")
    hub_id = HUB_ALIASES.get(ref, ref)
    return ModelSource("hub", refused=hub_refusal(hub_id, settings.hub_models_allow), hub_id=hub_id,
                       alias_of=ref if hub_id != ref else None)


def hub_dataset_name(ref: str) -> str | None:
    """`name` of an `hf:<name>[:split]` dataset reference; None for other datasets."""
    return ref[3:].partition(":")[0] if ref.startswith("hf:") else None


def ref_problems(kind: str, values: dict[str, Any], settings: Settings) -> dict[str, str]:
    """{field: why} for each reference in a job's validated params that may not be used.
    The spec marks the fields: `json_schema_extra={"hub_ref": "model" | "dataset"}`."""
    problems = {}
    for name, field in KINDS[kind].spec.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        ref = values.get(name)
        if not isinstance(ref, str):
            continue
        why = None
        if extra.get("hub_ref") == "model":
            why = model_source(ref, settings).refused
        elif extra.get("hub_ref") == "dataset" and (dataset := hub_dataset_name(ref)) is not None:
            why = hub_refusal(dataset, settings.hub_models_allow, "hub dataset")
        if why:
            problems[name] = why
    return problems
