"""Cross-job batching (worker/coalesce.py) on CPU: N small `sd.txt2img` jobs (one
prompt each) submitted at once, worked off by one worker with coalescing on and
off, on a small Stable Diffusion pipeline built from config (random weights: speed
does not depend on them).

The worker is the real Executor in this process, with the pipeline warm in its
cache; it is handed the jobs' messages in submit order, as a broker would deliver
them, so with coalescing on the partners' own messages arrive after their jobs
were batched and are dropped as duplicates. Reported per mode: the total time,
and each job's latency from submit to its recorded outcome (p50 and max). Prints a
table with the ratios and appends JSON lines to `--out`.

    .venv/bin/python bench/coalesce.py [--jobs 8] [--size 64] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# The repository root in place of bench/ itself, whose module names (bench/queue.py) would
# shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from shared.config import Settings  # noqa: E402
from shared.db import make_engine, make_sessionmaker, session_scope, upgrade  # noqa: E402
from shared.models import Job  # noqa: E402
from shared.specs import KINDS, validate_params  # noqa: E402

PROMPTS = ["a watercolor rose", "a red fox in snow", "a lighthouse at dusk", "a bowl of lemons",
           "an old steam train", "a city at night, neon", "a mountain lake", "a cat asleep on books"]


def work_off(settings: Settings, params: list[dict]) -> dict:
    """Submit every job at once, then deliver their messages in order to one worker.
    Returns the total seconds, each job's latency in seconds, and how many batches ran."""
    from worker.executor import Executor

    sessions = make_sessionmaker(make_engine(settings.database_url))
    executor = Executor(settings, app=None)
    executor.perform(submit(sessions, params[0]), "bench")  # warm the worker's pipeline cache
    started = time.perf_counter()
    ids = [submit(sessions, p) for p in params]
    outcomes = [executor.perform(job_id, "bench") for job_id in ids]
    total_s = time.perf_counter() - started
    with sessions() as session:
        done = [session.get(Job, job_id) for job_id in ids]
        failed = [f"{job.id}: {job.status} {job.error}" for job in done if job.status != "succeeded"]
        if failed:
            raise RuntimeError("jobs did not succeed: " + "; ".join(failed))
        latencies = [(job.finished_at - job.created_at).total_seconds() for job in done]
    return {"total_s": total_s, "latencies_s": latencies, "executions": sum(o != "skipped" for o in outcomes)}


def submit(sessions, params: dict) -> str:
    spec = validate_params("sd.txt2img", params)
    with session_scope(sessions) as session:
        job = Job(kind="sd.txt2img", params=spec.model_dump(mode="json"), queue=KINDS["sd.txt2img"].queue)
        session.add(job)
    return job.id


def main(argv: list[str] | None = None) -> int:
    from bench.tiny_sd import build_sd_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs submitted at once")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64, help="UNet base channels (the pipeline's size)")
    parser.add_argument("--max-rows", type=int, default=Settings.coalesce_max_rows,
                        help="coalesce_max_rows: images per denoising batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "coalesce.jsonl"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    params = [{"model": "bench-sd", "steps": args.steps, "width": args.size, "height": args.size,
               "prompts": [PROMPTS[i % len(PROMPTS)]], "seed": i} for i in range(args.jobs)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-") as tmp:
        tmp = Path(tmp)
        build_sd_pipeline(tmp / "models" / "bench-sd", base_channels=args.width)
        for mode, coalesce in (("alone", False), ("coalesced", True)):
            settings = replace(Settings.embedded(tmp / mode), models_dir=tmp / "models", progress_interval_s=1.0,
                               cancel_check_interval_s=1.0, coalesce=coalesce, coalesce_max_rows=args.max_rows)
            upgrade(settings.database_url)
            run = work_off(settings, params)
            rows.append({"mode": mode, "total_s": round(run["total_s"], 3),
                         "p50_s": round(statistics.median(run["latencies_s"]), 3),
                         "max_s": round(max(run["latencies_s"]), 3), "executions": run["executions"]})

    alone, batched = rows
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    print(f"{args.jobs} sd.txt2img jobs at once: {args.size} px, {args.steps} steps, UNet base {args.width} ch, "
          f"coalesce_max_rows {args.max_rows}; {machine}")
    print(f"{'mode':<10} {'executions':>10} {'total':>9} {'p50 latency':>12} {'max latency':>12}")
    for r in rows:
        print(f"{r['mode']:<10} {r['executions']:>10} {r['total_s']:>8.2f}s {r['p50_s']:>11.2f}s {r['max_s']:>11.2f}s")
    ratio = {k: round(alone[k] / batched[k], 2) for k in ("total_s", "p50_s", "max_s")}
    print(f"{'alone / coalesced':<21} {ratio['total_s']:>8.2f}x {ratio['p50_s']:>11.2f}x {ratio['max_s']:>11.2f}x")
    common = {"bench": "coalesce", "jobs": args.jobs, "size": args.size, "steps": args.steps, "unet_base": args.width,
              "max_rows": args.max_rows, "machine": machine, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "speedup_total": ratio["total_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.writelines(json.dumps({**common, **r}) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
