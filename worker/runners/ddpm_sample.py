"""ddpm.sample: sample images from a trained DDPM (a job's model or a local folder).

Outputs `images/0000.png…`, `grid.png`, and while it runs `preview.png`: the
current x beside the predicted x0 for the first batch (SEEDS.md §1).
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from shared.specs import DDPMSampleSpec
from worker.context import JobContext
from worker.diffusion import ddpm_denoise, make_grid, preview_figure, seeded_generator, to_pil

PREVIEWS_PER_RUN = 8  # as the source material: every steps // 8 steps, and the last

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def check_inputs(spec: DDPMSampleSpec, unet: UNet2DModel) -> torch.Tensor | None:
    """Class labels for each image, checked against the model's class count."""
    num_classes = unet.config.num_class_embeds
    if not num_classes:
        if spec.class_label is not None:
            raise ValueError(f"class_label was given but model {spec.model} is not class-conditioned")
        return None
    if spec.class_label is None:
        return torch.arange(spec.num_images) % num_classes
    labels = spec.class_label if isinstance(spec.class_label, list) else [spec.class_label] * spec.num_images
    bad = [label for label in labels if label >= num_classes]
    if bad:
        raise ValueError(f"class_label {bad[0]} out of range: model {spec.model} has classes 0..{num_classes - 1}")
    return torch.tensor(labels)


def run(spec: DDPMSampleSpec, ctx: JobContext) -> dict:
    # 1. Load the model through the real diffusers loading code.
    folder = ctx.resolve_model(spec.model)
    device = ctx.device
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").to(device).eval()
    scheduler = SCHEDULERS[spec.scheduler].from_pretrained(folder, subfolder="scheduler")
    labels = check_inputs(spec, unet)
    generator = seeded_generator(spec.seed)

    # 2. Denoise in batches; progress counts steps across all batches.
    batches = [range(i, min(i + spec.batch_size, spec.num_images)) for i in range(0, spec.num_images, spec.batch_size)]
    total = len(batches) * spec.steps
    ctx.progress(0, total, "sampling", phase="sample")
    images = []
    preview_every = max(1, spec.steps // PREVIEWS_PER_RUN)
    for b, batch in enumerate(batches):

        def on_step(i: int, n: int, x, pred_x0, b=b) -> None:
            ctx.check_cancelled()
            ctx.progress(b * spec.steps + i, total, f"batch {b + 1}/{len(batches)} step {i}/{n}")
            if b == 0 and (i % preview_every == 0 or i == n):
                ctx.write_image("preview.png", preview_figure(x, pred_x0), {"step": str(i), "of": str(n)})

        batch_labels = labels[batch.start : batch.stop] if labels is not None else None
        out = ddpm_denoise(unet, scheduler, len(batch), spec.steps, generator, device, batch_labels, on_step)
        images.extend(to_pil(out))

    # 3. Write each image with its settings, then the grid.
    for i, image in enumerate(images):
        meta = {"model": spec.model, "seed": str(spec.seed), "index": str(i), "steps": str(spec.steps),
                "scheduler": spec.scheduler}
        if labels is not None:
            meta["class_label"] = str(int(labels[i]))
        ctx.write_image(f"images/{i:04d}.png", image, meta)
    ctx.write_image("grid.png", make_grid(images))
    return {"num_images": len(images), "image_size": list(images[0].size), "device": device}
