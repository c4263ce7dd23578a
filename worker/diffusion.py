"""Small pieces the DDPM runners share: the denoising loop and image conversion."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from worker.coalesce import each_live


@torch.no_grad()
def ddpm_denoise(
    unet,
    scheduler,
    num_images: int,
    steps: int,
    generator: torch.Generator | list[torch.Generator],
    device: str,
    class_labels: torch.Tensor | None = None,
    on_step: Callable[..., None] | None = None,
    *,
    guidance_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    guidance_scale: float = 0.0,
) -> torch.Tensor:
    """The book's sampling loop: start from noise, predict, `scheduler.step`.
    Returns images in [-1, 1] on the CPU. Noise is drawn on the CPU from `generator`
    so a seed gives the same images on any device. `on_step(i, n, x, pred_x0)` sees
    the current sample and the model's guess of the final image after each step.

    `generator` is one generator for the whole batch, or one per image: then image i
    draws its starting noise and every step's noise from `generator[i]` alone, so it
    comes out the same whatever batch it is in.

    `guidance_loss(x0) -> (N,)` turns on the book's loss guidance: before each
    scheduler step, x moves against the gradient w.r.t. x of `guidance_scale` times
    the loss of the (unclipped) predicted x0. Per-image losses are summed, so one
    image's nudge does not depend on the others in its batch."""
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(f"got {len(generator)} generators for {num_images} images: give one, or one per image")
    cfg = unet.config
    height, width = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else cfg.sample_size
    shape = (num_images, cfg.in_channels, height, width)
    x = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
    labels = class_labels.to(device) if class_labels is not None else None
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        # 1. Predict the noise.
        noise_pred = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        # 2. Guidance: nudge x so that its predicted x0 lowers the loss (the UNet's output stays fixed).
        if guidance_loss is not None:
            with torch.enable_grad():
                x = x.detach().requires_grad_()
                loss = guidance_loss(predicted_x0(scheduler, noise_pred, t, x)).sum() * guidance_scale
                x = (x - torch.autograd.grad(loss, x)[0]).detach()
        # 3. Step to the previous timestep.
        out = scheduler.step(noise_pred, t, x, generator=generator)
        x = out.prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps), x, out.pred_original_sample)
    return x.clamp(-1, 1).cpu()


def sample_step_done(ctx, i: int, n: int, x, pred_x0, preview_every: int, done: int, total: int,
                     message: str) -> None:
    """After sampling step i of n: cancel check, progress, and every `preview_every`
    steps (0: never) the book's figure, x beside the predicted x0; preview.png is
    always the latest."""
    ctx.check_cancelled()
    ctx.progress(done, total, message)
    if preview_every and (i % preview_every == 0 or i == n):
        figure, meta = preview_figure(x, pred_x0), {"step": str(i), "of": str(n)}
        ctx.write_image(f"previews/step-{i:04d}.png", figure, meta)
        ctx.write_image("preview.png", figure, meta)


@dataclass
class SamplePlan:
    """One ddpm.sample job, planned but not yet sampled: its model, scheduler and
    class labels, and `finish(images) -> result`, which writes its outputs."""

    ctx: object  # the job's JobContext
    spec: object
    unet: torch.nn.Module
    scheduler: object
    labels: torch.Tensor | None
    finish: Callable[[list[Image.Image]], dict]


