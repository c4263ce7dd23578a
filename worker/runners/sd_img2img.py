"""sd.img2img: variations of an init image with Stable Diffusion (the book's chapter).

The init image (`upload:<id>` or a prior job's artifact `job:<id>/<name>`) is
scaled to fit within width x height, keeping its aspect ratio, to multiples of 8.
Each image is encoded with the VAE, noised to the timestep that `strength` picks
and denoised from there with classifier-free guidance. Seeds, outputs and
previews as in sd.txt2img.
"""
from __future__ import annotations

from PIL import Image, ImageOps

from shared.specs import SDImg2ImgSpec
from worker import sd
from worker.context import JobContext


def load_init_image(spec: SDImg2ImgSpec, ctx: JobContext) -> Image.Image:
    if spec.init_image.startswith("upload:"):
        path, _ = ctx.fetch_upload(spec.init_image, "image")
    else:
        path = ctx.fetch_job_artifact(spec.init_image)
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    image = ImageOps.contain(image, (spec.width, spec.height), Image.LANCZOS)
    size = (max(8, image.width // 8 * 8), max(8, image.height // 8 * 8))
    return image.resize(size, Image.LANCZOS) if size != image.size else image


def run(spec: SDImg2ImgSpec, ctx: JobContext) -> dict:
    # 1. Inputs: prompts (with seeds), the init image, the pipeline.
    table = sd.prompt_table(spec, ctx)
    init = load_init_image(spec, ctx)
    pipe, cache_hit = sd.get_pipeline(spec, ctx)
    cond, uncond, warnings = sd.encode_table(pipe, table)
    init_dist = sd.encode_image(pipe, init)  # the VAE encoder once; each row samples with its seed

    # 2. One row per image: the init image encoded with the row's own seed.
    rows, records = [], []
    for i, row in enumerate(table):
        for j in range(spec.num_images_per_prompt):
            seed = row["seed"] + j
            rows.append(sd.Row(cond=i, uncond=i, guidance=spec.guidance_scale, seed=seed, steps=spec.steps,
                               init_latents=sd.sample_latents(pipe, init_dist, seed)))
            records.append({
                "name": f"images/{i:04d}-{j:02d}.png", "prompt_index": i, "image_index": j,
                "prompt": row["prompt"], "negative_prompt": row["negative_prompt"], "seed": seed,
                "guidance_scale": spec.guidance_scale, "strength": spec.strength, "steps": spec.steps,
                "scheduler": spec.scheduler, "width": init.width, "height": init.height, "model": spec.model,
                "init_image": spec.init_image,
            })
    images = sd.render(ctx, pipe, spec, rows, cond, uncond, (init.height, init.width), spec.strength)

    # 3. Outputs.
    sd.write_prompt_outputs(ctx, images, records, warnings, spec.num_images_per_prompt)
    return {"num_images": len(images), "num_prompts": len(table), "image_size": [init.width, init.height],
            "model_cache": "hit" if cache_hit else "miss", "warnings": warnings, "device": ctx.device}
