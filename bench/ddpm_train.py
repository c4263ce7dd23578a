"""The service's DDPM trainer against the book's plain training loop,
with the same model, the same batch size and the same data.

The loop: fp32, AdamW lr 1e-4, `noise = randn_like(x)`, `t = randint(0, T, (B,))`,
`noisy = scheduler.add_noise(x, noise, t)`, `pred = model(noisy, t).sample`,
`loss = mse(pred, noise)`, backward, step, zero_grad, `losses.append(loss.item())`.
Its batches are drawn from the whole set held as one normalised float tensor
(shuffled each epoch), the leanest form of the book's DataLoader; the model is the
service's `build_unet` of the preset, and class labels are passed when the preset is
class-conditioned (the loop of the book's Fashion-MNIST model).

The service: a `ddpm.train` job through the real in-process Executor (claim, the
runner, artifacts to local storage, progress and outcome in SQLite) on a temp
embedded data dir, with the service's default progress and cancel-check intervals.
Its options are set to match the loop where the preset differs: epsilon prediction,
a constant lr of 1e-4 with no warmup, no gradient clipping, no EMA, no checkpoints
and no sample grids along the way.

Each repeat builds both afresh and runs `--warmup` + `--steps` steps of each; the
last `--steps` are timed (the job's from the moments it reports those steps done,
see StepClock), so first-step costs (allocation, torch.compile) stay out of the
rate. Repeats alternate loop and job, and the best of each is reported. The job's
whole wall time (data, model, export, a one-step final sample grid) is reported
beside it.

    .venv/bin/python bench/ddpm_train.py                      # CPU: the digits preset
    .venv/bin/python bench/ddpm_train.py --steps 20 --repeat 2
    .venv/bin/python bench/ddpm_train.py --device cuda        # GPU: book-64 on the digits as 64 px RGB

On CUDA the loop stays the fp32 anchor (TF32 convolutions, as PyTorch's defaults)
at the preset's batch (16 for book-64, the book's), and the service runs with its CUDA options: bf16 autocast, channels_last,
the fused AdamW (always on CUDA), TF32, `--service-batch` (256) and `--compile`.
There the data is the digits as an RGB upload zip at the preset's size, as the
book's butterflies cannot be downloaded offline (speed does not depend on content),
and `--warmup` and `--steps` are rounded up to whole blocks of the trainer's loss
read-back (LOSS_FLUSH_STEPS), the steps at which its clock waits for the GPU.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

# The repo root in place of bench/ itself: bench/queue.py must not shadow the standard library's queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.sd_cpu import ServiceRunner  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.specs import DDPMTrainSpec, validate_params  # noqa: E402

# What the service sets to match the book's loop where the preset differs.
MATCH_LOOP = {
    "prediction_type": "epsilon", "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0,
    "max_grad_norm": 0.0, "use_ema": False, "checkpoint_every": 0, "sample_every": 0, "random_flip": False,
    # The final sample grid is outside the timed loop; kept to one denoising step.
    "sample_steps": 1, "num_samples": 10,
}
CUDA_SERVICE = {"mixed_precision": "bf16", "channels_last": True}


class TrainService(ServiceRunner):
    """ServiceRunner with the service's default progress and cancel-check intervals
    (bench/sd_cpu.py relaxes them to 1 s), as a worker runs a training job."""

    def __init__(self, data_dir: Path, models_dir: Path):
        from worker.executor import Executor

        super().__init__(data_dir, models_dir)
        defaults = Settings.embedded(data_dir)
        self.settings = replace(self.settings, progress_interval_s=defaults.progress_interval_s,
                                cancel_check_interval_s=defaults.cancel_check_interval_s)
        self.executor = Executor(self.settings, app=None)

    def upload_digits(self, count: int | None = None, rgb: bool = False) -> str:
        """The first `count` digits as a zip of 8x8 PNGs in class folders, uploaded
        through the real upload code; returns `upload:<id>`."""
        from shared.storage import make_storage
        from shared.uploads import save_upload, upload_ref
        from worker.data.digits import digits_images

        images, labels = digits_images()
        count = count or len(images)
        path = Path(self.settings.cache_dir) / f"digits-{count}{'-rgb' if rgb else ''}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w") as zf:
            for i, (image, label) in enumerate(zip(images[:count], labels[:count])):
                buf = io.BytesIO()
                (image.convert("RGB") if rgb else image).save(buf, format="PNG")
                zf.writestr(f"digits/{label}/{i:04d}.png", buf.getvalue())
        upload = save_upload(self.sessions, make_storage(self.settings), self.settings, path.name, path)
        return upload_ref(upload.id)


def machine_info() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}{gpu}"


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


class StepClock:
    """When each of a ddpm.train job's optimizer steps ended, in this process's clock.
    The trainer reports progress after every step (only the database writes are
    throttled), so the first report of each step in the `train` phase marks it. On
    CUDA the report is synchronous with the GPU only at the steps where the trainer
    reads its losses back (every LOSS_FLUSH_STEPS, and the last)."""

    def __init__(self):
        self.at: dict[int, float] = {}

    def __enter__(self) -> "StepClock":
        from worker.context import JobContext

        original = self._original = JobContext.progress

        def progress(ctx, step, total, message=None, phase=None):
            if step >= 1 and ctx._phase == "train":
                self.at.setdefault(step, time.perf_counter())
            return original(ctx, step, total, message, phase)

        JobContext.progress = progress
        return self

    def __exit__(self, *exc) -> None:
        from worker.context import JobContext

        JobContext.progress = self._original


def digits_like_the_service(spec: DDPMTrainSpec, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits through the service's own preprocessing (worker/data/datasets.py),
    as uint8 (N, C, S, S), and their labels."""
    from worker.data.datasets import preprocess
    from worker.data.digits import digits_images

    images, labels = digits_images()
    arrays = np.stack([preprocess(img, spec.image_size, spec.resize_mode, channels) for img in images])
    return torch.from_numpy(arrays), torch.tensor(labels)


