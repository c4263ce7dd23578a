"""ddpm.train: train a diffusers UNet2DModel with a DDPMScheduler.

The loop is the book's and the guide's (noise, timesteps, `add_noise`, predict,
MSE, AdamW) with what users of diffusers' `train_unconditional.py` expect around
it: accelerate mixed precision, gradient accumulation and clipping, lr warmup, EMA,
checkpoints that a re-run resumes from, and sample grids along the way.

Outputs: `model/` (a DDPMPipeline folder in safetensors with a README.md model card,
plus `class_names.json` when class-conditioned), `loss.csv`, `loss.png`, `samples.png`,
`samples/step-000500.png`, `checkpoints/step-000500.safetensors` and `metrics.json`.

All randomness in the loop (data order, flips, noise, timesteps) comes from
generators seeded from `seed` whose state is checkpointed, so a resumed run
continues the uninterrupted one's loss trajectory.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from shared.errors import JobCancelled, WorkerShuttingDown
from shared.specs import DDPMTrainSpec
from worker import checkpoints
from worker.context import JobContext
from worker.data.datasets import TrainData, load_dataset
from worker.diffusion import count_params, ddpm_denoise, loss_plot_png, make_grid, seeded_generator, to_pil
from worker.model_card import write_model_card

LOSS_FLUSH_STEPS = 25  # read losses back from the device in blocks: no sync per step on a GPU


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
        # GroupNorm needs groups that divide every level's channels: 32 where possible.
        norm_num_groups=max(g for g in range(1, 33) if all(c % g == 0 for c in spec.block_out_channels)),
    )


def make_accelerator(mixed_precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide singletons, and a worker runs many jobs with
    # different precisions one after another.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class BatchOrder:
    """Micro-batch m of the run: epoch m // per_epoch, shuffled by a generator seeded
    with (seed, epoch), so any position can be recomputed after a resume."""

    def __init__(self, n: int, batch_size: int, seed: int, device: str):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, m: int) -> torch.Tensor:
        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).to(self.device)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


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


def sample_grid(spec: DDPMTrainSpec, unet, noise_scheduler, data: TrainData, device: str, on_step=None):
    """A grid of `num_samples` from the current weights, one column per class when
    class-conditioned. Its own generator: the training RNG is not touched."""
    scheduler_cls = DDIMScheduler if spec.sample_scheduler == "ddim" else DDPMScheduler
    scheduler = scheduler_cls.from_config(noise_scheduler.config)
    n_cls = len(data.class_names) if data.class_names else None
    labels = torch.arange(spec.num_samples) % n_cls if n_cls else None
    unet.eval()
    out = ddpm_denoise(unet, scheduler, spec.num_samples, spec.sample_steps, seeded_generator(spec.seed), device,
                       labels, on_step)
    unet.train()
    return make_grid(to_pil(out), cols=min(n_cls, spec.num_samples) if n_cls else None)


def run(spec: DDPMTrainSpec, ctx: JobContext) -> dict:
    # 1. Device and precision. fp16 autocast needs a GPU; a CPU worker trains in fp32.
    device = ctx.device
    mixed_precision = spec.mixed_precision
    if mixed_precision == "fp16" and device == "cpu":
        ctx.log.warning("mixed_precision fp16 needs a GPU; this CPU worker trains in fp32")
        mixed_precision = "no"
    accelerator = make_accelerator(mixed_precision, cpu=device == "cpu")
    channels_last = spec.channels_last if spec.channels_last is not None else device == "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 2. Data: the whole set lives on the device as uint8.
    ctx.progress(0, None, f"loading dataset {spec.dataset}", phase="load")
    data = load_dataset(spec, ctx)
    images = data.images.to(device)
    labels = data.labels.to(device) if data.labels is not None else None
    if len(images) < spec.batch_size:
        raise ValueError(f"batch_size {spec.batch_size} is larger than the dataset ({len(images)} images)")
    order = BatchOrder(len(images), spec.batch_size, spec.seed, device)
    accum = spec.gradient_accumulation_steps
    total_steps = spec.max_steps or math.ceil(spec.epochs * order.per_epoch / accum)
    ctx.log.info("dataset %s: %d images, %d channels, %dx%d px, classes %s", spec.dataset, len(images),
                 images.shape[1], spec.image_size, spec.image_size, data.class_names)

    # 3. Model, noise schedule, optimizer, lr schedule, EMA; all seeded.
    torch.manual_seed(spec.seed)
    unet = build_unet(spec, images.shape[1], len(data.class_names) if labels is not None else None).to(device)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
        prediction_type=spec.prediction_type,
    )
    # The fused AdamW is one kernel over all tensors on CPU too: 2.3 ms a step instead of
    # 9.8 for the digits UNet's 269 tensors (bench/ddpm_train.py), same update.
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=spec.learning_rate, betas=(spec.adam_beta1, spec.adam_beta2),
        weight_decay=spec.adam_weight_decay, eps=spec.adam_epsilon, fused=True,
    )
    lr_scheduler = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=spec.lr_warmup_steps,
                                 num_training_steps=total_steps)
    ema = None
    if spec.use_ema:
        ema = EMAModel(unet.parameters(), decay=spec.ema_max_decay, use_ema_warmup=True, inv_gamma=spec.ema_inv_gamma,
                       power=spec.ema_power, foreach=True, model_cls=UNet2DModel, model_config=unet.config)
        ema.to(device)
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if spec.compile and device == "cuda":
        model = torch.compile(model)
    rng = torch.Generator(device).manual_seed(spec.seed)
    ctx.log.info("UNet with %.2f M params; %d steps of %d x %d images; precision %s", count_params(unet) / 1e6,
                 total_steps, accum, spec.batch_size, mixed_precision)

    # 4. Resume from the last complete checkpoint an earlier attempt left, if any.
    params = spec.model_dump(mode="json")
    start, losses, resumed_from = 0, [], None
    state = checkpoints.load_latest(ctx, params, ctx.log)
    if state is not None:
        unet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
            ema.to(device)  # the checkpoint is read onto the CPU; EMA steps next to the weights
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        rng.set_state(state["rng"])
        start, losses, resumed_from = state["step"], list(state["losses"]), state["step"]
        ctx.log.info("resumed from step %d", start)

    def checkpoint(step: int) -> None:
        flush()
        ctx.progress(step, total_steps, f"step {step}/{total_steps}: writing checkpoint")
        checkpoints.save(ctx, step, {
            "spec": params, "step": step, "losses": losses,
            "model": unet.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rng.get_state(),
        }, spec.checkpoints_keep)

    def samples(step: int) -> None:
        if ema is not None:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
        grid = sample_grid(spec, unet, noise_scheduler, data, device)
        if ema is not None:
            ema.restore(unet.parameters())
        ctx.write_image(f"samples/step-{step:06d}.png", grid, {"step": str(step)})

    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()

    # 5. The loop: `accum` micro-batches per optimizer step.
    note = f"resumed from step {start}" if resumed_from is not None else "training"
    ctx.progress(start, total_steps, note, phase="train")
    model.train()
    done, side_s, started = start, 0.0, time.perf_counter()  # done: optimizer steps completed
    try:
        for step in range(start + 1, total_steps + 1):
            ctx.check_cancelled()
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                idx = order((step - 1) * accum + micro)
                x = images[idx].float().div_(127.5).sub_(1.0)
                if spec.random_flip:
                    flip = torch.rand(len(x), generator=rng, device=device) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                noise = torch.randn(x.shape, generator=rng, device=device)
                t = torch.randint(0, spec.num_train_timesteps, (len(x),), generator=rng, device=device)
                noisy = noise_scheduler.add_noise(x, noise, t)
                if spec.prediction_type == "epsilon":
                    target = noise
                elif spec.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(x, noise, t)
                else:
                    target = x
                if channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                pred = model(noisy, t, class_labels=labels[idx] if labels is not None else None).sample
                loss = F.mse_loss(pred.float(), target)
                accelerator.backward(loss / accum)
                step_loss += loss.detach() / accum
            if spec.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unet.parameters())
            pending.append(step_loss)
            if len(pending) >= LOSS_FLUSH_STEPS or step == total_steps:
                flush()
            loss_note = f" loss {losses[-1]:.4f}" if losses else ""
            ctx.progress(step, total_steps, f"step {step}/{total_steps}{loss_note}")
            done = step

            side_started = time.perf_counter()
            if spec.checkpoint_every and step % spec.checkpoint_every == 0:
                checkpoint(step)
            if spec.sample_every and step % spec.sample_every == 0:
                samples(step)
            side_s += time.perf_counter() - side_started
    except WorkerShuttingDown:
        # A deploy: keep the progress for the worker that picks the job up next.
        if spec.checkpoint_every and done > start and done % spec.checkpoint_every:
            checkpoint(done)
        raise
    except JobCancelled:
        flush()
        write_loss(ctx, losses)  # keep what was learned so far visible: the partial curve
        raise
    train_s = time.perf_counter() - started - side_s
    trained_steps = total_steps - start
    metrics = {
        "steps": total_steps,
        "resumed_from_step": resumed_from,
        "final_loss": losses[-1],
        "wall_time_s": round(train_s, 3),
        "images_per_s": round(trained_steps * accum * spec.batch_size / train_s, 1) if trained_steps else None,
        "num_params": count_params(unet),
        "dataset_size": len(images),
        "classes": data.class_names,
        "mixed_precision": mixed_precision,
        "device": device,
    }

    # 6. Export the model (EMA weights when EMA is on) as a DDPMPipeline folder, with a
    # model card that says how to sample it; all of it before the folder is stored.
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet = unet.to(memory_format=torch.contiguous_format).eval()
    model_dir = ctx.workdir / "model"
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(model_dir, safe_serialization=True)
    if data.class_names:
        (model_dir / "class_names.json").write_text(json.dumps(data.class_names))
    write_model_card(model_dir, spec, ctx.job_id, metrics, images.shape[1])
    ctx.write_dir("model", model_dir)
    write_loss(ctx, losses)

    # 7. Final samples, and the run's figures.
    def on_sample_step(i: int, n: int, *_) -> None:
        ctx.check_cancelled()
        ctx.progress(i, n, f"sampling {i}/{n}", phase="sample")

    ctx.write_image("samples.png", sample_grid(spec, unet, noise_scheduler, data, device, on_sample_step))
    ctx.write_json("metrics.json", metrics)

    # 8. The grid's sampling was the last thing reported; a finished job shows its training.
    ctx.progress(total_steps, total_steps, f"trained {total_steps}/{total_steps} steps, final loss {losses[-1]:.4f}")
    return metrics
