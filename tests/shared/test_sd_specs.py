"""Stable Diffusion job specs: defaults, presets, bounds, cross-field checks, schema."""
from __future__ import annotations

import json

import pytest

from shared.errors import SpecError
from shared.specs import (
    DEFAULT_GUIDANCE_SCALES,
    KINDS,
    SD_SWEEP_PRESETS,
    SD_TXT2IMG_PRESETS,
    kinds_schema,
    validate_params,
)

JOB_ID = "0123456789abcdef" * 2
UPLOAD = "upload:" + "ab" * 16
ROSE = {"prompts": ["a watercolor rose"]}
INIT = {**ROSE, "init_image": UPLOAD}


def spec_error(kind: str, params) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_params(kind, params)
    return info.value


def assert_names(err: SpecError, field: str, fragment: str) -> None:
    assert field in err.fields, err.fields
    assert fragment in err.fields[field], err.fields[field]
    assert field in str(err)


# ------------------------------------------------------------------ defaults
def test_txt2img_defaults():
    spec = validate_params("sd.txt2img", ROSE)
    assert spec.model_dump() == {
        "model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "variant": None, "torch_dtype": "auto", "vae": None,
        "scheduler": "pndm", "steps": 50, "width": 512, "height": 512, "seed": 0, "batch_size": 8,
        "preview_every": None, "compile": False, "vae_tiling": False,
        "prompts": ["a watercolor rose"], "prompts_upload": None, "negative_prompt": None,
        "num_images_per_prompt": 1, "guidance_scale": 7.5, "preset": "default",
    }
    assert spec.preview_interval == 6  # steps // 8
    assert KINDS["sd.txt2img"].queue == "gpu"


def test_img2img_defaults_follow_seeds_section_8():
    spec = validate_params("sd.img2img", INIT)
    assert (spec.guidance_scale, spec.seed, spec.strength) == (6.0, 193, 0.8)
    assert spec.init_image == UPLOAD and spec.steps == 50 and spec.scheduler == "pndm"
    assert KINDS["sd.img2img"].queue == "gpu"


def test_sweep_defaults_are_the_articles():
    spec = validate_params("sd.sweep", {"prompt": "a watercolor rose"})
    assert spec.guidance_scales == [0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0] == DEFAULT_GUIDANCE_SCALES
    assert spec.seeds == [193] and spec.steps_list is None and spec.steps == 50
    assert spec.preset == "article" and spec.negative_prompt is None
    assert KINDS["sd.sweep"].queue == "gpu"


def test_prompts_are_stripped_and_dump_is_json():
    spec = validate_params("sd.txt2img", {"prompts": ["  a rose \n"], "negative_prompt": ["blurry"]})
    assert spec.prompts == ["a rose"]
    dumped = spec.model_dump(mode="json")
    assert json.loads(json.dumps(dumped)) == dumped
    assert validate_params("sd.txt2img", dumped).model_dump(mode="json") == dumped  # a retry re-validates


@pytest.mark.parametrize("ref", [UPLOAD, f"job:{JOB_ID}/images/0000-00.png", f"job:{JOB_ID}/grid.png",
                                 f"job:{JOB_ID}/" + "x" * 512])
def test_init_image_accepts(ref):
    assert validate_params("sd.img2img", {**ROSE, "init_image": ref}).init_image == ref


@pytest.mark.parametrize("model", ["tiny-sd", "runwayml/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4"])
def test_model_accepts_local_names_and_hub_ids(model):
    assert validate_params("sd.txt2img", {**ROSE, "model": model, "vae": model}).model == model


# ------------------------------------------------------------------ presets
def test_txt2img_presets_fill_and_explicit_params_win():
    article = validate_params("sd.txt2img", {**ROSE, "preset": "article"})
    assert (article.scheduler, article.steps, article.guidance_scale, article.seed) == ("pndm", 64, 9.0, 193)
    assert article.preview_interval == 8
    loop = validate_params("sd.txt2img", {**ROSE, "preset": "loop", "seed": 7})
    assert (loop.width, loop.height, loop.steps, loop.guidance_scale, loop.seed) == (512, 512, 30, 7.5, 7)
    guide = validate_params("sd.txt2img", {**ROSE, "preset": "guide"})
    assert (guide.variant, guide.vae) == ("fp16", "stabilityai/sd-vae-ft-ema")
    assert validate_params("sd.txt2img", {**ROSE, "preset": "guide", "vae": None}).vae is None


