"""Batching against plain diffusers, on CPU, with a small Stable Diffusion pipeline
built from config (random weights: speed does not depend on them).

(a) The article's guidance sweep (9 scales, one seed) as 9 sequential
    `StableDiffusionPipeline` calls, against the service's `sd.sweep` job, which
    runs the 9 cells as one batched loop.
(b) A batch of prompts as one pipeline call per prompt, against the service's
    `sd.txt2img` job with the prompts batched.

Both service runs go through the real Executor (claim, runner, artifacts written
to local storage, outcome recorded) with the pipeline already warm in the worker's
cache, as it is from a worker's second job on; the plain pipeline is loaded once
before timing too. Prints a table with the ratios and appends JSON lines to `--out`.

    .venv/bin/python bench/sd_cpu.py [--size 64] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root in place of bench/ (bench/queue.py would shadow queue)

import torch  # noqa: E402

from shared.config import Settings  # noqa: E402
from shared.db import make_engine, make_sessionmaker, session_scope, upgrade  # noqa: E402
from shared.models import Job  # noqa: E402
from shared.specs import KINDS, validate_params  # noqa: E402

SWEEP_SCALES = [0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0]
PROMPTS = ["a watercolor rose", "a red fox in snow", "a lighthouse at dusk", "a bowl of lemons",
           "an old steam train", "a city at night, neon", "a mountain lake", "a cat asleep on books"]


class ServiceRunner:
    """Jobs through the real Executor in this process, on a temp embedded data dir."""

    def __init__(self, data_dir: Path, models_dir: Path):
        from worker.executor import Executor

        self.settings = replace(Settings.embedded(data_dir), models_dir=models_dir, progress_interval_s=1.0,
                                cancel_check_interval_s=1.0)
        upgrade(self.settings.database_url)
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))
        self.executor = Executor(self.settings, app=None)  # one executor: its pipeline cache stays warm

    def run(self, kind: str, params: dict) -> tuple[float, dict]:
        spec = validate_params(kind, params)
        with session_scope(self.sessions) as session:
            job = Job(kind=kind, params=spec.model_dump(mode="json"), queue=KINDS[kind].queue)
            session.add(job)
        started = time.perf_counter()
        self.executor.perform(job.id, "bench")
        elapsed = time.perf_counter() - started
        with self.sessions() as session:
            done = session.get(Job, job.id)
            if done.status != "succeeded":
                raise RuntimeError(f"{kind} failed: {done.error}")
            return elapsed, done.result


def plain_sweep(pipe, prompt: str, scales: list[float], steps: int, size: int, seed: int) -> float:
    """The source's sweep: re-seed, one pipeline call per guidance scale."""
    started = time.perf_counter()
    for g in scales:
        pipe(prompt, guidance_scale=g, num_inference_steps=steps, height=size, width=size,
             generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - started


def plain_prompts(pipe, prompts: list[str], steps: int, size: int, seed: int) -> float:
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        pipe(prompt, guidance_scale=7.5, num_inference_steps=steps, height=size, width=size,
             generator=torch.Generator().manual_seed(seed + i))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    from bench.tiny_sd import build_sd_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64, help="UNet base channels (the pipeline's size)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions; the best is reported")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sd_cpu.jsonl"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-") as tmp:
        tmp = Path(tmp)
        build_sd_pipeline(tmp / "models" / "bench-sd", base_channels=args.width)
        pipe = StableDiffusionPipeline.from_pretrained(tmp / "models" / "bench-sd", safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        service = ServiceRunner(tmp / "data", tmp / "models")
        common = {"model": "bench-sd", "steps": args.steps, "width": args.size, "height": args.size}
        sweep = {**common, "prompt": PROMPTS[0], "guidance_scales": SWEEP_SCALES, "seeds": [193],
                 "batch_size": len(SWEEP_SCALES)}
        batch = {**common, "prompts": PROMPTS, "batch_size": len(PROMPTS), "seed": 0}
        service.run("sd.sweep", {**sweep, "steps": 2})  # warm the worker's pipeline cache

        rows = []
        for name, plain, job in [
            ("sweep, 9 guidance scales", lambda: plain_sweep(pipe, PROMPTS[0], SWEEP_SCALES, args.steps, args.size,
                                                             193), ("sd.sweep", sweep)),
            (f"txt2img, {len(PROMPTS)} prompts", lambda: plain_prompts(pipe, PROMPTS, args.steps, args.size, 0),
             ("sd.txt2img", batch)),
        ]:
            plain_s = min(plain() for _ in range(args.repeat))
            service_s = min(service.run(*job)[0] for _ in range(args.repeat))
            rows.append({"workload": name, "plain_s": round(plain_s, 3), "service_s": round(service_s, 3),
                         "speedup": round(plain_s / service_s, 2)})

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    print(f"SD on CPU: {args.size} px, {args.steps} steps, UNet base {args.width} ch; {machine}")
    print(f"{'workload':<26} {'plain diffusers':>16} {'diffqueue job':>14} {'speed-up':>9}")
    for r in rows:
        print(f"{r['workload']:<26} {r['plain_s']:>15.2f}s {r['service_s']:>13.2f}s {r['speedup']:>8.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"bench": "sd_cpu", "size": args.size, "steps": args.steps, "unet_base": args.width,
                                 "machine": machine, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
