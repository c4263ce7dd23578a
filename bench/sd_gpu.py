"""Batching against plain diffusers on a GPU, with Stable Diffusion 1.5 in fp16
(the book's and the article's settings; the H100 anchors are 1.50 s/img at batch 1, 0.34 at batch 16, and the
9-scale sweep 17.1 s as pipeline calls, 3.2 s as one batched loop).

Same workloads and method as bench/sd_cpu.py, at 512 px and 50 steps by default,
with the plain pipeline also in fp16 with SDPA. The lent GPU machines cannot reach
the hub, so by default the model is SD 1.5's architecture with random weights
(`bench/tiny_sd.py` `build_sd15_pipeline`: the same compute), built once into
`--models-dir`; `--model` takes a hub id or a folder there instead. `--smoke` runs
the whole script on CPU with the tiny pipeline, to check it before GPU time is spent.

    .venv/bin/python bench/sd_gpu.py [--compile]
    .venv/bin/python bench/sd_gpu.py --smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root in place of bench/ (bench/queue.py would shadow queue)

import torch  # noqa: E402

from bench.sd_cpu import PROMPTS, SWEEP_SCALES, ServiceRunner, plain_prompts, plain_sweep  # noqa: E402

RANDOM_SD15 = "random-sd15"


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    from bench.tiny_sd import build_sd15_pipeline, build_sd_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=RANDOM_SD15,
                        help=f"a hub id, or a folder under --models-dir; {RANDOM_SD15}: built there if missing")
    parser.add_argument("--models-dir", default=str(Path(__file__).parent / ".cache" / "models"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16, help="prompts in the txt2img batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the service's UNet")
    parser.add_argument("--smoke", action="store_true", help="on CPU, the tiny pipeline, 32 px, 2 steps; no results")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sd_gpu.jsonl"))
    args = parser.parse_args(argv)
    models_dir = Path(args.models_dir)
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.model, args.size, args.steps, args.batch = "bench-sd-smoke", 32, 2, 2
        if not (models_dir / args.model).exists():
            build_sd_pipeline(models_dir / args.model)
    elif not torch.cuda.is_available():
        print("bench/sd_gpu.py needs CUDA (or --smoke); on CPU run bench/sd_cpu.py", file=sys.stderr)
        return 2
    else:
        device, dtype = "cuda", torch.float16
        if args.model == RANDOM_SD15 and not (models_dir / RANDOM_SD15).exists():
            started = time.perf_counter()
            build_sd15_pipeline(models_dir / RANDOM_SD15)
            print(f"built {models_dir / RANDOM_SD15} in {time.perf_counter() - started:.0f} s")

    local = models_dir / args.model
    pipe = StableDiffusionPipeline.from_pretrained(local if local.is_dir() else args.model, dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-") as tmp:
        service = ServiceRunner(Path(tmp) / "data", models_dir)
        common = {"model": args.model, "steps": args.steps, "width": args.size, "height": args.size,
                  "compile": args.compile}
        sweep = {**common, "prompt": PROMPTS[0], "guidance_scales": SWEEP_SCALES, "seeds": [193],
                 "batch_size": len(SWEEP_SCALES)}
        batch = {**common, "prompts": prompts, "batch_size": min(64, len(prompts)), "seed": 0}
        service.run("sd.sweep", {**sweep, "steps": 2})  # load and warm up (compile) once per worker
        plain_sweep(pipe, PROMPTS[0], SWEEP_SCALES[:1], 2, args.size, 193)

        rows = []
        for name, plain, job, images in [
            ("sweep, 9 guidance scales", lambda: plain_sweep(pipe, PROMPTS[0], SWEEP_SCALES, args.steps, args.size,
                                                             193), ("sd.sweep", sweep), len(SWEEP_SCALES)),
            (f"txt2img, {len(prompts)} prompts", lambda: plain_prompts(pipe, prompts, args.steps, args.size, 0),
             ("sd.txt2img", batch), len(prompts)),
        ]:
            if device == "cuda":
                torch.cuda.synchronize()
            plain_s = plain()
            service_s, result = service.run(*job)
            if result.get("device", device) != device:
                raise RuntimeError(f"the job ran on {result.get('device')}, not {device}")
            rows.append({"workload": name, "plain_s": round(plain_s, 3), "service_s": round(service_s, 3),
                         "speedup": round(plain_s / service_s, 2), "service_s_per_image": round(service_s / images, 3)})

    machine = f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__}"
    print(f"SD on {device}: {args.model}, {args.size} px, {args.steps} steps, {str(dtype).removeprefix('torch.')}; {machine}")
    print(f"{'workload':<26} {'plain diffusers':>16} {'diffqueue job':>14} {'s/img':>7} {'speed-up':>9}")
    for r in rows:
        print(f"{r['workload']:<26} {r['plain_s']:>15.2f}s {r['service_s']:>13.2f}s {r['service_s_per_image']:>7.3f}"
              f" {r['speedup']:>8.2f}x")
    if args.smoke:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"bench": "sd_gpu", "model": args.model, "size": args.size, "steps": args.steps,
                                 "compile": args.compile, "machine": machine,
                                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
