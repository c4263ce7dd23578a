"""shared/model_refs.py: the hub allowlist and where a local model name may lead."""
from __future__ import annotations

from dataclasses import replace

import pytest

from shared.config import Settings
from shared.errors import SpecError
from shared.model_refs import hub_refusal, model_source, ref_problems


@pytest.mark.parametrize("allow, repo_id, allowed", [
    ("*", "anyone/anything", True),
    ("google/*", "google/ddpm-celebahq-256", True),
    ("google/*", "googlex/ddpm", False),
    ("google/*", "Google/ddpm", False),  # case-sensitive: a pattern is never widened
    (" google/ddpm-* , stabilityai/sd-vae-ft-ema ", "stabilityai/sd-vae-ft-ema", True),
    (" google/ddpm-* , stabilityai/sd-vae-ft-ema ", "stabilityai/sd-vae-ft-mse", False),
    ("", "google/ddpm", False),  # empty: no hub ids at all
    ("fashion_mnist", "fashion_mnist", True),
])
def test_hub_allowlist(allow, repo_id, allowed):
    refusal = hub_refusal(repo_id, allow)
    assert (refusal is None) == allowed
    if not allowed:
        assert repo_id in refusal and "DIFFQUEUE_HUB_MODELS_ALLOW" in refusal
        assert (allow.strip() or "it is empty").split(",")[0].strip() in refusal


@pytest.fixture
def settings(tmp_path) -> Settings:
    """A models dir with a model, a link inside it, links out of it, and a file."""
    models = tmp_path / "models"
    (models / "org" / "inside").mkdir(parents=True)
    outside = tmp_path / "outside" / "model"
    outside.mkdir(parents=True)
    (models / "out").symlink_to(outside)
    (models / "out-org").symlink_to(outside.parent)
    (models / "in").symlink_to(models / "org" / "inside")
    (models / "dangling").symlink_to(tmp_path / "gone")
    (models / "file").write_text("x")
    return replace(Settings.embedded(tmp_path / "data"), models_dir=models, hub_models_allow="google/*")


@pytest.mark.parametrize("ref, kind, where, refused", [
    ("job:" + "a" * 32, "job", None, None),
    ("org/inside", "local", "org/inside", None),
    ("in", "local", "org/inside", None),  # a link that stays inside: its target
    ("missing", "local", None, "is not a folder under DIFFQUEUE_MODELS_DIR"),  # and no hub id: refused
    ("out", "local", None, "leads out"),
    ("out-org/model", "local", None, "leads out"),
    ("dangling", "local", None, "leads out"),
    ("file", "local", None, "not a folder"),
    ("google/ddpm-cat", "hub", None, None),
    ("evil/model", "hub", None, "not allowed"),
    ("../x", "local", None, "no absolute path"),
    ("/etc", "local", None, "no absolute path"),
    ("org/../../x", "local", None, "no absolute path"),
    ("org\\x", "local", None, "no absolute path"),
])
def test_model_source(settings, ref, kind, where, refused):
    source = model_source(ref, settings)
    assert source.kind == kind
    assert source.path == (None if where is None else (settings.models_dir / where).resolve())
    assert (source.refused is None) == (refused is None), source.refused
    if refused:
        assert refused in source.refused and repr(ref) in source.refused


def test_without_a_models_dir_names_are_refused_and_hub_ids_checked(settings):
    bare = replace(settings, models_dir=None)
    assert "DIFFQUEUE_MODELS_DIR, which is not set" in model_source("out", bare).refused
    assert "not allowed" in model_source("evil/model", bare).refused


def test_a_moved_hub_id_resolves_to_its_copy_and_the_allowlist_sees_the_copy(settings):
    old = "runwayml/stable-diffusion-v1-5"
    source = model_source(old, replace(settings, hub_models_allow="stable-diffusion-v1-5/*"))
    assert (source.kind, source.hub_id, source.alias_of, source.refused) == (
        "hub", "stable-diffusion-v1-5/stable-diffusion-v1-5", old, None)
    assert "not allowed" in model_source(old, replace(settings, hub_models_allow="runwayml/*")).refused
    assert model_source("google/ddpm-cat", settings).alias_of is None


def test_ref_problems_names_each_field(settings):
    values = {"model": "out", "vae": "evil/vae", "prompts": ["x"]}
    assert set(ref_problems("sd.txt2img", values, settings)) == {"model", "vae"}
    dataset = ref_problems("ddpm.train", {"dataset": "hf:evil/set:train"}, settings)
    assert "hub dataset 'evil/set' is not allowed" in dataset["dataset"]
    assert ref_problems("ddpm.train", {"dataset": "digits"}, settings) == {}


def test_the_door_sees_preset_filled_values(settings):
    """sd.txt2img's `guide` preset brings a hub VAE: refused under a list without it."""
    from shared import jobs
    from shared.db import make_engine, make_sessionmaker, upgrade

    upgrade(settings.database_url)
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        with pytest.raises(SpecError) as err:
            jobs.admit(session, settings, "sd.txt2img", {"model": "org/inside", "prompts": ["a"], "preset": "guide"})
        assert set(err.value.fields) == {"vae"} and "stabilityai/sd-vae-ft-ema" in err.value.fields["vae"]
        jobs.admit(session, settings, "sd.txt2img", {"model": "org/inside", "prompts": ["a"]})  # no error
