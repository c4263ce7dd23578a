"""Job specs: defaults from presets, bounds, NaN/Infinity, cross-field checks, schema."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from shared.config import Settings
from shared.errors import SpecError, UnknownKind
from shared.specs import DDPM_PRESETS, kinds_schema, validate_params


def spec_error(kind: str, params) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_params(kind, params)
    return info.value


# ------------------------------------------------------------------ defaults
def test_train_empty_params_take_the_tiny_preset():
    spec = validate_params("ddpm.train", {}).model_dump()
    assert spec["preset"] == "tiny"
    for name, value in DDPM_PRESETS["tiny"].items():
        assert spec[name] == value, name
    assert spec["max_steps"] == 300 and spec["image_size"] == 16 and spec["block_out_channels"] == [32, 64]
    assert spec["seed"] == 0 and spec["dataset"] == "digits"


def test_train_digits_preset_fills_its_values():
    spec = validate_params("ddpm.train", {"preset": "digits"}).model_dump()
    for name, value in DDPM_PRESETS["digits"].items():
        assert spec[name] == value, name
    assert spec["image_size"] == 16 and spec["attention_levels"] == [2] and spec["prediction_type"] == "v_prediction"


def test_explicit_params_override_the_preset():
    spec = validate_params("ddpm.train", {"preset": "digits", "max_steps": 7, "learning_rate": 0.01}).model_dump()
    assert spec["max_steps"] == 7
    assert spec["learning_rate"] == 0.01
    assert spec["image_size"] == DDPM_PRESETS["digits"]["image_size"]  # the rest still from the preset


def test_dump_is_json_serialisable():
    dumped = validate_params("ddpm.train", {"max_steps": 3}).model_dump(mode="json")
    assert json.loads(json.dumps(dumped)) == dumped


# ------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ({"max_steps": 0}, "max_steps", "greater than or equal to 1"),
        ({"max_steps": 10_000_001}, "max_steps", "less than or equal to 10000000"),
        ({"learning_rate": 0}, "learning_rate", "greater than 0"),
        ({"batch_size": 5000}, "batch_size", "less than or equal to 4096"),
        ({"image_size": 20}, "image_size", "multiple of 8"),
        ({"block_out_channels": [30, 64]}, "block_out_channels", "multiple of 8"),
        ({"preset": "huge"}, "preset", "tiny"),
        ({"max_steps": "many"}, "max_steps", "integer"),
    ],
)
def test_bounds_name_the_field_and_the_bound(params, field, fragment):
    err = spec_error("ddpm.train", params)
    assert field in err.fields, err.fields
    assert fragment in err.fields[field]
    assert field in str(err)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"beta_end": float("-inf")}, "beta_end"),
        ({"block_out_channels": [32, float("nan")]}, "block_out_channels.1"),
        ({"block_out_channels": [float("inf"), 64]}, "block_out_channels.0"),
    ],
)
def test_nan_and_infinity_are_refused(params, field):
    err = spec_error("ddpm.train", params)
    assert field in err.fields, err.fields
    assert "NaN and Infinity" in err.fields[field]


def test_unknown_field_is_refused():
    err = spec_error("ddpm.train", {"max_step": 10})
    assert "max_step" in err.fields
    assert "not permitted" in err.fields["max_step"].lower()


def test_unknown_kind():
    with pytest.raises(UnknownKind) as info:
        validate_params("ddpm.dream", {})
    assert "kind" in info.value.fields
    assert "ddpm.train" in str(info.value)  # lists the known kinds


def test_params_must_be_an_object():
    err = spec_error("ddpm.train", [1, 2])
    assert "params" in err.fields


# ------------------------------------------------------------------ cross-field
def test_image_size_must_divide_by_the_levels():
    # Five levels need a factor of 16; 24 is a multiple of 8 but not of 16.
    err = spec_error("ddpm.train", {"image_size": 24, "block_out_channels": [32, 64, 128, 256, 512]})
    assert "image_size" in err.fields, err.fields
    assert "divisible by 16" in err.fields["image_size"]


def test_beta_end_must_exceed_beta_start():
    err = spec_error("ddpm.train", {"beta_start": 0.02, "beta_end": 0.01})
    assert "beta_end" in err.fields, err.fields
    assert "beta_start" in err.fields["beta_end"]
    err = spec_error("ddpm.train", {"beta_start": 0.01, "beta_end": 0.01})
    assert "beta_end" in err.fields


def test_attention_level_out_of_range():
    err = spec_error("ddpm.train", {"attention_levels": [2]})  # tiny has two levels: 0 and 1
    assert "attention_levels" in err.fields, err.fields
    assert "[2]" in err.fields["attention_levels"] and "out of range" in err.fields["attention_levels"]
    assert validate_params("ddpm.train", {"attention_levels": [1]}).attention_levels == [1]


# ------------------------------------------------------------------ ddpm.sample
@pytest.mark.parametrize("model", ["../x", "a/b/c", "a/../b", "a/", "/a", "", "job:xyz", "job:" + "A" * 32, ".hidden"])
def test_sample_model_pattern_rejects(model):
    err = spec_error("ddpm.sample", {"model": model})
    assert "model" in err.fields, err.fields


@pytest.mark.parametrize("model", ["job:" + "0123456789abcdef" * 2, "my-model", "m.v2_final", "google/ddpm-celebahq-256"])
def test_sample_model_pattern_accepts(model):
    spec = validate_params("ddpm.sample", {"model": model})
    assert spec.model == model
    assert spec.num_images == 8 and spec.scheduler == "ddim"


def test_sample_model_is_required():
    err = spec_error("ddpm.sample", {})
    assert "model" in err.fields


def test_sample_class_label_list_must_match_num_images():
    err = spec_error("ddpm.sample", {"model": "m", "num_images": 3, "class_label": [1, 2]})
    assert "class_label" in err.fields, err.fields
    assert "num_images" in err.fields["class_label"]
    ok = validate_params("ddpm.sample", {"model": "m", "num_images": 2, "class_label": [1, 2]})
    assert ok.class_label == [1, 2]
    assert validate_params("ddpm.sample", {"model": "m", "class_label": 4}).class_label == 4


def test_sample_class_label_range():
    err = spec_error("ddpm.sample", {"model": "m", "class_label": 1000})
    assert "class_label" in err.fields


# ------------------------------------------------------------------ schema
def test_kinds_schema(tmp_path):
    kinds = {k["kind"]: k for k in kinds_schema()}
    assert set(kinds) == {"ddpm.train", "ddpm.sample", "ddpm.schedule_plot", "sd.txt2img", "sd.img2img", "sd.sweep",
                          "noop"}
    # What a service lists: noop only where DIFFQUEUE_ENABLE_NOOP is on.
    settings = Settings.embedded(tmp_path)
    assert {k["kind"] for k in kinds_schema(settings)} == set(kinds) - {"noop"}
    assert {k["kind"] for k in kinds_schema(replace(settings, enable_noop=True))} == set(kinds)
    train, sample = kinds["ddpm.train"], kinds["ddpm.sample"]
    json.dumps(kinds)  # all of it serialisable

    props = train["schema"]["properties"]
    assert {"max_steps", "image_size", "block_out_channels", "preset", "learning_rate"} <= set(props)
    assert props["preset"]["default"] == "tiny"
    assert props["seed"]["default"] == 0
    assert {"type": "integer", "minimum": 1, "maximum": 10_000_000} in props["max_steps"]["anyOf"]
    assert train["schema"].get("additionalProperties") is False
    assert set(train["presets"]) == {"tiny", "digits", "fashion-32", "book-64", "guide-128"}
    assert train["presets"]["tiny"]["params"]["max_steps"] == 300
    assert train["presets"]["digits"]["help"]

    sprops = sample["schema"]["properties"]
    assert sample["schema"]["required"] == ["model"]
    assert sprops["num_images"]["default"] == 8
    assert sprops["scheduler"]["default"] == "ddim"
    assert "presets" not in sample


def test_main_fields_name_real_params_once():
    from shared.specs import KINDS, kinds_schema

    for kind in KINDS.values():
        assert set(kind.main_fields) <= set(kind.spec.model_fields), kind.name
        assert len(set(kind.main_fields)) == len(kind.main_fields), kind.name
        if kind.presets:
            assert kind.main_fields[0] == "preset", kind.name  # choosing one fills in the rest
    assert {k["kind"]: k["main_fields"] for k in kinds_schema()}["ddpm.sample"][0] == "model"