def test_sweep_guide_preset():
    spec = validate_params("sd.sweep", {"prompt": "a rose", "preset": "guide"})
    assert spec.guidance_scales == [1.0, 2.0, 4.0, 12.0] and spec.seeds == [0]


def test_unknown_preset():
    assert_names(spec_error("sd.txt2img", {**ROSE, "preset": "fast"}), "preset", "article")


# ------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    "kind, params, field, fragment",
    [
        ("sd.txt2img", {**ROSE, "steps": 0}, "steps", "greater than or equal to 1"),
        ("sd.txt2img", {**ROSE, "steps": 501}, "steps", "less than or equal to 500"),
        ("sd.txt2img", {**ROSE, "width": 100}, "width", "multiple of 8"),
        ("sd.txt2img", {**ROSE, "height": 8}, "height", "greater than or equal to 16"),
        ("sd.txt2img", {**ROSE, "height": 2056}, "height", "less than or equal to 2048"),
        ("sd.txt2img", {**ROSE, "seed": 2**32}, "seed", "less than or equal to 4294967295"),
        ("sd.txt2img", {**ROSE, "batch_size": 65}, "batch_size", "less than or equal to 64"),
        ("sd.txt2img", {**ROSE, "preview_every": 0}, "preview_every", "greater than or equal to 1"),
        ("sd.txt2img", {**ROSE, "preview_every": 1, "steps": 500}, "preview_every", "use at least 3"),
        ("sd.txt2img", {**ROSE, "scheduler": "lms"}, "scheduler", "'euler_a'"),
        ("sd.txt2img", {**ROSE, "torch_dtype": "float64"}, "torch_dtype", "'bfloat16'"),
        ("sd.txt2img", {**ROSE, "variant": "fp16/../x"}, "variant", "pattern"),
        ("sd.txt2img", {**ROSE, "model": "job:" + JOB_ID}, "model", "pattern"),  # not a training job's DDPM
        ("sd.txt2img", {**ROSE, "model": "../etc"}, "model", "pattern"),
        ("sd.txt2img", {**ROSE, "vae": "a/b/c"}, "vae", "pattern"),
        ("sd.txt2img", {**ROSE, "guidance_scale": 50.5}, "guidance_scale", "less than or equal to 50"),
        ("sd.txt2img", {**ROSE, "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ("sd.txt2img", {**ROSE, "num_images_per_prompt": 17}, "num_images_per_prompt", "less than or equal to 16"),
        ("sd.txt2img", {"prompts": []}, "prompts", "at least 1 item"),
        ("sd.txt2img", {"prompts": ["a"] * 257}, "prompts", "at most 256 items"),
        ("sd.txt2img", {"prompts": ["a", "x" * 1001]}, "prompts.1", "at most 1000 characters"),
        ("sd.txt2img", {"prompts": ["a", "   "]}, "prompts.1", "at least 1 character"),
        ("sd.txt2img", {"prompts": "a rose"}, "prompts", "valid list"),
        ("sd.txt2img", {**ROSE, "negative_prompt": "x" * 1001}, "negative_prompt", "at most 1000 characters"),
        ("sd.txt2img", {**ROSE, "negative_prompt": ["x" * 1001]}, "negative_prompt.0", "at most 1000 characters"),
        ("sd.txt2img", {"prompts_upload": "upload:xyz"}, "prompts_upload", "pattern"),
        ("sd.txt2img", {**ROSE, "sampler": "pndm"}, "sampler", "not permitted"),
        ("sd.img2img", {**INIT, "strength": 0}, "strength", "greater than 0"),
        ("sd.img2img", {**INIT, "strength": 1.01}, "strength", "less than or equal to 1"),
        ("sd.sweep", {"prompt": ""}, "prompt", "at least 1 character"),
        ("sd.sweep", {"prompt": "x" * 1001}, "prompt", "at most 1000 characters"),
        ("sd.sweep", {"prompt": "a", "negative_prompt": "x" * 1001}, "negative_prompt", "at most 1000 characters"),
        ("sd.sweep", {"prompt": "a", "guidance_scales": []}, "guidance_scales", "at least 1 item"),
        ("sd.sweep", {"prompt": "a", "guidance_scales": [1, 51]}, "guidance_scales.1", "less than or equal to 50"),
        ("sd.sweep", {"prompt": "a", "guidance_scales": [-0.5]}, "guidance_scales.0", "greater than or equal to 0"),
        ("sd.sweep", {"prompt": "a", "seeds": [2**32]}, "seeds.0", "less than or equal to 4294967295"),
        ("sd.sweep", {"prompt": "a", "seeds": list(range(65))}, "seeds", "at most 64 items"),
        ("sd.sweep", {"prompt": "a", "steps_list": [10, 0]}, "steps_list.1", "greater than or equal to 1"),
        ("sd.sweep", {"prompt": "a", "steps_list": [1] * 17}, "steps_list", "at most 16 items"),
    ],
)
def test_bounds_name_the_field_and_the_bound(kind, params, field, fragment):
    assert_names(spec_error(kind, params), field, fragment)


@pytest.mark.parametrize(
    "kind, params, field",
    [
        ("sd.sweep", {"prompt": "a", "guidance_scales": [1.0, float("nan")]}, "guidance_scales.1"),
        ("sd.sweep", {"prompt": "a", "guidance_scales": [float("inf")]}, "guidance_scales.0"),
        ("sd.txt2img", {**ROSE, "guidance_scale": float("-inf")}, "guidance_scale"),
        ("sd.img2img", {**INIT, "strength": float("nan")}, "strength"),
    ],
)
def test_nan_and_infinity_are_refused(kind, params, field):
    err = spec_error(kind, params)
    assert field in err.fields, err.fields
    assert "NaN and Infinity" in err.fields[field]


# ------------------------------------------------------------------ cross-field
@pytest.mark.parametrize("kind", ["sd.txt2img", "sd.img2img"])
def test_prompts_or_prompts_upload_exactly_one(kind):
    base = {"init_image": UPLOAD} if kind == "sd.img2img" else {}
    assert_names(spec_error(kind, base), "prompts", "give one of prompts or prompts_upload")
    assert_names(spec_error(kind, {**base, **ROSE, "prompts_upload": UPLOAD}), "prompts", "not both")
    spec = validate_params(kind, {**base, "prompts_upload": UPLOAD})
    assert spec.prompts is None and spec.prompts_upload == UPLOAD


def test_negative_prompt_list_has_one_per_prompt():
    err = spec_error("sd.txt2img", {"prompts": ["a", "b", "c"], "negative_prompt": ["x", "y"]})
    assert_names(err, "negative_prompt", "has 2 entries and prompts has 3")
    ok = validate_params("sd.txt2img", {"prompts": ["a", "b"], "negative_prompt": ["x", ""]})
    assert ok.negative_prompt == ["x", ""]
    assert validate_params("sd.txt2img", {"prompts": ["a", "b"], "negative_prompt": "blurry"}).negative_prompt == "blurry"
    # With a prompts file the count is the file's: the worker checks it.
    assert validate_params("sd.txt2img", {"prompts_upload": UPLOAD, "negative_prompt": ["x"]}).negative_prompt == ["x"]
    assert_names(spec_error("sd.txt2img", {"prompts_upload": UPLOAD, "negative_prompt": []}),
                 "negative_prompt", "1 to 256 entries")


def test_total_images_cap():
    err = spec_error("sd.txt2img", {"prompts": ["a"] * 20, "num_images_per_prompt": 16})
    assert_names(err, "num_images_per_prompt", "20 prompts x 16 images = 320 images, more than 256")
    assert validate_params("sd.txt2img", {"prompts": ["a"] * 16, "num_images_per_prompt": 16})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"seeds": list(range(8))}, "9 scales x 8 seeds = 72 cells, more than 64"),
        ({"guidance_scales": [1, 2, 3, 4], "seeds": [1, 2, 3, 4, 5], "steps_list": [10, 20, 30, 40]},
         "4 scales x 5 seeds x 4 step counts = 80 cells, more than 64"),
    ],
)
def test_sweep_cell_cap(params, message):
    assert_names(spec_error("sd.sweep", {"prompt": "a", **params}), "guidance_scales", message)


