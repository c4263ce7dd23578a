"""ddpm.schedule_plot: how much signal and noise each timestep keeps under several
noise schedules, and one image noised along each of them (the book's figures).

Outputs `schedules.png` (sqrt(alpha_bar_t), the signal, solid, and
sqrt(1 - alpha_bar_t), the noise, dashed, one colour per schedule), `noised.png`
(one row per schedule: the image noised with `scheduler.add_noise` at
linspace(0, T-1, n), the same noise in every row) and `schedules.json` (each
schedule's settings and its curves, downsampled).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageOps

from shared.specs import DDPMSchedulePlotSpec, NoiseSchedule
from worker.context import JobContext
from worker.data.digits import load_digits_dataset
from worker.diffusion import make_grid, seeded_generator, to_pil

CURVE_POINTS = 200  # points per curve in schedules.json, t = 0 and T - 1 included
DIGIT_INDEX = 0  # which of the bundled digits to noise (a zero)


def load_image(spec: DDPMSchedulePlotSpec, ctx: JobContext) -> torch.Tensor:
    """The image to noise, (1, C, S, S) in [-1, 1]: a bundled digit, or an uploaded
    image centre-cropped to a square (grayscale stays one channel)."""
    if spec.image == "digits":
        images, _ = load_digits_dataset(spec.image_size)
        return images[DIGIT_INDEX : DIGIT_INDEX + 1]
    path, _ = ctx.fetch_upload(spec.image, "image")
    with Image.open(path) as img:
        img = img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16") else "RGB")
        img = ImageOps.fit(img, (spec.image_size, spec.image_size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr).div(127.5).sub(1.0).unsqueeze(0)


def make_scheduler(schedule: NoiseSchedule, num_train_timesteps: int) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
    )


def plot_curves(curves: list[dict], num_train_timesteps: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(num_train_timesteps)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, curve in enumerate(curves):
        color = f"C{k}"
        ax.plot(t, curve["signal_full"], color=color, linestyle="-", label=f"{curve['label']}: signal")
        ax.plot(t, curve["noise_full"], color=color, linestyle="--", label=f"{curve['label']}: noise")
    ax.set(
        title=r"signal $\sqrt{\bar\alpha_t}$ (solid) and noise $\sqrt{1-\bar\alpha_t}$ (dashed)",
        xlabel="timestep t",
        ylim=(0, 1.02),
        xlim=(0, num_train_timesteps - 1),
    )
    ax.legend(fontsize="small", ncol=2 if len(curves) > 2 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(spec: DDPMSchedulePlotSpec, ctx: JobContext) -> dict:
    T = spec.num_train_timesteps
    n = spec.num_timesteps_shown
    ctx.progress(0, len(spec.schedules), "noise schedules", phase="plot")

    # 1. The image, and one noise draw per column shared by every row (a fixed seed).
    x0 = load_image(spec, ctx)
    noise = torch.randn((n, *x0.shape[1:]), generator=seeded_generator(spec.seed))
    timesteps = torch.linspace(0, T - 1, n).long()  # as the source material: linspace(0, 999, 8)
    curve_t = np.unique(np.linspace(0, T - 1, min(T, CURVE_POINTS)).round().astype(int))

    # 2. Each schedule: its signal and noise curves, and the image noised at the shown timesteps.
    curves, rows = [], []
    for k, schedule in enumerate(spec.schedules):
        ctx.check_cancelled()
        scheduler = make_scheduler(schedule, T)
        alpha_bar = scheduler.alphas_cumprod.double().numpy()
        signal, noise_level = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
        config = {"beta_schedule": schedule.beta_schedule}
        if schedule.beta_schedule != "squaredcos_cap_v2":  # the cosine schedule ignores the betas
            config.update(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
        curves.append({
            "label": schedule.display_label,
            "config": config,
            "t": curve_t.tolist(),
            "signal": np.round(signal[curve_t], 6).tolist(),
            "noise": np.round(noise_level[curve_t], 6).tolist(),
            "signal_full": signal,
            "noise_full": noise_level,
        })
        rows.append(scheduler.add_noise(x0.expand(n, -1, -1, -1), noise, timesteps))
        ctx.progress(k + 1, len(spec.schedules), f"schedule {k + 1}/{len(spec.schedules)}: {schedule.display_label}")

    # 3. The figures and the numbers.
    png = ctx.workdir / "schedules.png"
    plot_curves(curves, T, png)
    ctx.write_file("schedules.png", png, "image/png")
    labels = [c["label"] for c in curves]
    ctx.write_image(
        "noised.png",
        make_grid(to_pil(torch.cat(rows).clamp(-1, 1)), cols=n),
        {"rows": labels, "timesteps": timesteps.tolist()},
    )
    ctx.write_json("schedules.json", {
        "num_train_timesteps": T,
        "timesteps_shown": timesteps.tolist(),
        "image": spec.image,
        "seed": spec.seed,
        "schedules": [{k: v for k, v in c.items() if not k.endswith("_full")} for c in curves],
    })
    return {"schedules": labels, "timesteps_shown": timesteps.tolist(), "image_size": spec.image_size}
