"""Model weights are loaded from safetensors only.

A pickled weights file (`.bin`, `.pt`, `.ckpt`) runs code when it is read, and the
models here come from users (DIFFQUEUE_MODELS_DIR), the hub and other jobs. So every
`from_pretrained` and hub download passes `use_safetensors=True`, which makes
diffusers and transformers refuse a component that has only pickled weights, and
`raise_if_refused` turns that refusal into a job error that names the model and says why.
"""
from __future__ import annotations

from pathlib import Path

from shared.errors import UnsafeWeights

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def pickled_weights(folder: Path) -> list[str]:
    """Pickled weight files under `folder` (relative paths) in sub-folders that hold
    no safetensors file: the components that cannot be loaded safely."""
    return [
        path.relative_to(folder).as_posix()
        for path in sorted(Path(folder).rglob("*"))
        if path.suffix in PICKLE_SUFFIXES and path.is_file() and not any(path.parent.glob("*.safetensors"))
    ]


def raise_if_refused(what: str, source: str | Path | None, exc: Exception) -> None:
    """Raise UnsafeWeights for `what` ("model acme/x") when `exc` is a loader refusing
    it for want of safetensors weights; return when the load failed for another
    reason. `source` is the local folder, if any, whose pickled files the message names."""
    detail = (str(exc).strip().splitlines() or [""])[0]
    if not isinstance(exc, OSError) or "safetensors" not in detail:
        return
    files = pickled_weights(Path(source)) if source is not None and Path(source).is_dir() else []
    found = f"its weights are pickled ({', '.join(files)})" if files else f"it has no safetensors weights ({detail})"
    raise UnsafeWeights(
        f"{what}: {found}, and only safetensors weights are loaded, since a pickle can run code when it is read. "
        "Save the model again with save_pretrained(safe_serialization=True)."
    ) from exc
