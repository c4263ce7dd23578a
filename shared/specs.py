"""Job specs: one pydantic model per job kind, with defaults, bounds and presets.

This module is the one source of the params JSON schema that the API (`GET
/api/v1/kinds`) and the forms show. Validation happens at the API edge, so a
runner can trust the spec it receives.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError, core_schema

from shared.config import Settings
from shared.errors import KindDisabled, SpecError, UnknownKind

# A local folder name, or a Hugging Face hub id `org/name` (a local folder first).
LOCAL_OR_HUB_MODEL = (
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}|[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
)
# ... or `job:<id>`, a finished training job's model.
MODEL_REF_PATTERN = rf"^(job:[0-9a-f]{{32}}|{LOCAL_OR_HUB_MODEL})$"


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "Input should be a number, not a boolean")
    return value


# Keys of a core schema that hold no validator to look into.
_NOT_SCHEMAS = frozenset({"cls", "config", "default", "expected", "metadata", "ref", "serialization"})


def _no_bools_for_numbers(schema: Any) -> Any:
    """A copy of a pydantic core schema in which every int, float and numeric Literal
    validator refuses a bool first. pydantic's lax mode takes true as 1 (a bool is an
    int in Python); its strict mode would refuse that, but also "5" for an int and a
    dict for a nested spec, which clients send today."""
    if isinstance(schema, list):
        return [_no_bools_for_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "function-before" and schema["function"].get("function") is _refuse_bool:
        return schema  # a nested spec's schema, already done
    out = {k: v if k in _NOT_SCHEMAS else _no_bools_for_numbers(v) for k, v in schema.items()}
    numeric = schema.get("type") in ("int", "float") or schema.get("type") == "literal" and any(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in schema["expected"])
    return core_schema.no_info_before_validator_function(_refuse_bool, out) if numeric else out


class Spec(BaseModel):
    """Base for all specs: unknown fields, NaN and Infinity are refused, and so is a
    boolean for a number (`{"sleep_s": true}` is not 1 second)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return _no_bools_for_numbers(handler(source))


# --------------------------------------------------------------------------- DDPM
# Presets are complete UNet + scheduler + data + training configs (the book's and the
# guide's training loops, the book's class-conditioned Fashion-MNIST model); explicit
# params override them. Level numbers count from 0 at full size.
DDPM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "dataset": "digits",
        "image_size": 16,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_levels": [],
        "class_conditional": True,
        "random_flip": False,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "max_steps": 300,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "use_ema": False,
        "sample_scheduler": "ddim",
        "sample_steps": 50,
        "num_samples": 20,
        "checkpoint_every": 0,
        "sample_every": 0,
    },
    "digits": {
        # Tuned with bench/digits_quality.py: v-prediction on the cosine schedule
        # learns class-true digits in far fewer steps than epsilon (98% vs 75% at 700).
        "dataset": "digits",
        "image_size": 16,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "attention_levels": [2],
        "class_conditional": True,
        "random_flip": False,
        "beta_schedule": "squaredcos_cap_v2",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "v_prediction",
        "max_steps": 700,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "use_ema": True,
        "ema_max_decay": 0.999,
        "sample_scheduler": "ddim",
        "sample_steps": 50,
        "num_samples": 20,
        "checkpoint_every": 250,
        "sample_every": 250,
    },
    "fashion-32": {
        "dataset": "hf:fashion_mnist",
        "image_column": "image",
        "label_column": "label",
        "resize_mode": "pad",
        "channels": 1,
        "image_size": 32,
        "block_out_channels": [32, 64, 128, 256],
        "layers_per_block": 2,
        "attention_levels": [1, 2, 3],  # UNet2DModel's default block types
        "class_conditional": True,
        "random_flip": True,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "epochs": 25,
        "batch_size": 256,
        "learning_rate": 3e-4,
        "adam_epsilon": 1e-5,
        "lr_warmup_steps": 0,
        "use_ema": False,
        "sample_scheduler": "ddpm",
        "sample_steps": 1000,
        "num_samples": 30,
    },
    "book-64": {
        "dataset": "hf:huggan/smithsonian_butterflies_subset:train",
        "image_column": "image",
        "channels": 3,
        "image_size": 64,
        "block_out_channels": [64, 128, 256, 512],
        "layers_per_block": 2,
        "attention_levels": [2, 3],
        "class_conditional": False,
        "random_flip": True,
        "beta_schedule": "linear",
        "beta_start": 0.001,
        "beta_end": 0.02,
        "epochs": 50,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "lr_warmup_steps": 0,
        "use_ema": False,
        "sample_scheduler": "ddpm",
        "sample_steps": 1000,
        "num_samples": 16,
    },
    "guide-128": {
        "dataset": "hf:huggan/smithsonian_butterflies_subset:train",
        "image_column": "image",
        "channels": 3,
        "image_size": 128,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "layers_per_block": 2,
        "attention_levels": [4],
        "class_conditional": False,
        "random_flip": True,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "epochs": 50,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 500,
        "mixed_precision": "fp16",
        "use_ema": False,
        "sample_scheduler": "ddpm",
        "sample_steps": 1000,
        "num_samples": 16,
    },
}
DDPM_PRESET_HELP = {
    "tiny": "16 px, two levels, for tests: learns the digits' shapes on a CPU in under a minute.",
    "digits": "16 px class-conditioned UNet (1.6 M params, v-prediction, EMA) on scikit-learn's bundled digits: "
    "about 4 minutes on a 2-core CPU, and 98% of its samples are read as the right digit by an independent classifier.",
    "fashion-32": "The book's class-conditioned 1-channel 32 px UNet on Fashion-MNIST (padded 28 to 32), "
    "batch 256, AdamW lr 3e-4 eps 1e-5, 25 epochs.",
    "book-64": "The book: 64 px butterflies, 63 M-param UNet with attention at the two lowest levels, "
    "betas 0.001-0.02, batch 16, AdamW lr 1e-4, 50 epochs.",
    "guide-128": "The guide: 128 px butterflies, six-level UNet, cosine lr with 500 warmup steps, "
    "fp16 on a GPU, 50 epochs.",
}
DATASET_PATTERN = r"^(digits|upload:[0-9a-f]{32}|hf:[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?(:[A-Za-z0-9._\[\]%:+-]+)?)$"


