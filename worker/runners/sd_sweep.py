"""sd.sweep: one prompt over a grid of guidance scales, seeds and step counts (the article's sweep).

Every cell starts from the same noise as a single image with its seed would, and
the text is encoded once. All cells that share a step count go through the UNet
together, `batch_size` rows at a time, each row with its own guidance scale: one
batched loop instead of a pipeline call per cell. Guidance below 1 is real: the
service applies `uncond + g * (cond - uncond)` for every g (diffusers' pipelines
turn guidance off at g <= 1, so 0.25, 0.5 and 1.0 would all render alike).

Outputs `images/g<scale>_s<seed>[_n<steps>].png`, `grid.png` (a column per scale,
a row per seed and step count, labelled), `manifest.json`, previews as it runs.
"""
from __future__ import annotations

from PIL import Image, ImageDraw

from shared.specs import SDSweepSpec
from worker import sd
from worker.context import JobContext

LABEL_PX = 14  # height of a legend line


def labelled_grid(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str]) -> Image.Image:
    """A grid with the column legend on top and the row legend on the left."""
    w, h = cells[0][0].size
    left = max(8 * max(len(label) for label in row_labels), 40)
    grid = Image.new("RGB", (left + len(col_labels) * w, LABEL_PX + len(row_labels) * h), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + 2, 1), label, fill="black")
    for r, (label, row) in enumerate(zip(row_labels, cells)):
        draw.text((2, LABEL_PX + r * h + h // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (left + c * w, LABEL_PX + r * h))
    return grid


def plan(spec: SDSweepSpec, ctx: JobContext) -> sd.Plan:
    """Steps 1-2: the sweep's cells as rows, ready to render alone or coalesced with other jobs'."""
    # 1. The pipeline, and the prompt and negative prompt encoded once.
    pipe, cache_hit = sd.get_pipeline(spec, ctx)
    negative = spec.negative_prompt or ""
    warnings = sd.token_warnings(pipe, {"prompt": spec.prompt, "negative_prompt": negative})
    cond = sd.encode_texts(pipe, [spec.prompt])
    uncond = sd.encode_texts(pipe, [negative])

    # 2. One row per cell: (steps, seed) rows of the grid, a column per guidance scale.
    steps_axis = spec.steps_list or [spec.steps]
    grid_rows = [(steps, seed) for steps in steps_axis for seed in spec.seeds]
    rows, records = [], []
    for steps, seed in grid_rows:
        for g in spec.guidance_scales:
            suffix = f"_n{steps}" if spec.steps_list else ""
            rows.append(sd.Row(cond=0, uncond=0, guidance=g, seed=seed, steps=steps))
            records.append({
                "name": f"images/g{g:g}_s{seed}{suffix}.png", "prompt": spec.prompt, "negative_prompt": negative,
                "seed": seed, "guidance_scale": g, "steps": steps, "scheduler": spec.scheduler,
                "width": spec.width, "height": spec.height, "model": spec.model,
            })

    def finish(images) -> dict:
        # 4. Every cell, the labelled grid, the manifest.
        for image, record in zip(images, records):
            ctx.write_image(record["name"], image, sd.png_meta(record))
        n = len(spec.guidance_scales)
        cells = [images[r * n : (r + 1) * n] for r in range(len(grid_rows))]
        row_labels = [f"seed {seed}" + (f", {steps} steps" if spec.steps_list else "") for steps, seed in grid_rows]
        ctx.write_image("grid.png", labelled_grid(cells, [f"g={g:g}" for g in spec.guidance_scales], row_labels))
        ctx.write_json("manifest.json", {"images": records, "warnings": warnings,
                                         "axes": {"guidance_scales": spec.guidance_scales, "seeds": spec.seeds,
                                                  "steps": steps_axis}})
        return {"num_images": len(images), "cells": len(rows), "image_size": [spec.width, spec.height],
                "model_cache": "hit" if cache_hit else "miss", "warnings": warnings, "device": ctx.device}

    return sd.Plan(ctx, spec, pipe, rows, cond, uncond, finish)


def run(spec: SDSweepSpec, ctx: JobContext) -> dict:
    # 3. Denoise alone: `batch_size` rows per UNet batch (worker/coalesce.py may instead
    #    render this plan in one batch with other jobs' plans), then the outputs.
    return sd.render_plan(plan(spec, ctx))
