"""The worker checks model and dataset references again before any load or download:
a job that passed its submit (under other settings, or before a link appeared in the
models dir) fails with the reason, and the hub is never asked."""
from __future__ import annotations

from dataclasses import replace

import pytest

from shared.errors import ModelNotFound
from shared.specs import validate_params


@pytest.fixture
def no_hub(monkeypatch):
    """A look-up on the hub fails the test: the worker asks it before any download, so
    a refusal must come first. (diffusers binds snapshot_download at its import; a
    patch of that would outlive this test.)"""
    from worker import hub

    def asked(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    monkeypatch.setattr(hub, "lookup", asked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def escape(sqlite_settings, tmp_path):
    """`escape` under the models dir: a link to a model folder outside it."""
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    sqlite_settings.models_dir.mkdir(parents=True, exist_ok=True)
    (sqlite_settings.models_dir / "escape").symlink_to(outside)
    return "escape"


@pytest.fixture
def restricted(sqlite_settings):
    return replace(sqlite_settings, hub_models_allow="acme/*")


def test_sampling_from_a_link_out_of_the_models_dir_fails(run_inline, escape, no_hub):
    job = run_inline("ddpm.sample", {"model": escape, "num_images": 1, "steps": 1})
    assert job.status == "failed"
    assert "leads out of it" in job.error and "escape" in job.error
    assert job.artifacts == []


def test_sampling_from_a_hub_id_off_the_allowlist_fails(run_inline, restricted, no_hub):
    job = run_inline("ddpm.sample", {"model": "evil/ddpm", "num_images": 1, "steps": 1}, settings=restricted)
    assert job.status == "failed"
    assert "'evil/ddpm' is not allowed" in job.error and "acme/*" in job.error


def test_training_on_a_hub_dataset_off_the_allowlist_fails(run_inline, restricted, no_hub):
    job = run_inline("ddpm.train", {"dataset": "hf:evil/set", "max_steps": 1}, settings=restricted)
    assert job.status == "failed"
    assert "hub dataset 'evil/set' is not allowed" in job.error


def test_stable_diffusion_sources_are_checked(sqlite_settings, restricted, escape, no_hub):
    """worker/sd.py resolves model and vae itself: the same refusals, before any load."""
    from worker.sd import _source

    with pytest.raises(ModelNotFound, match="leads out of it"):
        _source(escape, sqlite_settings)
    with pytest.raises(ModelNotFound, match="'evil/sd' is not allowed"):
        _source("evil/sd", restricted)
    inside = sqlite_settings.models_dir / "sd-local"
    inside.mkdir()
    assert _source("sd-local", sqlite_settings) == (str(inside.resolve()), True)


def test_a_spec_that_passed_submit_is_what_the_worker_refuses(restricted, escape):
    """The refusals above are the worker's own: these params pass the spec (the
    worker's first check), so only the reference rules stop them."""
    validate_params("ddpm.sample", {"model": escape})
    validate_params("ddpm.sample", {"model": "evil/ddpm"})
    validate_params("ddpm.train", {"dataset": "hf:evil/set", "max_steps": 1})
