"""Training checkpoints in the job's own storage, written so a crash never loses the
last complete one, and read without unpickling anything.

One safetensors file per checkpoint, `checkpoints/step-000500.safetensors`. The
storage write is atomic (a local temp file renamed in; one S3 PUT), and the
artifact row is recorded only after it, so every listed checkpoint is complete.
Older ones are deleted only after the new one is listed. A checkpoint holds the
spec and the step with the states.

Why not `torch.save`: a checkpoint is job data, and a worker that loads a pickle
runs whatever the pickle says. Even `weights_only=True` is an unpickler with an
allowlist. safetensors is tensors plus a JSON header and nothing that executes.
The nested state (model, EMA, optimizer, lr schedule, grad scaler, RNG, spec,
step, losses) is split into its tensors, keyed by their path in it
(`optimizer/state/0/exp_avg`), and a JSON skeleton of everything else, kept in
the file's metadata with `{"$tensor": path}` where a tensor was. The skeleton
keeps what JSON alone would lose (tuples, non-string dict keys), so the state
read back is the state written, and a resumed run is bit-identical.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worker.context import JobContext

PREFIX = "checkpoints/"
SUFFIX = ".safetensors"
FORMAT = "diffqueue-checkpoint-1"  # metadata["format_version"]; bump when the skeleton's encoding changes
_NAME = re.compile(r"step-(\d+)\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}step-{step:06d}{SUFFIX}"


def listed(ctx: JobContext) -> list[str]:
    """This job's complete checkpoints, oldest first. Anything else under checkpoints/
    (a `.pt` from an older version, a planted file) is never a candidate."""
    names = [n for n in ctx.artifact_names(PREFIX) if _NAME.search(n)]
    return sorted(names, key=lambda n: int(_NAME.search(n).group(1)))


# ------------------------------------------------------- the file format
def flatten(state) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors by path, JSON skeleton) of a nested state of dicts, lists, tuples,
    tensors and JSON scalars. Anything else is refused rather than pickled."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, where: str):
        if isinstance(obj, torch.Tensor):
            if where in tensors:
                raise ValueError(f"checkpoint: two tensors at the path {where!r}")
            tensors[where] = obj.detach().cpu().contiguous()
            return {"$tensor": where}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in obj):
                return {k: walk(v, f"{where}/{k}" if where else k) for k, v in obj.items()}
            # Non-string keys (the optimizer's parameter numbers) would come back from JSON as strings.
            for k in obj:
                if not isinstance(k, (str, int, float, bool, type(None))):
                    raise TypeError(f"checkpoint: {where or 'state'} has a {type(k).__name__} key, not a JSON scalar")
            return {"$dict": [[k, walk(v, f"{where}/{k}" if where else str(k))] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{where}/{i}" if where else str(i)) for i, v in enumerate(obj)]
            return {"$tuple": items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (str, int, float, bool)):
            return obj
        raise TypeError(f"checkpoint: {where or 'state'} is a {type(obj).__name__}; only tensors and JSON values "
                        "are stored")

    return tensors, walk(state, "")


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    """The inverse of flatten. Raises KeyError/ValueError on a skeleton that does
    not match the tensors: the caller treats the file as unreadable."""
    unused = set(tensors)

    def walk(obj):
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if set(obj) == {"$tensor"}:
            unused.discard(obj["$tensor"])
            return tensors[obj["$tensor"]]
        if set(obj) == {"$tuple"}:
            return tuple(walk(v) for v in obj["$tuple"])
        if set(obj) == {"$dict"}:
            return {k: walk(v) for k, v in obj["$dict"]}
        return {k: walk(v) for k, v in obj.items()}

    state = walk(skeleton)
    if unused:
        raise ValueError(f"{len(unused)} tensors that the skeleton does not mention, e.g. {sorted(unused)[0]!r}")
    return state


def write(path: Path, state: dict) -> None:
    tensors, skeleton = flatten(state)
    save_file(tensors, path, metadata={"format_version": FORMAT, "state": json.dumps(skeleton)})


def read(path: Path) -> dict:
    """A checkpoint file's state, through safetensors only: no unpickling."""
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format_version") != FORMAT:
            raise ValueError(f"format_version {metadata.get('format_version')!r}, expected {FORMAT!r}")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    state = unflatten(json.loads(metadata["state"]), tensors)
    if not isinstance(state, dict):
        raise ValueError(f"the state is a {type(state).__name__}, not a dict")
    return state


# ------------------------------------------------- in the job's storage
def save(ctx: JobContext, step: int, state: dict, keep: int) -> None:
    tmp = ctx.workdir / f"checkpoint{SUFFIX}"
    write(tmp, state)
    ctx.failpoint("checkpoint.writing", step)
    ctx.write_file(checkpoint_name(step), tmp, "application/octet-stream", {"step": step})
    tmp.unlink()
    ctx.failpoint("checkpoint.published", step)
    for old in listed(ctx)[:-keep]:
        ctx.delete_artifact(old)


def load_latest(ctx: JobContext, spec_params: dict, log: logging.Logger) -> dict | None:
    """The newest readable checkpoint made with the same spec, or None."""
    for name in sorted(set(ctx.artifact_names(PREFIX)) - set(listed(ctx))):
        # Say so, rather than resume silently from scratch (a `.pt` of an older version).
        log.warning("%s is not a step-N%s checkpoint; it is never loaded", name, SUFFIX)
    for name in reversed(listed(ctx)):
        try:
            state = read(ctx.download_artifact(name))
        except Exception as exc:  # unreadable: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s: %s); trying an older one", name, type(exc).__name__, exc)
            continue
        if state.get("spec") != spec_params:
            log.warning("checkpoint %s was made with other params; not resuming from it", name)
            continue
        return state
    return None