@torch.no_grad()
def ddpm_denoise_coalesced(plans: list[SamplePlan], device: str,
                           on_error: Callable[[int, Exception], None]) -> dict[int, list[Image.Image]]:
    """Several unguided jobs' images (same model, steps and scheduler) through the UNet
    as one batch: the loop of `ddpm_denoise`, with each job's own scheduler,
    generators (image i of a job seeded `seed + i`, as alone), labels, progress,
    previews and cancel. A job whose step hook raises leaves the batch through
    `on_error(index, exc)`; WorkerShuttingDown stops the whole batch. Returns
    {plan index: images} for the jobs that finished."""
    unet = plans[0].unet
    cfg = unet.config
    height, width = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else cfg.sample_size
    generators = [image_generators(plan.spec.seed, 0, plan.spec.num_images) for plan in plans]
    x = [randn_tensor((len(g), cfg.in_channels, height, width), generator=g, device=torch.device(device),
                      dtype=torch.float32) for g in generators]
    for plan in plans:
        plan.scheduler.set_timesteps(plan.spec.steps)
    timesteps = plans[0].scheduler.timesteps
    n = len(timesteps)
    note = f"batched with {len(plans) - 1} other job(s)"
    live = each_live(list(range(len(plans))), on_error,
                     lambda k: plans[k].ctx.progress(0, n, f"sampling, {note}", phase="sample"))
    for i, t in enumerate(timesteps):
        if not live:
            break
        # 1. One UNet call on every live job's images.
        sizes = [len(x[k]) for k in live]
        x_in = torch.cat([plans[k].scheduler.scale_model_input(x[k], t) for k in live])
        labels = torch.cat([plans[k].labels for k in live]).to(device) if plans[0].labels is not None else None
        noise_pred = unet(x_in, t, class_labels=labels).sample
        # 2. Each job's scheduler step, with its own generators.
        pred_x0 = {}
        for k, pred in zip(live, noise_pred.split(sizes)):
            out = plans[k].scheduler.step(pred, t, x[k], generator=generators[k])
            x[k], pred_x0[k] = out.prev_sample, out.pred_original_sample
        # 3. Each job's cancel check, progress and previews; a job that stops leaves the batch.
        live = each_live(live, on_error, lambda k: sample_step_done(
            plans[k].ctx, i + 1, n, x[k], pred_x0[k], plans[k].spec.preview_interval, i + 1, n,
            f"step {i + 1}/{n}, {note}"))
    return {k: to_pil(x[k].clamp(-1, 1).cpu()) for k in live}


def predicted_x0(scheduler, model_output: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """The model's guess of the clean image at timestep t, differentiable in x and not
    clipped (a clipped x0 has no gradient where it is out of range)."""
    alpha_bar = scheduler.alphas_cumprod[int(t)].to(device=x.device, dtype=x.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if kind == "v_prediction":
        return alpha_bar.sqrt() * x - (1 - alpha_bar).sqrt() * model_output
    if kind == "sample":
        return model_output
    raise ValueError(f"prediction_type {kind!r} is not one of epsilon, v_prediction, sample")


def color_loss(x0: torch.Tensor, color: list[float]) -> torch.Tensor:
    """The book's colour loss, per image: the mean absolute distance of x0 (in [-1, 1]) to `color`
    (values in [0, 1], one per channel) mapped to [-1, 1]."""
    target = torch.tensor(color, device=x0.device, dtype=x0.dtype).view(1, -1, 1, 1) * 2 - 1
    return (x0 - target).abs().mean(dim=(1, 2, 3))


def image_generators(seed: int, first: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, image i seeded `seed + i`: image i is the same in any batch."""
    return [seeded_generator(seed + i) for i in range(first, first + count)]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] to PIL images (L for one channel, RGB for three)."""
    arr = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), 255 if images[0].mode == "L" else (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


PREVIEW_GAP_PX = 8  # white space between the two grids of a preview


def preview_figure(x: torch.Tensor, pred_x0: torch.Tensor) -> Image.Image:
    """The book's figure: the current x (left) beside the predicted x0 (right)."""
    left = make_grid(to_pil(x.clamp(-1, 1).cpu()))
    right = make_grid(to_pil(pred_x0.clamp(-1, 1).cpu()))
    size = (left.width * 2 + PREVIEW_GAP_PX, left.height)
    figure = Image.new(left.mode, size, 255 if left.mode == "L" else (255, 255, 255))
    figure.paste(left, (0, 0))
    figure.paste(right, (left.width + PREVIEW_GAP_PX, 0))
    return figure


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def count_params(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def loss_plot_png(losses: list[float], path) -> None:
    """The loss curve, whole run and (once there are enough steps) the tail, as the book plots it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(losses) + 1)
    tail_from = min(400, len(losses) // 2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, losses, linewidth=0.8)
    axes[0].set(title="loss", xlabel="step", yscale="log")
    axes[1].plot(steps[tail_from:], losses[tail_from:], linewidth=0.8)
    axes[1].set(title=f"loss from step {tail_from + 1}", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
