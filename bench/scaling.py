"""How a job's cost grows with its work, on CPU, through the real in-process Executor.

(a) `sd.txt2img` with 1, 2, 4 … 64 images (one prompt each, from a list of eight):
    wall time and seconds per image.
(b) `sd.sweep` with 1, 2, 4 … 64 cells (guidance scales x one seed): wall time and
    seconds per cell.
(c) `ddpm.train` on the first 100 … 1797 digits as an upload zip (decoded and
    prepared by the worker, as a user's upload is): training img/s and the time
    from the job's start to its first optimizer step (data, model, optimizer).

The Stable Diffusion jobs use the small pipeline of bench/tiny_sd.py (random
weights: speed does not depend on them), warm in the worker's cache as from a
worker's second job on. Every point is the best of `--repeat` runs. Prints a table
per series and appends JSON lines to `--out`.

    .venv/bin/python bench/scaling.py --quick     # small sizes: a smoke run of a minute or two
    .venv/bin/python bench/scaling.py             # 1 … 64 images and cells, 100 … 1797 digits
    .venv/bin/python bench/scaling.py --images 1 8 64 --cells 9 --train-sizes 1797
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# The repo root in place of bench/ itself: bench/queue.py must not shadow the standard library's queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from bench.ddpm_train import StepClock, TrainService, append_jsonl, machine_info  # noqa: E402
from bench.sd_cpu import PROMPTS  # noqa: E402

FULL = {"images": [1, 2, 4, 8, 16, 32, 64], "cells": [1, 2, 4, 8, 16, 32, 64],
        "train_sizes": [100, 200, 400, 800, 1797], "size": 64, "steps": 20, "width": 64, "train_steps": 30,
        "repeat": 2}
QUICK = {"images": [1, 2, 4, 8], "cells": [1, 2, 4, 8], "train_sizes": [100, 400, 1797], "size": 32, "steps": 4,
         "width": 32, "train_steps": 5, "repeat": 2}


def best_of(repeat: int, run):
    """The run (a tuple whose first item is its seconds) with the fewest seconds."""
    return min((run() for _ in range(repeat)), key=lambda r: r[0])


def sd_series(service: TrainService, kind: str, counts: list[int], common: dict, repeat: int) -> list[dict]:
    rows = []
    for n in counts:
        if kind == "sd.txt2img":
            params = {**common, "prompts": [PROMPTS[i % len(PROMPTS)] for i in range(n)], "seed": 0}
        else:  # one seed, n guidance scales from 1 up
            params = {**common, "prompt": PROMPTS[0], "guidance_scales": [1.0 + 0.5 * i for i in range(n)],
                      "seeds": [193]}
        wall, _ = best_of(repeat, lambda: service.run(kind, params))
        rows.append({"series": kind, "n": n, "wall_s": round(wall, 3), "s_per_item": round(wall / n, 4)})
    return rows


def train_series(service: TrainService, sizes: list[int], preset: str, steps: int, repeat: int) -> list[dict]:
    rows = []
    for size in sizes:
        dataset = service.upload_digits(count=size)

        def one_job() -> tuple[float, float, dict]:
            with StepClock() as clock:
                started = time.perf_counter()
                wall, result = service.run("ddpm.train", {"preset": preset, "dataset": dataset, "max_steps": steps})
            return wall, clock.at[1] - started, result

        wall, first_step, result = best_of(repeat, one_job)
        rows.append({"series": "ddpm.train", "n": result["dataset_size"], "wall_s": round(wall, 3),
                     "first_step_s": round(first_step, 3), "images_per_s": result["images_per_s"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.tiny_sd import build_sd_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run: " + json.dumps(QUICK))
    parser.add_argument("--images", type=int, nargs="*", help="sd.txt2img images per job (none: skip)")
    parser.add_argument("--cells", type=int, nargs="*", help="sd.sweep cells per job (none: skip)")
    parser.add_argument("--train-sizes", type=int, nargs="*", help="ddpm.train dataset sizes (none: skip)")
    parser.add_argument("--size", type=int, help="SD image size in pixels")
    parser.add_argument("--steps", type=int, help="SD denoising steps")
    parser.add_argument("--width", type=int, help="SD UNet base channels (the pipeline's size)")
    parser.add_argument("--batch-size", type=int, default=8, help="SD images per UNet batch (the service's default)")
    parser.add_argument("--preset", default="tiny", help="ddpm.train preset")
    parser.add_argument("--train-steps", type=int, help="ddpm.train steps per job")
    parser.add_argument("--repeat", type=int, help="runs per point; the best is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.jsonl"))
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-") as tmp:
        tmp = Path(tmp)
        service = TrainService(tmp / "data", tmp / "models")
        common = {"model": "bench-sd", "steps": args.steps, "width": args.size, "height": args.size,
                  "batch_size": args.batch_size}
        if args.images or args.cells:
            build_sd_pipeline(tmp / "models" / "bench-sd", base_channels=args.width)
            service.run("sd.sweep", {**common, "prompt": PROMPTS[0], "steps": 2})  # warm the pipeline cache
        rows += sd_series(service, "sd.txt2img", args.images, common, args.repeat)
        rows += sd_series(service, "sd.sweep", args.cells, common, args.repeat)
        if args.train_sizes:
            service.run("ddpm.train", {"preset": args.preset, "max_steps": 1})  # imports and kernels, once
        rows += train_series(service, args.train_sizes, args.preset, args.train_steps, args.repeat)

    machine = machine_info()
    print(f"Scaling on CPU ({machine}); best of {args.repeat}")
    print(f"SD: {args.size} px, {args.steps} steps, UNet base {args.width} ch, batch {args.batch_size}")
    for kind, unit in (("sd.txt2img", "s/img"), ("sd.sweep", "s/cell")):
        series = [r for r in rows if r["series"] == kind]
        if series:
            print(f"{kind:<12} {'n':>5} {'wall s':>9} {unit:>9}")
            for r in series:
                print(f"{'':<12} {r['n']:>5} {r['wall_s']:>9.2f} {r['s_per_item']:>9.3f}")
    series = [r for r in rows if r["series"] == "ddpm.train"]
    if series:
        print(f"ddpm.train: preset {args.preset}, {args.train_steps} steps, the digits as an upload zip")
        print(f"{'images':>8} {'wall s':>9} {'first step s':>13} {'img/s':>8}")
        for r in series:
            print(f"{r['n']:>8} {r['wall_s']:>9.2f} {r['first_step_s']:>13.2f} {r['images_per_s']:>8.1f}")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    settings = {"sd_size": args.size, "sd_steps": args.steps, "sd_unet_base": args.width,
                "sd_batch_size": args.batch_size, "train_preset": args.preset, "train_steps": args.train_steps,
                "repeat": args.repeat, "threads": torch.get_num_threads()}
    append_jsonl(args.out, [{"bench": "scaling", **r, **settings, "machine": machine, "when": when} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