def test_sweep_at_the_cell_cap():
    spec = validate_params("sd.sweep", {"prompt": "a", "guidance_scales": [1, 2, 3, 4], "seeds": [1, 2, 3, 4],
                                        "steps_list": [10, 20, 30, 40]})
    assert spec.steps_list == [10, 20, 30, 40]


def test_sweep_preview_cap_uses_the_longest_steps():
    err = spec_error("sd.sweep", {"prompt": "a", "preview_every": 1, "steps_list": [10, 300]})
    assert_names(err, "preview_every", "more than 200 previews for 300 steps")


def test_img2img_strength_must_leave_a_step():
    err = spec_error("sd.img2img", {**INIT, "strength": 0.01})
    assert_names(err, "strength", "0.01 x 50 steps runs no denoising step")
    assert validate_params("sd.img2img", {**INIT, "strength": 0.02}).strength == 0.02


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("image.png", "expected upload:<32 hex digits> or job:<32 hex digits>/<artifact name>"),
        (f"job:{JOB_ID}", "expected upload"),
        (f"job:{JOB_ID}/", "expected upload"),
        (f"job:{JOB_ID}//a.png", "expected upload"),
        (f"job:{JOB_ID}/../other/a.png", ".. parts"),
        (f"job:{JOB_ID}/images/../../a.png", ".. parts"),
        (f"job:{JOB_ID}/images/./a.png", ". or .. parts"),
        (f"job:{JOB_ID}/a\\b.png", "no backslashes"),
        (f"job:{JOB_ID}/" + "x" * 513, "at most 512 characters"),
        ("job:XYZ/a.png", "expected upload"),
        ("upload:" + "0" * 31, "expected upload"),
    ],
)
def test_init_image_refuses(ref, fragment):
    assert_names(spec_error("sd.img2img", {**ROSE, "init_image": ref}), "init_image", fragment)