class DDPMTrainSpec(Spec):
    """Train a diffusers UNet2DModel with a DDPMScheduler (the book's and the guide's loop), with
    EMA, lr warmup, gradient accumulation and clipping, mixed precision, and
    checkpoints that a re-run resumes from."""

    preset: Literal["tiny", "digits", "fashion-32", "book-64", "guide-128"] = Field(
        "tiny", description="Base config; other params override it."
    )
    # Data
    dataset: str = Field(
        None,
        pattern=DATASET_PATTERN,
        description="`digits` (bundled with scikit-learn), `upload:<id>` (a zip of images; class sub-folders "
        "become labels) or `hf:<name>[:split]` (a Hugging Face dataset, split `train` by default).",
        json_schema_extra={"upload_kind": "dataset", "hub_ref": "dataset"},
    )
    image_column: str | None = Field(None, max_length=64, description="hf: datasets: the image column (default: the first image feature).")
    label_column: str | None = Field(None, max_length=64, description="hf: datasets: the label column (default: the first class-label feature).")
    max_train_samples: int | None = Field(None, ge=1, le=10_000_000, description="Use at most this many images.")
    channels: Literal[1, 3] | None = Field(None, description="1 (grayscale) or 3 (RGB); empty: from the data.")
    resize_mode: Literal["resize", "pad"] = Field(
        "resize", description="`resize` to image_size x image_size, or `pad` (centred, after shrinking to fit)."
    )
    random_flip: bool = Field(None, description="Random horizontal flips while training.")
    # Model and noise schedule
    image_size: int = Field(None, ge=8, le=512, multiple_of=8, description="Training resolution in pixels (multiple of 8).")
    block_out_channels: list[int] = Field(None, min_length=1, max_length=6, description="UNet channels per level.")
    layers_per_block: int = Field(None, ge=1, le=4)
    attention_levels: list[int] = Field(None, max_length=6, description="Levels (0 = full size) that use attention blocks.")
    class_conditional: bool | None = Field(None, description="Learn class embeddings; empty: when the dataset has labels.")
    num_train_timesteps: int = Field(1000, ge=10, le=4000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = Field(None)
    beta_start: float = Field(None, gt=0, le=0.1)
    beta_end: float = Field(None, gt=0, le=0.5)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "epsilon", description="What the UNet learns to predict: the noise, the velocity, or the clean image."
    )
    # Optimisation
    epochs: int | None = Field(None, ge=1, le=10_000, description="Passes over the data (max_steps wins if both are set).")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimizer steps to train for.")
    batch_size: int = Field(None, ge=1, le=4096, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=256, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(None, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="Learning-rate schedule after the warmup."
    )
    lr_warmup_steps: int = Field(0, ge=0, le=1_000_000)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(0.01, ge=0, le=1)
    adam_epsilon: float = Field(1e-8, gt=0, le=1e-2)
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm; 0 turns clipping off.")
    use_ema: bool = Field(None, description="Keep an EMA of the weights; samples and the exported model use it.")
    ema_max_decay: float = Field(0.9999, ge=0, lt=1)
    ema_inv_gamma: float = Field(1.0, gt=0, le=100)
    ema_power: float = Field(0.75, gt=0, le=10, description="EMA warmup: decay = 1 - (1 + step / inv_gamma) ** -power.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Through accelerate. fp16 needs a GPU; on a CPU worker it falls back to `no`."
    )
    channels_last: bool | None = Field(None, description="channels_last memory format; empty: on CUDA.")
    compile: bool = Field(False, description="torch.compile the UNet (CUDA only).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # Checkpoints and samples along the way
    checkpoint_every: int = Field(500, ge=0, le=10_000_000, description="Optimizer steps between checkpoints; 0: none.")
    checkpoints_keep: int = Field(2, ge=1, le=100, description="Complete checkpoints kept; older ones are deleted.")
    sample_every: int = Field(500, ge=0, le=10_000_000, description="Steps between samples/step-NNNNNN.png grids; 0: none.")
    sample_scheduler: Literal["ddpm", "ddim"] = Field(None, description="Scheduler for the sample grids.")
    sample_steps: int = Field(None, ge=1, le=4000, description="Denoising steps for the sample grids.")
    num_samples: int = Field(None, ge=1, le=100, description="Images in each sample grid.")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "tiny")
        base = DDPM_PRESETS.get(preset, {}) if isinstance(preset, str) else {}
        merged = {**base, **{k: v for k, v in data.items() if v is not None}}
        if data.get("max_steps") is not None and data.get("epochs") is None:
            merged.pop("epochs", None)  # an explicit max_steps replaces a preset's epochs
        if data.get("epochs") is not None and data.get("max_steps") is None:
            merged.pop("max_steps", None)
        return merged

    @field_validator("block_out_channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        for c in v:
            if not 8 <= c <= 1024 or c % 8:
                raise ValueError(f"each channel count must be a multiple of 8 in [8, 1024], got {c}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DDPMTrainSpec":
        levels = len(self.block_out_channels)
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < levels]
        if bad:
            raise ValueError(f"attention_levels: {bad} out of range [0, {levels - 1}]")
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size: {self.image_size} must be divisible by {factor} for {levels} levels")
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end: {self.beta_end} must be greater than beta_start {self.beta_start}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("max_steps: give max_steps or epochs")
        if self.dataset == "digits" and self.channels == 3:
            raise ValueError("channels: the digits dataset is grayscale; use 1 or leave it empty")
        return self

    @property
    def hf_dataset(self) -> tuple[str, str] | None:
        """(name, split) of an `hf:` dataset."""
        if not self.dataset.startswith("hf:"):
            return None
        name, _, split = self.dataset[3:].partition(":")
        return name, split or "train"


class ColorGuidance(Spec):
    """The book's challenge: steer sampling toward a colour with no retraining. Before each
    scheduler step, x moves against the gradient (w.r.t. x) of `scale` times the mean
    absolute distance of the predicted x0 to `color`."""

    color: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        ...,
        description="Target colour, each value in [0, 1]: [r, g, b] for an RGB model, [grey] for a 1-channel one.",
    )
    scale: float = Field(
        40.0, gt=0, le=10_000, description="Guidance weight (the book uses 40); the loss is a mean per image."
    )

    @field_validator("color")
    @classmethod
    def _color_length(cls, v: list[float]) -> list[float]:
        if len(v) not in (1, 3):
            raise ValueError(f"must have 3 values [r, g, b] (or 1 for a 1-channel model), got {len(v)}: {v}")
        return v


# A class label is a number, or a class name from the model's class_names.json.
ClassLabel = int | Annotated[str, Field(min_length=1, max_length=64)]
MAX_PREVIEWS = 200  # previews/step-NNNN.png files per job


class DDPMSampleSpec(Spec):
    """Sample images from a DDPM: a trained job's model, a local folder or a Hugging Face
    hub pipeline (the book's sampling loop), with previews of x and the predicted x0 as it runs
    and optional colour guidance (the book's loss-guided sampling)."""

    model: str = Field(
        ...,
        pattern=MODEL_REF_PATTERN,
        description="`job:<id>` of a finished ddpm.train job, a folder under DIFFQUEUE_MODELS_DIR, "
        "or a Hugging Face hub id such as `google/ddpm-celebahq-256` (a DDPMPipeline repo).",
        json_schema_extra={"hub_ref": "model"},
    )
    num_images: int = Field(8, ge=1, le=256)
    steps: int = Field(50, ge=1, le=4000, description="Denoising steps.")
    scheduler: Literal["ddpm", "ddim"] = "ddim"
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Image i is drawn with its own generator seeded seed + i, whatever batch_size."
    )
    class_label: ClassLabel | list[ClassLabel] | None = Field(
        None,
        description="For class-conditioned models: one label for all images, or one per image. A label is a class "
        "number, or a name from the model's class_names.json. Empty: labels cycle 0, 1, 2, ...",
    )
    batch_size: int = Field(32, ge=1, le=256, description="Images per UNet batch.")
    preview_every: int | None = Field(
        None,
        ge=1,
        le=4000,
        description="Write previews/step-NNNN.png (x beside the predicted x0, first batch) every this many steps "
        "and at the last. Empty: steps // 8.",
    )
    guidance: ColorGuidance | None = Field(None, description="Colour guidance (the book's loss-guided sampling); empty: none.")

    @field_validator("class_label")
    @classmethod
    def _labels(cls, v):
        labels = v if isinstance(v, list) else [v] if v is not None else []
        for label in labels:
            if isinstance(label, int) and not 0 <= label < 1000:
                raise ValueError(f"class_label {label} must be in [0, 999]")
        return v

    @model_validator(mode="after")
    def _label_count(self) -> "DDPMSampleSpec":
        if isinstance(self.class_label, list) and len(self.class_label) not in (1, self.num_images):
            raise ValueError(
                f"class_label: has {len(self.class_label)} entries, num_images is {self.num_images}: "
                "give one label, or one per image"
            )
        if self.steps / self.preview_interval > MAX_PREVIEWS:
            least = math.ceil(self.steps / MAX_PREVIEWS)
            raise ValueError(
                f"preview_every: {self.preview_interval} gives more than {MAX_PREVIEWS} previews for {self.steps} "
                f"steps; use at least {least}"
            )
        return self

    @property
    def preview_interval(self) -> int:
        return self.preview_every or max(1, self.steps // 8)


# The book's noise-schedule figure: the default, the cosine one, and linear with a low and a high beta_end.
DEFAULT_NOISE_SCHEDULES: list[dict[str, Any]] = [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "label": "linear"},
    {"beta_schedule": "squaredcos_cap_v2", "label": "cosine"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.003, "label": "low beta_end=0.003"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.1, "label": "high beta_end=0.1"},
]
UPLOAD_REF = r"upload:[0-9a-f]{32}"


