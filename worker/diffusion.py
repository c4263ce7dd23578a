"""Small pieces the DDPM runners share: the denoising loop and image conversion."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def ddpm_denoise(
    unet,
    scheduler,
    num_images: int,
    steps: int,
    generator: torch.Generator,
    device: str,
    class_labels: torch.Tensor | None = None,
    on_step: Callable[..., None] | None = None,
) -> torch.Tensor:
    """The loop of SEEDS.md §1/§4: start from noise, predict, `scheduler.step`.
    Returns images in [-1, 1] on the CPU. Noise is drawn on the CPU from `generator`
    so a seed gives the same images on any device. `on_step(i, n, x, pred_x0)` sees
    the current sample and the model's guess of the final image after each step."""
    cfg = unet.config
    shape = (num_images, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(shape, generator=generator).to(device)
    labels = class_labels.to(device) if class_labels is not None else None
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        noise_pred = unet(x, t, class_labels=labels).sample
        out = scheduler.step(noise_pred, t, x, generator=generator)
        x = out.prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps), x, out.pred_original_sample)
    return x.clamp(-1, 1).cpu()


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


def preview_figure(x: torch.Tensor, pred_x0: torch.Tensor) -> Image.Image:
    """SEEDS.md §1's figure: the current x (left) beside the predicted x0 (right)."""
    left = make_grid(to_pil(x.clamp(-1, 1).cpu()))
    right = make_grid(to_pil(pred_x0.clamp(-1, 1).cpu()))
    figure = Image.new(left.mode, (left.width * 2 + 8, left.height), 255 if left.mode == "L" else (255, 255, 255))
    figure.paste(left, (0, 0))
    figure.paste(right, (left.width + 8, 0))
    return figure


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def count_params(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def loss_plot_png(losses: list[float], path) -> None:
    """The loss curve, whole run and (once there are enough steps) the tail, as in SEEDS.md §2."""
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
