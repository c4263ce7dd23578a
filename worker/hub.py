"""The Hugging Face hub, offline-aware: a worker with no route to the hub (or with
HF_HUB_OFFLINE set) uses the local cache only and fails a job within seconds,
never after half a minute of retries.

`lookup` asks the hub about a repo with a short timeout before any download: an
unknown id raises at once; an unreachable hub means "work from the cache".
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

LOOKUP_TIMEOUT_S = 5.0


def offline_configured() -> bool:
    """HF_HUB_OFFLINE, read now: huggingface_hub reads it only once, at import."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def lookup(repo_type: str, repo_id: str, log: logging.Logger) -> bool:
    """Check that `repo_id` (a "model" or "dataset") exists. Returns True when the
    hub cannot be reached, so the caller should load from the local cache only.
    Raises RepositoryNotFoundError / RevisionNotFoundError for an unknown id."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if offline_configured():
        return True
    info = huggingface_hub.model_info if repo_type == "model" else huggingface_hub.dataset_info
    try:
        info(repo_id, timeout=LOOKUP_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError):  # gated repos included
        raise
    except Exception as exc:  # no network, DNS, timeout, 5xx: a cached copy may still do
        log.warning("%s %s: the hub is unreachable (%s); using the local cache", repo_type, repo_id, exc)
        return True
    return False


def load_error(what: str, why: str, exc: Exception) -> str:
    """One message shape for every hub failure: what, why, and the library's first line."""
    detail = (str(exc).strip().splitlines() or [""])[0]
    return f"{what} could not be loaded from the Hugging Face hub ({why}): {type(exc).__name__}: {detail}"


@contextmanager
def offline_mode(offline: bool):
    """Run huggingface_hub and datasets in offline mode (cache only) inside the block."""
    import datasets.config
    import huggingface_hub.constants

    modules = [huggingface_hub.constants, datasets.config]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    try:
        for m in modules:
            m.HF_HUB_OFFLINE = offline or m.HF_HUB_OFFLINE
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value