def book_loop(spec: DDPMTrainSpec, images: torch.Tensor, labels: torch.Tensor | None, warmup: int, steps: int,
              device: str, seed: int = 0) -> float:
    """The book's loop on a freshly built model for `warmup` + `steps` steps; returns
    the seconds of the last `steps`."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from worker.runners.ddpm_train import build_unet

    torch.manual_seed(seed)
    data = images.to(device).float().div(127.5).sub(1.0)
    labels = labels.to(device) if labels is not None else None
    model = build_unet(spec, data.shape[1], int(labels.max()) + 1 if labels is not None else None).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.beta_schedule,
                              beta_start=spec.beta_start, beta_end=spec.beta_end)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    per_epoch = len(data) // spec.batch_size
    losses = []
    if device == "cuda":  # PyTorch's defaults (the service's jobs turn TF32 matmuls on in this process)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    started = None
    for step in range(warmup + steps):
        if step == warmup:  # loss.item() below has waited for the device
            started = time.perf_counter()
        if step % per_epoch == 0:
            perm = torch.randperm(len(data), device=device)
        idx = perm[(step % per_epoch) * spec.batch_size:(step % per_epoch + 1) * spec.batch_size]
        x = data[idx]
        noise = torch.randn_like(x)
        t = torch.randint(0, spec.num_train_timesteps, (len(x),), device=device)
        noisy = scheduler.add_noise(x, noise, t)
        pred = model(noisy, t, class_labels=labels[idx] if labels is not None else None).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", default=None, help="ddpm.train preset (default: digits on CPU, book-64 on CUDA)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them in each repeat")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the best of each is reported")
    parser.add_argument("--service-batch", type=int, default=256, help="CUDA: the service's batch size")
    parser.add_argument("--compile", action="store_true", help="CUDA: the service also torch.compiles the UNet")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--params", default="{}", help="JSON: more ddpm.train params for the service's job")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddpm_train.jsonl"))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if not cuda and torch.cuda.is_available():
        print("note: a CUDA device is visible, so the service's job trains on it; use --device cuda", file=sys.stderr)
    torch.set_num_threads(args.threads)
    preset = args.preset or ("book-64" if cuda else "digits")
    if cuda:
        from worker.runners.ddpm_train import LOSS_FLUSH_STEPS

        args.warmup, args.steps = (-(-n // LOSS_FLUSH_STEPS) * LOSS_FLUSH_STEPS for n in (args.warmup, args.steps))

    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-") as tmp:
        service = TrainService(Path(tmp) / "data", Path(tmp) / "models")
        params = {"preset": preset, **MATCH_LOOP}
        loop_spec = validate_params("ddpm.train", params)  # the preset's model, batch, size and schedule
        channels = loop_spec.channels or 1
        if loop_spec.dataset != "digits":  # a hub dataset cannot be fetched offline: the digits as a zip instead
            params["dataset"] = service.upload_digits(rgb=channels == 3)
        images, labels = digits_like_the_service(loop_spec, channels)
        if not loop_spec.class_conditional:
            labels = None
        if cuda:
            params.update(CUDA_SERVICE, batch_size=args.service_batch, compile=args.compile)
        params.update(json.loads(args.params))
        service_spec = validate_params("ddpm.train", params)

        def service_run() -> tuple[float, float]:
            total = args.warmup + args.steps
            with StepClock() as clock:
                wall, _ = service.run("ddpm.train", {**params, "max_steps": total})
            return clock.at[total] - clock.at[args.warmup], wall

        loop_s, service_s, job_s = [], [], []
        for _ in range(args.repeat):  # interleaved, so drifting machine load hits both alike
            loop_s.append(book_loop(loop_spec, images, labels, args.warmup, args.steps, args.device))
            train, wall = service_run()
            service_s.append(train)
            job_s.append(wall)

    loop_ips = args.steps * loop_spec.batch_size / min(loop_s)
    service_ips = args.steps * service_spec.batch_size / min(service_s)
    machine = machine_info()
    precision = {"no": "fp32"}.get(service_spec.mixed_precision, service_spec.mixed_precision)
    precision += " + compile" if service_spec.compile else ""
    rows = [
        {"run": "book loop", "batch_size": loop_spec.batch_size, "precision": "fp32", "best_s": round(min(loop_s), 3),
         "all_s": [round(s, 3) for s in loop_s], "images_per_s": round(loop_ips, 1)},
        {"run": "ddpm.train job", "batch_size": service_spec.batch_size, "precision": precision,
         "best_s": round(min(service_s), 3), "all_s": [round(s, 3) for s in service_s],
         "images_per_s": round(service_ips, 1), "job_wall_s": round(min(job_s), 3)},
    ]
    ratio = round(service_ips / loop_ips, 3)
    print(f"ddpm.train vs the book's loop: preset {preset}, {loop_spec.image_size} px, {args.steps} steps after "
          f"{args.warmup} (best of {args.repeat}, interleaved), {args.device}; {machine}")
    print(f"{'run':<16} {'batch':>6} {'precision':>12} {'best s':>8} {'img/s':>8}  all s")
    for r in rows:
        print(f"{r['run']:<16} {r['batch_size']:>6} {r['precision']:>12} {r['best_s']:>8.3f} {r['images_per_s']:>8.1f}"
              f"  {r['all_s']}")
    print(f"service / loop: {ratio:.3f}x img/s; the job's whole wall time (set-up, export, final grid): "
          f"{rows[1]['job_wall_s']:.2f} s")
    append_jsonl(args.out, [{
        "bench": "ddpm_train", "preset": preset, "device": args.device, "steps": args.steps, "warmup": args.warmup,
        "repeat": args.repeat, "threads": torch.get_num_threads(), "machine": machine,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "service_params": params,
        "loop": rows[0], "service": rows[1], "ratio_service_over_loop": ratio,
    }])
    return 0


if __name__ == "__main__":
    sys.exit(main())
