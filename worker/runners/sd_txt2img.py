"""sd.txt2img: render a batch of prompts with Stable Diffusion (the book's chapter).

Prompts come from `prompts` or a prompts file (`prompts_upload`: .txt, or .csv
with prompt, negative_prompt and seed columns). Image j of prompt i has its own
generator seeded `seed_i + j`, where seed_i is the file's seed for that prompt or
`seed + i * num_images_per_prompt`; so any image can be made again alone, with
that seed, and it does not depend on `batch_size`.

Outputs `images/<prompt>-<image>.png` (settings as PNG text), `grid.png`,
`manifest.json`, and while it runs `previews/step-NNNN.png` / `preview.png`.
"""
from __future__ import annotations

from shared.specs import SDTxt2ImgSpec
from worker import sd
from worker.context import JobContext


def plan(spec: SDTxt2ImgSpec, ctx: JobContext) -> sd.Plan:
    """Steps 1-3: the job's rows, ready to render alone or coalesced with other jobs'."""
    # 1. Prompts (and their seeds), then the pipeline from the worker's warm cache.
    table = sd.prompt_table(spec, ctx)
    pipe, cache_hit = sd.get_pipeline(spec, ctx)

    # 2. Encode each prompt and each negative prompt once.
    cond, uncond, warnings = sd.encode_table(pipe, table)

    # 3. One row per image; batched through the UNet `batch_size` rows at a time.
    rows, records = [], []
    for i, row in enumerate(table):
        for j in range(spec.num_images_per_prompt):
            rows.append(sd.Row(cond=i, uncond=i, guidance=spec.guidance_scale, seed=row["seed"] + j, steps=spec.steps))
            records.append({
                "name": f"images/{i:04d}-{j:02d}.png", "prompt_index": i, "image_index": j,
                "prompt": row["prompt"], "negative_prompt": row["negative_prompt"], "seed": row["seed"] + j,
                "guidance_scale": spec.guidance_scale, "steps": spec.steps, "scheduler": spec.scheduler,
                "width": spec.width, "height": spec.height, "model": spec.model,
            })

    def finish(images) -> dict:
        # 5. Each image with its settings, the grid (a row per prompt), the manifest.
        sd.write_prompt_outputs(ctx, images, records, warnings, spec.num_images_per_prompt)
        return {"num_images": len(images), "num_prompts": len(table), "image_size": [spec.width, spec.height],
                "model_cache": "hit" if cache_hit else "miss", "warnings": warnings, "device": ctx.device}

    return sd.Plan(ctx, spec, pipe, rows, cond, uncond, finish)


def run(spec: SDTxt2ImgSpec, ctx: JobContext) -> dict:
    # 4. Denoise alone: `batch_size` rows per UNet batch (worker/coalesce.py may instead
    #    render this plan in one batch with other jobs' plans), then the outputs.
    return sd.render_plan(plan(spec, ctx))