class NoiseSchedule(Spec):
    """One DDPMScheduler beta schedule."""

    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="`squaredcos_cap_v2` is the cosine schedule; it ignores beta_start and beta_end."
    )
    beta_start: float = Field(0.0001, gt=0, le=0.1)
    beta_end: float = Field(0.02, gt=0, le=0.5)
    label: str | None = Field(None, min_length=1, max_length=64, description="Legend label; empty: from the settings.")

    @model_validator(mode="after")
    def _ordered(self) -> "NoiseSchedule":
        if self.beta_schedule != "squaredcos_cap_v2" and self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end {self.beta_end} must be greater than beta_start {self.beta_start}")
        return self

    @property
    def display_label(self) -> str:
        if self.label:
            return self.label
        if self.beta_schedule == "squaredcos_cap_v2":
            return "cosine"
        return f"{self.beta_schedule} {self.beta_start:g}-{self.beta_end:g}"


class DDPMSchedulePlotSpec(Spec):
    """Plot how much signal and noise each timestep keeps under several noise
    schedules, and one image noised at a few timesteps under each (the book's figures)."""

    num_train_timesteps: int = Field(1000, ge=10, le=4000)
    schedules: list[NoiseSchedule] = Field(
        DEFAULT_NOISE_SCHEDULES, min_length=1, max_length=8, description="Schedules to compare, 1 to 8."
    )
    image: str = Field(
        "digits",
        pattern=rf"^(digits|{UPLOAD_REF})$",
        description="`digits` (a sample of scikit-learn's bundled digits, upscaled) or `upload:<id>` of an image.",
        json_schema_extra={"upload_kind": "image"},
    )
    image_size: int = Field(64, ge=8, le=512, description="Side of the noised images, in pixels.")
    num_timesteps_shown: int = Field(8, ge=2, le=16, description="Columns of noised.png: linspace(0, T-1, n).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the noise added (the same noise for every row).")

    @model_validator(mode="after")
    def _shown(self) -> "DDPMSchedulePlotSpec":
        if self.num_timesteps_shown > self.num_train_timesteps:
            raise ValueError(
                f"num_timesteps_shown: {self.num_timesteps_shown} is more than num_train_timesteps "
                f"{self.num_train_timesteps}"
            )
        return self


