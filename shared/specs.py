"""Job specs: one pydantic model per job kind, with defaults, bounds and presets.

This module is the one source of the params JSON schema that the API (`GET
/api/v1/kinds`) and the forms show. Validation happens at the API edge, so a
runner can trust the spec it receives.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import SpecError, UnknownKind

MODEL_REF_PATTERN = r"^(job:[0-9a-f]{32}|[A-Za-z0-9][A-Za-z0-9._-]{0,127})$"


class Spec(BaseModel):
    """Base for all specs: unknown fields, NaN and Infinity are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


# --------------------------------------------------------------------------- DDPM
# Presets are complete UNet + scheduler + training configs; explicit params
# override them. `tiny` learns on a CPU in about a minute.
DDPM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 16,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_levels": [],
        "class_conditional": True,
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "max_steps": 300,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "sample_steps": 100,
        "num_samples": 16,
    },
    "digits": {
        "image_size": 32,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "attention_levels": [2],
        "class_conditional": True,
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "max_steps": 3000,
        "batch_size": 64,
        "learning_rate": 3e-4,
        "sample_steps": 1000,
        "num_samples": 20,
    },
}
DDPM_PRESET_HELP = {
    "tiny": "16 px, two levels, learns the digits' shapes on a CPU in about a minute (tests).",
    "digits": "32 px class-conditioned UNet on the bundled digits; minutes on a CPU.",
}


class DDPMTrainSpec(Spec):
    """Train a diffusers UNet2DModel with a DDPMScheduler (the loop of SEEDS.md §2 and §4)."""

    preset: Literal["tiny", "digits"] = Field("tiny", description="Base config; other params override it.")
    dataset: Literal["digits"] = Field(
        "digits", description="`digits`: scikit-learn's bundled 8x8 handwritten digits, upscaled, with labels."
    )
    image_size: int = Field(None, ge=8, le=512, multiple_of=8, description="Training resolution in pixels (multiple of 8).")
    block_out_channels: list[int] = Field(None, min_length=1, max_length=6, description="UNet channels per level.")
    layers_per_block: int = Field(None, ge=1, le=4)
    attention_levels: list[int] = Field(None, max_length=6, description="Levels (0-based) that use attention blocks.")
    class_conditional: bool = Field(None, description="Learn class embeddings from the dataset's labels.")
    num_train_timesteps: int = Field(None, ge=10, le=4000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(None)
    beta_start: float = Field(None, gt=0, le=0.1)
    beta_end: float = Field(None, gt=0, le=0.5)
    max_steps: int = Field(None, ge=1, le=1_000_000, description="Optimizer steps to train for.")
    batch_size: int = Field(None, ge=1, le=1024)
    learning_rate: float = Field(None, gt=0, le=1.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    sample_steps: int = Field(None, ge=1, le=4000, description="Denoising steps for the final samples.png grid.")
    num_samples: int = Field(None, ge=1, le=64, description="Images in the final samples.png grid.")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "tiny")
        base = DDPM_PRESETS.get(preset, {}) if isinstance(preset, str) else {}
        return {**base, **{k: v for k, v in data.items() if v is not None}}

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
        return self


class DDPMSampleSpec(Spec):
    """Sample images from a trained DDPM (SEEDS.md §1, §4)."""

    model: str = Field(
        ...,
        pattern=MODEL_REF_PATTERN,
        description="`job:<id>` of a finished ddpm.train job, or a folder name under DIFFQUEUE_MODELS_DIR.",
    )
    num_images: int = Field(8, ge=1, le=256)
    steps: int = Field(50, ge=1, le=4000, description="Denoising steps.")
    scheduler: Literal["ddpm", "ddim"] = "ddim"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    class_label: int | list[int] | None = Field(
        None, description="For class-conditioned models: one label for all images, or one per image."
    )
    batch_size: int = Field(32, ge=1, le=256, description="Images per UNet batch.")

    @field_validator("class_label")
    @classmethod
    def _labels(cls, v):
        labels = v if isinstance(v, list) else [v] if v is not None else []
        for label in labels:
            if not 0 <= label < 1000:
                raise ValueError(f"class_label {label} must be in [0, 999]")
        return v

    @model_validator(mode="after")
    def _label_count(self) -> "DDPMSampleSpec":
        if isinstance(self.class_label, list) and len(self.class_label) != self.num_images:
            raise ValueError(
                f"class_label: has {len(self.class_label)} entries, num_images is {self.num_images}: give one per image"
            )
        return self


@dataclass(frozen=True)
class Kind:
    name: str
    spec: type[Spec]
    queue: str
    title: str
    presets: dict[str, dict[str, Any]] | None = None
    preset_help: dict[str, str] | None = None


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("ddpm.train", DDPMTrainSpec, "gpu", "Train a DDPM", DDPM_PRESETS, DDPM_PRESET_HELP),
        Kind("ddpm.sample", DDPMSampleSpec, "gpu", "Sample from a DDPM"),
    ]
}


def validate_priority(value: Any) -> int:
    """Job priority: an integer in [0, 9], higher runs first."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 9:
        raise SpecError(f"priority must be an integer in [0, 9], got {value!r}", {"priority": "must be in [0, 9]"})
    return value


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("int", "list[int]")) or "params"


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


def validate_params(kind: str, params: Any) -> Spec:
    """Validate `params` for `kind`; raise SpecError naming each bad field and its bound."""
    if kind not in KINDS:
        raise UnknownKind(
            f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}", {"kind": "unknown kind"}
        )
    if not isinstance(params, dict):
        raise SpecError("params must be a JSON object", {"params": "must be an object"})
    bad = _contains_non_finite(params)
    if bad is not None:
        raise SpecError(f"{bad}: NaN and Infinity are not allowed", {bad: "NaN and Infinity are not allowed"})
    try:
        return KINDS[kind].spec.model_validate(params)
    except ValidationError as exc:
        fields = {}
        for err in exc.errors():
            path = _field_path(err["loc"])
            msg = re.sub(r"^Value error, ", "", err["msg"])
            # Cross-field checks raise "field: message" so the error still names a field.
            named = re.match(r"^([a-z_]+): (.*)$", msg, re.S)
            if path == "params" and named:
                path, msg = named.groups()
            fields.setdefault(path, msg)
        summary = "; ".join(f"{k}: {v}" for k, v in fields.items())
        raise SpecError(f"invalid params for {kind}: {summary}", fields) from None


def kinds_schema() -> list[dict[str, Any]]:
    """Every job kind with its params JSON schema, defaults and presets."""
    out = []
    for kind in KINDS.values():
        entry = {
            "kind": kind.name,
            "title": kind.title,
            "queue": kind.queue,
            "description": (kind.spec.__doc__ or "").strip(),
            "schema": kind.spec.model_json_schema(),
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
