"""ddpm.sample: sample images from a DDPM: a training job's model, a folder under
DIFFQUEUE_MODELS_DIR, or a Hugging Face hub pipeline such as google/ddpm-celebahq-256.

Outputs `images/0000.png…` (each with its settings as PNG text), `grid.png`, and
while it runs `previews/step-NNNN.png`: the current x beside the predicted x0 for
the first batch (the book's figure), with `preview.png` a copy of the latest. With
`guidance`, every step is nudged toward a colour (the book's loss guidance).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from shared.errors import ModelNotFound
from shared.specs import DDPMSampleSpec
from worker import weights
from worker.context import JobContext
from worker.diffusion import (
    SamplePlan,
    color_loss,
    ddpm_denoise,
    image_generators,
    make_grid,
    sample_step_done,
    to_pil,
)

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
PIPELINES = ("DDPMPipeline", "DDIMPipeline")  # model_index.json classes this runner samples from
CLASS_NAMES_FILE = "class_names.json"  # written by ddpm.train: a JSON list of names, in label order


def load_pipeline(ref: str, folder: Path) -> tuple[DDPMPipeline, list[str] | None]:
    """The pipeline, through diffusers' own loading code, and the model's class names if it has them."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model {ref} has no model_index.json: it is not a diffusers pipeline folder")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"model {ref} is a {name}; ddpm.sample samples from {' or '.join(PIPELINES)} models")
    try:
        pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True)  # never unpickle a model's .bin
    except Exception as exc:
        weights.raise_if_refused(f"model {ref}", folder, exc)
        raise ModelNotFound(f"model {ref} could not be loaded as a {name}: {type(exc).__name__}: {exc}") from exc
    class_names = None
    if (folder / CLASS_NAMES_FILE).is_file():
        class_names = json.loads((folder / CLASS_NAMES_FILE).read_text())
        if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
            raise ValueError(f"model {ref}: {CLASS_NAMES_FILE} must be a JSON list of strings")
    return pipe, class_names


def label_number(label: int | str, ref: str, num_classes: int, class_names: list[str] | None) -> int:
    """A class label as the model's class number; names come from its class_names.json."""
    if isinstance(label, str):
        if class_names and label in class_names:
            return class_names.index(label)
        if not label.isdigit():
            known = f"its classes are {', '.join(class_names)}" if class_names else (
                f"it has no {CLASS_NAMES_FILE}, so give a number in [0, {num_classes - 1}]")
            raise ValueError(f"class_label {label!r} is not a class of model {ref}: {known}")
        label = int(label)
    if not 0 <= label < num_classes:
        raise ValueError(f"class_label {label} out of range: model {ref} has classes 0..{num_classes - 1}")
    return label


def check_inputs(
    spec: DDPMSampleSpec, unet: UNet2DModel, scheduler, class_names: list[str] | None
) -> torch.Tensor | None:
    """Check the params against the model; return the class label of each image (None
    for an unconditional model)."""
    if spec.guidance is not None:
        channels = unet.config.in_channels
        if len(spec.guidance.color) != channels:
            want = "[grey]" if channels == 1 else "[r, g, b]" if channels == 3 else f"{channels} values"
            raise ValueError(
                f"guidance.color has {len(spec.guidance.color)} values but model {spec.model} has {channels} "
                f"channel{'s' if channels != 1 else ''}: give {want}"
            )
        if scheduler.config.prediction_type == "sample":
            raise ValueError(
                f"guidance needs a model that predicts epsilon or v_prediction; model {spec.model} predicts the sample"
            )
    num_classes = unet.config.num_class_embeds
    if not num_classes:
        if spec.class_label is not None:
            raise ValueError(f"class_label was given but model {spec.model} is not class-conditioned")
        return None
    if spec.class_label is None:
        return torch.arange(spec.num_images) % num_classes
    given = spec.class_label if isinstance(spec.class_label, list) else [spec.class_label]
    labels = [label_number(label, spec.model, num_classes, class_names) for label in given]
    return torch.tensor(labels * spec.num_images if len(labels) == 1 else labels)


def plan(spec: DDPMSampleSpec, ctx: JobContext, loaded: dict | None = None) -> SamplePlan:
    """Steps 1-2 and 4: the model checked against the params, and `finish(images)`.
    `loaded` (folder -> (pipeline, class names)) lets jobs coalesced into one batch
    load their shared model once."""
    # 1. Resolve the model (job, local folder or hub) and load it with diffusers.
    source = ctx.model_source(spec.model)
    folder = ctx.resolve_model(spec.model)
    device = ctx.device
    loaded = {} if loaded is None else loaded
    if folder not in loaded:
        loaded[folder] = load_pipeline(spec.model, folder)
    pipe, class_names = loaded[folder]
    unet = pipe.unet.to(device).eval()
    scheduler = SCHEDULERS[spec.scheduler].from_config(pipe.scheduler.config)

    # 2. Check the params against the model.
    labels = check_inputs(spec, unet, scheduler, class_names)

    def finish(images) -> dict:
        # 4. Write each image with its settings, then the grid.
        guidance = json.dumps(spec.guidance.model_dump()) if spec.guidance is not None else "none"
        for i, image in enumerate(images):
            meta = {"model": spec.model, "seed": str(spec.seed), "image_seed": str(spec.seed + i), "index": str(i),
                    "steps": str(spec.steps), "scheduler": spec.scheduler, "guidance": guidance}
            if labels is not None:
                meta["class_label"] = str(int(labels[i]))
                if class_names and int(labels[i]) < len(class_names):
                    meta["class_name"] = class_names[int(labels[i])]
            ctx.write_image(f"images/{i:04d}.png", image, meta)
        ctx.write_image("grid.png", make_grid(images))
        return {
            "num_images": len(images),
            "image_size": list(images[0].size),
            "device": device,
            "scheduler": spec.scheduler,
            "steps": spec.steps,
            "model": spec.model,
            "model_source": source,
            "guided": spec.guidance is not None,
        }

    return SamplePlan(ctx, spec, unet, scheduler, labels, finish)


def run(spec: DDPMSampleSpec, ctx: JobContext) -> dict:
    job = plan(spec, ctx)
    unet, scheduler, labels, device = job.unet, job.scheduler, job.labels, ctx.device
    color = spec.guidance.color if spec.guidance is not None else None

    # 3. Denoise in batches. Image i has its own generator (seed + i), so it is the
    #    same whatever batch_size. Progress counts steps across all batches.
    #    (worker/coalesce.py renders several jobs' plans as one batch instead.)
    batches = [range(i, min(i + spec.batch_size, spec.num_images)) for i in range(0, spec.num_images, spec.batch_size)]
    total = len(batches) * spec.steps
    ctx.progress(0, total, "sampling", phase="sample")
    images = []
    for b, batch in enumerate(batches):

        def on_step(i: int, n: int, x, pred_x0, b=b) -> None:
            sample_step_done(ctx, i, n, x, pred_x0, spec.preview_interval if b == 0 else 0, b * spec.steps + i,
                             total, f"batch {b + 1}/{len(batches)} step {i}/{n}")

        out = ddpm_denoise(
            unet,
            scheduler,
            len(batch),
            spec.steps,
            image_generators(spec.seed, batch.start, len(batch)),
            device,
            labels[batch.start : batch.stop] if labels is not None else None,
            on_step,
            guidance_loss=(lambda x0: color_loss(x0, color)) if color is not None else None,
            guidance_scale=spec.guidance.scale if spec.guidance is not None else 0.0,
        )
        images.extend(to_pil(out))
    return job.finish(images)