# ----------------------------------------------------------------- Stable Diffusion
MAX_PROMPT_CHARS = 1000
MAX_PROMPTS = 256  # prompts in one job's `prompts` list
MAX_SD_IMAGES = 256  # images from one txt2img or img2img job with `prompts`
MAX_SWEEP_CELLS = 64  # guidance scales x seeds x step counts in one sweep
SD_MODEL_PATTERN = rf"^({LOCAL_OR_HUB_MODEL})$"
# Stable Diffusion 1.5 on the hub: its original id (runwayml/...) was deleted in 2024, and
# resolves here as an alias (shared/model_refs.py HUB_ALIASES).
DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# `upload:<id>` of an image, or `job:<id>/<artifact name>`: an image a finished job wrote.
INIT_IMAGE_PATTERN = rf"^({UPLOAD_REF}|job:[0-9a-f]{{32}}/[^/\\\x00-\x1f][^\\\x00-\x1f]{{0,511}})$"
Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)]
NegativePrompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
GuidanceScale = Annotated[float, Field(ge=0, le=50)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
StepCount = Annotated[int, Field(ge=1, le=500)]
GUIDANCE_HELP = (
    "Classifier-free guidance: each step uses uncond + g * (cond - uncond), for every g (diffusers' pipelines "
    "skip guidance when g <= 1; here 1 is the prompt alone, 0 the negative prompt alone, and between them a blend)."
)


def _with_preset(data: Any, presets: dict[str, dict[str, Any]], default: str) -> Any:
    """A preset's values under the explicit params (an explicit null overrides too)."""
    if not isinstance(data, dict):
        return data
    preset = data.get("preset", default)
    base = presets.get(preset, {}) if isinstance(preset, str) else {}
    return {**base, **data}


class SDSpec(Spec):
    """What every Stable Diffusion job has: the pipeline to load and how to sample."""

    model: str = Field(
        DEFAULT_SD_MODEL,
        pattern=SD_MODEL_PATTERN,
        description="A folder under DIFFQUEUE_MODELS_DIR (a saved StableDiffusionPipeline), else a Hugging Face "
        "hub id `org/name`.",
        json_schema_extra={"hub_ref": "model"},
    )
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Weights variant to load, e.g. `fp16`; empty: the main weights.",
    )
    torch_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="`auto`: float16 on CUDA, float32 on a CPU."
    )
    vae: str | None = Field(
        None,
        pattern=SD_MODEL_PATTERN,
        description="A VAE to use instead of the pipeline's (same forms as model), e.g. `stabilityai/sd-vae-ft-ema`.",
        json_schema_extra={"hub_ref": "model"},
    )
    scheduler: Literal["pndm", "ddim", "euler", "euler_a", "dpm++"] = Field(
        "pndm", description="pndm (SD 1.x's own), ddim, euler, euler_a (ancestral) or dpm++ (DPMSolver++ multistep)."
    )
    steps: int = Field(50, ge=1, le=500, description="Denoising steps.")
    width: int = Field(
        512, ge=16, le=2048, multiple_of=8, description="Image width in pixels (multiple of 8); sd.img2img fits the "
        "init image inside width x height, keeping its aspect ratio."
    )
    height: int = Field(512, ge=16, le=2048, multiple_of=8, description="Image height in pixels (multiple of 8).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    batch_size: int = Field(8, ge=1, le=64, description="Most images per UNet batch.")
    preview_every: int | None = Field(
        None,
        ge=1,
        le=500,
        description="Decode previews/step-NNNN.png (the first image) every this many steps and at the last. "
        "Empty: steps // 8.",
    )
    compile: bool = Field(False, description="torch.compile the UNet (CUDA only).")
    vae_tiling: bool = Field(False, description="Decode in tiles: less memory for large images.")

    @property
    def preview_interval(self) -> int:
        return self.preview_every or max(1, self.steps // 8)

    def _check_previews(self, steps: int) -> None:
        interval = self.preview_every or max(1, steps // 8)
        if steps / interval > MAX_PREVIEWS:
            raise ValueError(
                f"preview_every: {interval} gives more than {MAX_PREVIEWS} previews for {steps} steps; "
                f"use at least {math.ceil(steps / MAX_PREVIEWS)}"
            )


class SDPromptsSpec(SDSpec):
    """Fields of the prompt-driven kinds (txt2img, img2img): prompts or a prompts file."""

    prompts: list[Prompt] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPTS,
        description=f"1 to {MAX_PROMPTS} prompts, each at most {MAX_PROMPT_CHARS} characters. "
        "Give this or prompts_upload.",
    )
    prompts_upload: str | None = Field(
        None,
        pattern=rf"^{UPLOAD_REF}$",
        description="`upload:<id>` of a prompts file (.txt, one prompt a line, or .csv with prompt and optional "
        "negative_prompt and seed columns). Give this or prompts.",
        json_schema_extra={"upload_kind": "prompts"},
    )
    negative_prompt: NegativePrompt | list[NegativePrompt] | None = Field(
        None,
        description="What to steer away from: one for all prompts, or a list with one per prompt. Empty: none "
        "(the unconditional empty prompt).",
    )
    num_images_per_prompt: int = Field(1, ge=1, le=16)
    guidance_scale: float = Field(7.5, ge=0, le=50, description=GUIDANCE_HELP)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_count(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= MAX_PROMPTS:
            raise ValueError(f"a list of negative prompts must have 1 to {MAX_PROMPTS} entries, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _prompts(self) -> "SDPromptsSpec":
        if self.prompts is not None and self.prompts_upload is not None:
            raise ValueError("prompts: give prompts or prompts_upload, not both")
        if self.prompts is None and self.prompts_upload is None:
            raise ValueError("prompts: give one of prompts or prompts_upload")
        if self.prompts is not None:
            n = len(self.prompts)
            if isinstance(self.negative_prompt, list) and len(self.negative_prompt) != n:
                raise ValueError(
                    f"negative_prompt: has {len(self.negative_prompt)} entries and prompts has {n}: "
                    "give one negative prompt, or one per prompt"
                )
            total = n * self.num_images_per_prompt
            if total > MAX_SD_IMAGES:
                raise ValueError(
                    f"num_images_per_prompt: {n} prompts x {self.num_images_per_prompt} images = {total} images, "
                    f"more than {MAX_SD_IMAGES}"
                )
        self._check_previews(self.steps)
        return self


# The hand-written loops' settings (the book's and the article's), and the guide's fp16 weights with the
# fine-tuned VAE.
SD_TXT2IMG_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "article": {"scheduler": "pndm", "steps": 64, "guidance_scale": 9.0, "seed": 193},
    "loop": {"width": 512, "height": 512, "steps": 30, "guidance_scale": 7.5, "seed": 42},
    "guide": {"variant": "fp16", "vae": "stabilityai/sd-vae-ft-ema"},
}
SD_TXT2IMG_PRESET_HELP = {
    "default": "The service defaults: PNDM, 50 steps, guidance 7.5, seed 0, 512 px.",
    "article": "The article's loop: PNDM, 64 steps, guidance 9.0, seed 193 (the article used "
    "CompVis/stable-diffusion-v1-4), a preview every steps // 8.",
    "loop": "The book's hand-written loop: 512 x 512, 30 steps, guidance 7.5, seed 42.",
    "guide": "The guide: the fp16 weights variant with the VAE swapped for stabilityai/sd-vae-ft-ema.",
}


class SDTxt2ImgSpec(SDPromptsSpec):
    """Stable Diffusion text-to-image (the book's Stable Diffusion chapter): prompts with optional negative
    prompts, several images per prompt, batched through the UNet, with previews."""

    preset: Literal["default", "article", "loop", "guide"] = Field(
        "default", description="Base settings; other params override them."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        return _with_preset(data, SD_TXT2IMG_PRESETS, "default")


class SDImg2ImgSpec(SDPromptsSpec):
    """Stable Diffusion image-to-image variations (the book's Stable Diffusion chapter): an init image, noised
    to `strength` and denoised toward the prompts."""

    init_image: str = Field(
        ...,
        pattern=INIT_IMAGE_PATTERN,
        description="`upload:<id>` of an image, or `job:<id>/<artifact name>` of an image a finished job wrote "
        "(e.g. `job:<id>/images/0000-00.png`).",
        json_schema_extra={"upload_kind": "image"},
    )
    strength: float = Field(
        0.8, gt=0, le=1, description="How far to noise the init image: 1 ignores it, near 0 keeps it. "
        "int(steps * strength) steps run."
    )
    guidance_scale: float = Field(6.0, ge=0, le=50, description=GUIDANCE_HELP)
    seed: int = Field(193, ge=0, le=2**32 - 1)

    @field_validator("init_image", mode="before")
    @classmethod
    def _image_ref(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v  # the type check names it
        if not re.fullmatch(INIT_IMAGE_PATTERN, v):
            raise ValueError(
                f"expected upload:<32 hex digits> or job:<32 hex digits>/<artifact name> "
                f"(a relative name, at most 512 characters, no backslashes), got {v[:80]!r}"
            )
        if v.startswith("job:") and any(part in ("", ".", "..") for part in v.split("/", 1)[1].split("/")):
            raise ValueError(f"{v!r}: the artifact name must be a relative path with no empty, . or .. parts")
        return v

    @model_validator(mode="after")
    def _some_steps(self) -> "SDImg2ImgSpec":
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"strength: {self.strength} x {self.steps} steps runs no denoising step; "
                f"use strength >= {1 / self.steps:g} or more steps"
            )
        return self


DEFAULT_GUIDANCE_SCALES = [0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0]
# The article's sweep, and the guide's guidance comparison.
SD_SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "article": {"guidance_scales": DEFAULT_GUIDANCE_SCALES, "seeds": [193], "steps": 50, "scheduler": "pndm"},
    "guide": {"guidance_scales": [1.0, 2.0, 4.0, 12.0], "seeds": [0], "steps": 50, "scheduler": "pndm"},
}
SD_SWEEP_PRESET_HELP = {
    "article": "The article's sweep: guidance 0.25 to 20 (nine scales), seed 193, 50 steps.",
    "guide": "The guide's comparison: guidance 1, 2, 4 and 12, seed 0, 50 steps.",
}


class SDSweepSpec(SDSpec):
    """Stable Diffusion guidance sweep (the article's): one prompt at every guidance
    scale x seed x step count, batched into one denoising loop, and a grid of it all."""

    preset: Literal["article", "guide"] = Field("article", description="Base settings; other params override them.")
    prompt: Prompt = Field(..., description=f"The prompt, at most {MAX_PROMPT_CHARS} characters.")
    negative_prompt: NegativePrompt | None = Field(None, description="What to steer away from; empty: none.")
    guidance_scales: list[GuidanceScale] = Field(
        DEFAULT_GUIDANCE_SCALES,
        min_length=1,
        max_length=64,
        description="Guidance scales to compare, each in [0, 50]. " + GUIDANCE_HELP,
    )
    seeds: list[Seed] = Field([193], min_length=1, max_length=64, description="Seeds to compare.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Not used by a sweep: see seeds.")
    steps_list: list[StepCount] | None = Field(
        None, min_length=1, max_length=16, description="Step counts to compare; empty: steps alone."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        return _with_preset(data, SD_SWEEP_PRESETS, "article")

    @model_validator(mode="after")
    def _cells(self) -> "SDSweepSpec":
        step_counts = self.steps_list or [self.steps]
        cells = len(self.guidance_scales) * len(self.seeds) * len(step_counts)
        if cells > MAX_SWEEP_CELLS:
            by_steps = f" x {len(step_counts)} step counts" if self.steps_list else ""
            raise ValueError(
                f"guidance_scales: {len(self.guidance_scales)} scales x {len(self.seeds)} seeds{by_steps} = "
                f"{cells} cells, more than {MAX_SWEEP_CELLS}"
            )
        self._check_previews(max(step_counts))
        return self


# ------------------------------------------------------------------------- noop
MAX_NOOP_SLEEP_S = 60.0


class NoopSpec(Spec):
    """Do nothing (optionally sleep) and succeed: for measuring the queue's own overhead
    (bench/queue.py). Hidden and refused unless DIFFQUEUE_ENABLE_NOOP=1."""

    sleep_s: float = Field(0.0, ge=0, le=MAX_NOOP_SLEEP_S, description="Seconds to sleep, 0 to 60.")


@dataclass(frozen=True)
class Kind:
    name: str
    spec: type[Spec]
    queue: str
    title: str
    presets: dict[str, dict[str, Any]] | None = None
    preset_help: dict[str, str] | None = None
    # The params most jobs set, in the order a form shows them; the rest are "more settings".
    main_fields: tuple[str, ...] = ()
    # The Settings flag that must be on for the kind to be listed or submitted; None: always.
    enabled_by: str | None = None


SD_MAIN_FIELDS = ("model", "negative_prompt", "num_images_per_prompt", "guidance_scale", "steps", "width", "height",
                  "seed")
KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("ddpm.train", DDPMTrainSpec, "gpu", "Train a DDPM", DDPM_PRESETS, DDPM_PRESET_HELP,
             ("preset", "dataset", "image_size", "class_conditional", "max_steps", "epochs", "batch_size",
              "learning_rate", "mixed_precision", "checkpoint_every", "sample_every", "seed")),
        Kind("ddpm.sample", DDPMSampleSpec, "gpu", "Sample from a DDPM",
             main_fields=("model", "num_images", "steps", "scheduler", "class_label", "seed", "preview_every")),
        Kind("ddpm.schedule_plot", DDPMSchedulePlotSpec, "cpu", "Plot noise schedules"),
        Kind("sd.txt2img", SDTxt2ImgSpec, "gpu", "Stable Diffusion: text to image", SD_TXT2IMG_PRESETS,
             SD_TXT2IMG_PRESET_HELP, ("preset", "prompts", "prompts_upload", *SD_MAIN_FIELDS)),
        Kind("sd.img2img", SDImg2ImgSpec, "gpu", "Stable Diffusion: image to image",
             main_fields=("init_image", "strength", "prompts", "prompts_upload", *SD_MAIN_FIELDS)),
        Kind("sd.sweep", SDSweepSpec, "gpu", "Stable Diffusion: guidance sweep", SD_SWEEP_PRESETS,
             SD_SWEEP_PRESET_HELP, ("preset", "prompt", "guidance_scales", "seeds", "steps_list", "model",
                                    "negative_prompt", "steps", "width", "height")),
        Kind("noop", NoopSpec, "cpu", "No-op (queue overhead)", enabled_by="enable_noop"),
    ]
}
# How a disabled kind's `enabled_by` flag is set, for the error message.
ENABLE_ENV = {"enable_noop": "DIFFQUEUE_ENABLE_NOOP=1"}


def kind_enabled(kind: Kind, settings: Settings) -> bool:
    return kind.enabled_by is None or bool(getattr(settings, kind.enabled_by))


def enabled_kinds(settings: Settings) -> dict[str, Kind]:
    """The kinds this service lists and accepts: KINDS without those switched off."""
    return {name: kind for name, kind in KINDS.items() if kind_enabled(kind, settings)}


def check_kind_enabled(kind: str, settings: Settings) -> None:
    """Refuse a kind that exists but is switched off (KindDisabled, naming `kind`); an
    unknown kind is left to validate_params."""
    if kind in KINDS and not kind_enabled(KINDS[kind], settings):
        flag = KINDS[kind].enabled_by
        reason = f"job kind {kind!r} is disabled; set {ENABLE_ENV.get(flag, flag)} to enable it"
        raise KindDisabled(reason, {"kind": reason})


def validate_priority(value: Any) -> int:
    """Job priority: an integer in [0, 9], higher runs first."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 9:
        raise SpecError(f"priority must be an integer in [0, 9], got {value!r}", {"priority": "must be in [0, 9]"})
    return value


# pydantic tags union members in error locations ("int", "constrained-str", "list[...]").
_UNION_TAG = re.compile(r"^(int|str|float|bool|constrained-str|(list|union|dict|function-before)\[.*\])$")


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))) or "params"


def _contains_non_finite(value: Any) -> str | None:
    """JSON parsers accept NaN/Infinity tokens; find them anywhere in the params."""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _contains_non_finite(item)
        if found is not None:
            return f"{key}.{found}".rstrip(".")
    return None


def _is_type_mismatch(err: dict) -> bool:
    return err["type"].endswith(("_type", "_parsing"))


def _telling_errors(errors: list[dict]) -> list[dict]:
    """pydantic reports each branch of a union (`int | str | list`) failing; for a
    65-character string the first is "not a valid integer". Where a union field has
    errors other than "not this type", those say what is wrong with the value given."""
    def union_field(err: dict) -> tuple | None:
        loc = err["loc"]
        at = next((i for i, p in enumerate(loc) if isinstance(p, str) and _UNION_TAG.match(p)), None)
        return None if at is None else loc[:at]

    telling = {union_field(e) for e in errors if union_field(e) is not None and not _is_type_mismatch(e)}
    return [e for e in errors if not (union_field(e) in telling and _is_type_mismatch(e))]


def listed_kinds() -> list[str]:
    """The kinds a refusal lists: the known ones, not the hidden ones."""
    return sorted(name for name, k in KINDS.items() if k.enabled_by is None)


def unknown_kind_reason(kind: str) -> str:
    return f"unknown job kind {kind!r}; known kinds: {', '.join(listed_kinds())}"


def validate_params(kind: str, params: Any) -> Spec:
    """Validate `params` for `kind`; raise SpecError naming each bad field and its bound."""
    if kind not in KINDS:
        reason = unknown_kind_reason(kind)
        raise UnknownKind(reason, {"kind": reason})
    if not isinstance(params, dict):
        raise SpecError("params must be a JSON object", {"params": "must be an object"})
    bad = _contains_non_finite(params)
    if bad is not None:
        raise SpecError(f"{bad}: NaN and Infinity are not allowed", {bad: "NaN and Infinity are not allowed"})
    try:
        return KINDS[kind].spec.model_validate(params)
    except ValidationError as exc:
        fields = {}
        for err in _telling_errors(exc.errors()):
            path = _field_path(err["loc"])
            msg = re.sub(r"^Value error, ", "", err["msg"])
            # Cross-field checks raise "field: message" so the error still names a field.
            named = re.match(r"^([a-z_]+): (.*)$", msg, re.S)
            if path == "params" and named:
                path, msg = named.groups()
            fields.setdefault(path, msg)
        summary = "; ".join(f"{k}: {v}" for k, v in fields.items())
        raise SpecError(f"invalid params for {kind}: {summary}", fields) from None


@functools.cache
def _schema_text(spec: type[Spec]) -> str:
    return json.dumps(spec.model_json_schema())


def params_schema(spec: type[Spec]) -> dict[str, Any]:
    """`spec.model_json_schema()`, generated once per spec and copied: pydantic takes
    milliseconds a call, and every form post used to make it eight times."""
    return json.loads(_schema_text(spec))


def kinds_schema(settings: Settings | None = None) -> list[dict[str, Any]]:
    """The job kinds `settings` enable (every kind without settings) with their params
    JSON schema, defaults and presets."""
    out = []
    for kind in (KINDS if settings is None else enabled_kinds(settings)).values():
        entry = {
            "kind": kind.name,
            "title": kind.title,
            "queue": kind.queue,
            "description": (kind.spec.__doc__ or "").strip(),
            "schema": params_schema(kind.spec),
            # A form shows these first; the others can wait behind "more settings". Empty: all are main.
            "main_fields": list(kind.main_fields),
        }
        if kind.presets:
            # Preset-filled fields have no static default; show the default preset's.
            default_preset = entry["schema"]["properties"]["preset"]["default"]
            for name, value in kind.presets[default_preset].items():
                entry["schema"]["properties"][name]["default"] = value
            entry["presets"] = {
                name: {"params": values, "help": (kind.preset_help or {}).get(name, "")}
                for name, values in kind.presets.items()
            }
        out.append(entry)
    return out
