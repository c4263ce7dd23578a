"""ddpm.train: train a diffusers UNet2DModel with a DDPMScheduler.

The loop is the one of SEEDS.md §2 and §4: sample noise and timesteps, noise the
batch with `scheduler.add_noise`, predict the noise, MSE, AdamW. Outputs:
`model/` (a DDPMPipeline folder in safetensors), `loss.csv`, `loss.png`,
`samples.png` and `metrics.json`.
"""
from __future__ import annotations

import csv
import io
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from shared.errors import JobCancelled
from shared.specs import DDPMTrainSpec
from worker.context import JobContext
from worker.data.digits import NUM_CLASSES, load_digits_dataset
from worker.diffusion import count_params, ddpm_denoise, loss_plot_png, make_grid, seeded_generator, to_pil


def build_unet(spec: DDPMTrainSpec, in_channels: int, num_classes: int | None) -> UNet2DModel:
    levels = range(len(spec.block_out_channels))
    attn = set(spec.attention_levels)
    return UNet2DModel(
        sample_size=spec.image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=spec.layers_per_block,
        block_out_channels=tuple(spec.block_out_channels),
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)),
        num_class_embeds=num_classes,
        norm_num_groups=min(32, min(spec.block_out_channels)),
    )


def write_loss(ctx: JobContext, losses: list[float]) -> None:
    if not losses:
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss"])
    writer.writerows((i + 1, f"{loss:.6f}") for i, loss in enumerate(losses))
    ctx.write_bytes("loss.csv", buf.getvalue().encode(), "text/csv")
    png = ctx.workdir / "loss.png"
    loss_plot_png(losses, png)
    ctx.write_file("loss.png", png, "image/png")


def run(spec: DDPMTrainSpec, ctx: JobContext) -> dict:
    # 1. Device and seed are explicit.
    device = ctx.device
    torch.manual_seed(spec.seed)
    generator = seeded_generator(spec.seed)

    # 2. Data: the whole (small) dataset lives on the device.
    images, labels = load_digits_dataset(spec.image_size)
    images, labels = images.to(device), labels.to(device)
    num_classes = NUM_CLASSES if spec.class_conditional else None
    ctx.log.info("dataset %s: %d images of %dx%d", spec.dataset, len(images), spec.image_size, spec.image_size)

    # 3. Model, scheduler, optimizer.
    unet = build_unet(spec, images.shape[1], num_classes).to(device)
    scheduler = DDPMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=spec.learning_rate)
    ctx.log.info("UNet with %.2f M params", count_params(unet) / 1e6)

    # 4. The training loop: shuffled epochs until max_steps optimizer steps.
    losses: list[float] = []
    started = time.perf_counter()
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    ctx.progress(0, spec.max_steps, "training", phase="train")
    try:
        for step in range(1, spec.max_steps + 1):
            ctx.check_cancelled()
            if cursor + spec.batch_size > len(order):
                order, cursor = torch.randperm(len(images), generator=generator), 0
            idx = order[cursor : cursor + spec.batch_size].to(device)
            cursor += spec.batch_size
            x = images[idx]
            noise = torch.randn_like(x)
            t = torch.randint(0, spec.num_train_timesteps, (len(x),), device=device)
            noisy = scheduler.add_noise(x, noise, t)
            pred = unet(noisy, t, class_labels=labels[idx] if num_classes else None).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            ctx.progress(step, spec.max_steps, f"step {step}/{spec.max_steps} loss {losses[-1]:.4f}")
    except JobCancelled:
        # Keep what was learned so far visible: the partial loss curve.
        write_loss(ctx, losses)
        raise
    train_s = time.perf_counter() - started

    # 5. Export the model as a DDPMPipeline folder (safetensors).
    unet.eval()
    model_dir = ctx.workdir / "model"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(model_dir, safe_serialization=True)
    ctx.write_dir("model", model_dir)
    write_loss(ctx, losses)

    # 6. A grid of samples from the trained model (one row per class when conditioned).
    n = spec.num_samples
    sample_labels = torch.arange(n) % NUM_CLASSES if num_classes else None

    def on_sample_step(i: int, total: int, *_) -> None:
        ctx.check_cancelled()
        ctx.progress(i, total, f"sampling {i}/{total}", phase="sample")

    samples = ddpm_denoise(unet, scheduler, n, spec.sample_steps, generator, device, sample_labels, on_sample_step)
    ctx.write_image("samples.png", make_grid(to_pil(samples), cols=NUM_CLASSES if num_classes else None))

    metrics = {
        "steps": spec.max_steps,
        "final_loss": losses[-1],
        "wall_time_s": round(train_s, 3),
        "images_per_s": round(spec.max_steps * spec.batch_size / train_s, 1),
        "num_params": count_params(unet),
        "device": device,
    }
    ctx.write_json("metrics.json", metrics)
    return metrics
