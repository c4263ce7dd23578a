"""What a failed job shows its owner: the error and traceback name no server path
(the models, cache and storage folders, the Python installation, diffqueue's own
source), and still say where it failed."""
from __future__ import annotations

import io
import json
import site
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from worker.executor import failure
from worker.server_paths import hide_server_paths, server_roots

REPO = Path(__file__).resolve().parents[2]


def spellings(*paths) -> set[str]:
    return {s for p in paths for s in (str(p), str(Path(p).resolve()))}


@pytest.mark.parametrize("kind, params", [
    ("ddpm.sample", {"model": "no-such-model", "num_images": 1, "steps": 1}),
    ("sd.txt2img", {"model": "no-such-model", "prompts": ["a cat"], "steps": 1, "width": 32, "height": 32}),
])
def test_a_missing_model_folder_names_no_server_path(run_inline, sqlite_settings, kind, params):
    job = run_inline(kind, params)
    assert job.status == "failed"
    assert job.error.startswith("ModelNotFound: ") and "'no-such-model' is not a folder under" in job.error
    roots = spellings(sqlite_settings.models_dir, sqlite_settings.cache_dir, sqlite_settings.models_dir.parent,
                      sys.prefix, sys.base_prefix, *site.getsitepackages(), REPO)
    for root in roots:
        assert root not in job.error and root not in job.traceback, root
    # Still a traceback that says where: diffqueue's frames by their path in the source.
    assert 'File "<diffqueue>/worker/executor.py"' in job.traceback
    assert job.traceback.rstrip().endswith(job.error)


def test_library_frames_are_shown_under_the_installation(sqlite_settings):
    from PIL import Image, UnidentifiedImageError

    def record(call) -> tuple[str, str]:
        try:
            call()
        except Exception as exc:
            _, _, error, tb = failure("0" * 32, exc, sqlite_settings)
            return error, tb
        raise AssertionError("did not raise")

    _, tb = record(lambda: Image.open(io.BytesIO(b"not an image")))  # raised in site-packages
    assert 'File "<site-packages>/PIL/Image.py"' in tb and UnidentifiedImageError.__name__ in tb
    _, tb = record(lambda: json.loads("{"))  # raised in the standard library
    assert f'File "<python>/lib/python{sys.version_info.major}.{sys.version_info.minor}/json/decoder.py"' in tb
    for root in spellings(sys.prefix, sys.base_prefix, *site.getsitepackages()):
        assert root not in tb


def test_storage_and_cache_paths_become_their_settings_names(sqlite_settings, tmp_path):
    settings = replace(sqlite_settings, cache_dir=tmp_path / "cache", storage_url=(tmp_path / "store").as_uri())
    roots = server_roots(settings)
    text = f"{tmp_path / 'cache'}/job-abc/model.safetensors and '{tmp_path / 'store'}/jobs/x/a.png'"
    assert hide_server_paths(text, roots) == \
        "DIFFQUEUE_CACHE_DIR/job-abc/model.safetensors and 'DIFFQUEUE_STORAGE_URL/jobs/x/a.png'"


@pytest.mark.parametrize("text, shown", [
    ("/srv/models/x is missing", "DIFFQUEUE_MODELS_DIR/x is missing"),
    ("under '/srv/models'.", "under 'DIFFQUEUE_MODELS_DIR'."),
    ("under DIFFQUEUE_MODELS_DIR (/srv/models) and not", "under DIFFQUEUE_MODELS_DIR and not"),
    ("/srv/models2/x and /srv/models.old", "/srv/models2/x and /srv/models.old"),  # other folders
    ("/backup/srv/models/x", "/backup/srv/models/x"),  # not at the start of a path
    ("/srv/app/.venv/lib/site-packages/torch/nn.py", "<site-packages>/torch/nn.py"),  # the longest root wins
    ("/srv/app/worker/sd.py", "<diffqueue>/worker/sd.py"),
])
def test_only_whole_roots_are_replaced(text, shown):
    roots = {"/srv/models": "DIFFQUEUE_MODELS_DIR", "/srv/app": "<diffqueue>",
             "/srv/app/.venv/lib/site-packages": "<site-packages>"}
    assert hide_server_paths(text, roots) == shown


def test_relative_roots_are_not_replaced(sqlite_settings):
    """A relative models dir would turn the word "models" in any message into the setting's name."""
    roots = server_roots(replace(sqlite_settings, models_dir=Path("models")))
    assert "models" not in roots and "DIFFQUEUE_MODELS_DIR" not in roots.values()