def test_init_image_is_required():
    assert_names(spec_error("sd.img2img", ROSE), "init_image", "required")


# ------------------------------------------------------------------ schema
def test_sd_kinds_schema():
    kinds = {k["kind"]: k for k in kinds_schema()}
    json.dumps(kinds)
    txt2img, img2img, sweep = kinds["sd.txt2img"], kinds["sd.img2img"], kinds["sd.sweep"]
    props = txt2img["schema"]["properties"]
    assert props["prompts_upload"]["upload_kind"] == "prompts"
    assert props["steps"]["default"] == 50 and props["preset"]["default"] == "default"
    assert txt2img["schema"].get("additionalProperties") is False
    assert set(txt2img["presets"]) == set(SD_TXT2IMG_PRESETS) == {"default", "article", "loop", "guide"}
    assert txt2img["presets"]["article"]["params"]["steps"] == 64 and txt2img["presets"]["article"]["help"]

    iprops = img2img["schema"]["properties"]
    assert img2img["schema"]["required"] == ["init_image"]
    assert iprops["init_image"]["upload_kind"] == "image"
    assert iprops["guidance_scale"]["default"] == 6.0 and iprops["seed"]["default"] == 193
    assert "presets" not in img2img

    sprops = sweep["schema"]["properties"]
    assert sweep["schema"]["required"] == ["prompt"]
    assert sprops["guidance_scales"]["default"] == DEFAULT_GUIDANCE_SCALES
    assert set(sweep["presets"]) == set(SD_SWEEP_PRESETS)
