"""What the Stable Diffusion runners share: loading pipelines (kept warm in an LRU),
the schedulers by name, and the batched classifier-free-guidance loop of the book's hand-written one.

The loop is the source's hand-written one, widened to a batch in which every row
has its own text embedding, guidance scale and generator:

    latents_in = scale_model_input(cat([latents] * 2), t)
    uncond, cond = unet(latents_in, t, cat([uncond_embeds, cond_embeds])).chunk(2)
    noise = uncond + g[:, None, None, None] * (cond - uncond)     # for every g, also g <= 1
    latents = scheduler.step(noise, t, latents, generator=[one per row]).prev_sample

So a sweep's cells, a batch of prompts and a single image all go through the same
code, and a row's result does not depend on what else is in its batch.
"""
from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image

from shared import model_refs
from shared.config import Settings
from shared.errors import ModelNotFound
from shared.uploads import read_prompts
from worker import hub, weights
from worker.coalesce import each_live

SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ------------------------------------------------------------------ loading
@dataclass(frozen=True)
class PipelineKey:
    model: str
    variant: str | None
    dtype: str
    device: str
    vae: str | None
    compile: bool


class PipelineCache:
    """Loaded pipelines kept warm between jobs: an LRU of at most `max_items`."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict[PipelineKey, StableDiffusionPipeline] = OrderedDict()

    def get(self, key: PipelineKey, load: Callable[[], StableDiffusionPipeline]):
        """Returns (pipeline, hit)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        while len(self._items) >= max(1, self.max_items):
            self._items.popitem(last=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        pipe = load()
        if self.max_items > 0:
            self._items[key] = pipe
        return pipe, False


def resolve_dtype(requested: str, device: str, log: logging.Logger) -> str:
    """`auto`: float16 on CUDA, float32 on CPU. float16 on a CPU runs as float32."""
    if requested == "auto":
        return "float16" if device == "cuda" else "float32"
    if requested == "float16" and device == "cpu":
        log.warning("torch_dtype float16 needs a GPU; this CPU worker runs float32")
        return "float32"
    return requested


def _source(ref: str, settings: Settings) -> tuple[str, bool]:
    """(what to pass to from_pretrained, offline?) for a local folder name or a hub id.
    A link out of the models dir, or a hub id off the allowlist, is refused before any load."""
    source = model_refs.model_source(ref, settings)
    if source.refused:
        raise ModelNotFound(f"model {ref}: {source.refused}")
    if source.path is not None:
        return str(source.path), True
    try:
        return source.hub_id, hub.lookup("model", source.hub_id, logging.getLogger(__name__))
    except Exception as exc:
        raise ModelNotFound(hub.load_error(f"model {source.hub_id}", "unknown id", exc)) from None


def load_pipeline(key: PipelineKey, settings: Settings) -> StableDiffusionPipeline:
    """StableDiffusionPipeline.from_pretrained, never with remote code or a custom
    pipeline, from safetensors weights only (worker/weights.py), with the safety
    checker off (as in the sources)."""
    dtype = DTYPES[key.dtype]
    source, offline = _source(key.model, settings)
    extra = {}
    if key.vae:
        vae_source, vae_offline = _source(key.vae, settings)
        try:
            extra["vae"] = AutoencoderKL.from_pretrained(vae_source, dtype=dtype, local_files_only=vae_offline,
                                                         use_safetensors=True)
        except Exception as exc:
            weights.raise_if_refused(f"vae {key.vae}", vae_source, exc)
            raise ModelNotFound(hub.load_error(f"vae {key.vae}", "offline or not a VAE", exc)) from None
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, variant=key.variant, safety_checker=None, requires_safety_checker=False,
            local_files_only=offline, use_safetensors=True, **extra,
        )
    except Exception as exc:
        weights.raise_if_refused(f"model {key.model}", source, exc)
        why = "not in the local cache, and the hub is unreachable" if offline and source == key.model else (
            "not a Stable Diffusion pipeline folder, or a missing variant")
        raise ModelNotFound(hub.load_error(f"model {key.model}", why, exc)) from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(key.device)
    if key.device == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)  # SDPA attention is diffusers' default
        if key.compile:
            pipe.unet = torch.compile(pipe.unet)
    return pipe


# ------------------------------------------------------------------ text
@torch.no_grad()
def encode_texts(pipe: StableDiffusionPipeline, texts: list[str]) -> torch.Tensor:
    """CLIP embeddings (N, 77, D) of each text, padded to the tokenizer's length."""
    embeds, _ = pipe.encode_prompt(texts, pipe.device, 1, False)
    return embeds


def token_warnings(pipe: StableDiffusionPipeline, texts: dict[str, str]) -> list[str]:
    """Name every text longer than CLIP reads (77 tokens): the rest is ignored."""
    limit = pipe.tokenizer.model_max_length
    out = []
    for what, text in texts.items():
        n = len(pipe.tokenizer(text).input_ids)
        if n > limit:
            out.append(f"{what} is {n} tokens; CLIP reads the first {limit}, the rest is ignored")
    return out


# ------------------------------------------------------------------ the loop
@dataclass
class Row:
    """One image to make: which text embeddings, guidance scale, seed and steps."""

    cond: int  # row of the cond embeddings
    uncond: int  # row of the uncond (negative) embeddings
    guidance: float
    seed: int
    steps: int
    init_latents: torch.Tensor | None = None  # img2img: the encoded init image (1, C, h, w)


def make_scheduler(pipe: StableDiffusionPipeline, name: str):
    return SCHEDULERS[name].from_config(pipe.scheduler.config)


@torch.no_grad()
def denoise(
    pipe: StableDiffusionPipeline,
    scheduler_name: str,
    rows: list[Row],
    cond_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor,
    height: int,
    width: int,
    strength: float = 1.0,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise one batch of rows that share steps and size; returns latents.
    Each row's noise comes from its own generator seeded with `row.seed`.
    `on_step(i, n, latents)` runs after each step (progress, previews, cancel)."""
    device, dtype = pipe.device, pipe.unet.dtype
    steps = rows[0].steps
    scheduler = make_scheduler(pipe, scheduler_name)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    generators = [torch.Generator("cpu").manual_seed(row.seed) for row in rows]
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)

    if rows[0].init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:  # img2img: start part-way, from the init image noised to that timestep
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        init = torch.cat([row.init_latents for row in rows]).to(device, dtype)
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(rows)))

    g = torch.tensor([row.guidance for row in rows], device=device, dtype=dtype)[:, None, None, None]
    text = torch.cat([uncond_embeds[[r.uncond for r in rows]], cond_embeds[[r.cond for r in rows]]])
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = pipe.unet(latent_in, t, encoder_hidden_states=text).sample.chunk(2)
        latents = scheduler.step(uncond + g * (cond - uncond), t, latents, **extra).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps), latents)
    return latents


@torch.no_grad()
def decode(pipe: StableDiffusionPipeline, latents: torch.Tensor, chunk: int) -> list[Image.Image]:
    """Latents to PIL images through the VAE, `chunk` at a time (memory)."""
    images = []
    for i in range(0, len(latents), max(1, chunk)):
        x = pipe.vae.decode(latents[i : i + chunk] / pipe.vae.config.scaling_factor).sample
        arr = (x.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(a) for a in arr)
    return images


# A linear map from SD 1.x/2.x latents to RGB, a common low-cost stand-in for the
# VAE decoder in previews (each latent pixel becomes a vae_scale_factor block).
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])


@torch.no_grad()
def preview_image(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> Image.Image:
    """A cheap preview of one latent: the linear RGB approximation for 4-channel
    latents (no VAE pass), else a real decode."""
    if latents.shape[1] != LATENT_RGB.shape[0]:
        return decode(pipe, latents, 1)[0]
    rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), LATENT_RGB)
    arr = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(arr)
    return image.resize((image.width * pipe.vae_scale_factor, image.height * pipe.vae_scale_factor), Image.NEAREST)


@torch.no_grad()
def encode_image(pipe: StableDiffusionPipeline, image: Image.Image):
    """An RGB image through the VAE encoder, once: its latent distribution."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype)).latent_dist


def sample_latents(pipe: StableDiffusionPipeline, dist, seed: int) -> torch.Tensor:
    """Scaled init latents (1, C, h, w) drawn from `dist` with the row's own seed."""
    noise = torch.randn(dist.mean.shape, generator=torch.Generator("cpu").manual_seed(seed))
    return (dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)) * pipe.vae.config.scaling_factor


def chunks(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


# ------------------------------------------------------------------ job plumbing
def get_pipeline(spec, ctx):
    """The job's pipeline from the worker's warm cache (loaded on a miss). Returns (pipe, hit)."""
    device = ctx.device
    model, vae = ctx.unalias(spec.model), spec.vae and ctx.unalias(spec.vae)
    key = PipelineKey(model, spec.variant, resolve_dtype(spec.torch_dtype, device, ctx.log), device, vae,
                      spec.compile and device == "cuda")
    pipe, hit = ctx.pipelines.get(key, lambda: load_pipeline(key, ctx.settings))
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    ctx.log.info("model %s (%s, %s): cache %s", model, key.dtype, device, "hit" if hit else "miss")
    return pipe, hit


def prompt_table(spec, ctx) -> list[dict]:
    """The job's prompts as [{"prompt", "negative_prompt", "seed"}], from `prompts` or a
    prompts file. Seeds: a file's own seed column, else `seed + i * num_images_per_prompt`."""
    if spec.prompts is not None:
        table = [{"prompt": p} for p in spec.prompts]
    else:
        path, _ = ctx.fetch_upload(spec.prompts_upload, "prompts")
        table = read_prompts(path)
    negatives = spec.negative_prompt if isinstance(spec.negative_prompt, list) else [spec.negative_prompt] * len(table)
    if len(negatives) != len(table):  # only possible with a prompts file: the spec checks the list form
        raise ValueError(f"negative_prompt has {len(negatives)} entries and the prompts file "
                         f"{spec.prompts_upload} has {len(table)} prompts: give one, or one per prompt")
    for i, row in enumerate(table):
        row["negative_prompt"] = row.get("negative_prompt") or negatives[i] or ""
        if row.get("seed") is None:
            row["seed"] = spec.seed + i * spec.num_images_per_prompt
    return table


def encode_table(pipe: StableDiffusionPipeline, table: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Each prompt and each negative prompt of a prompt table encoded once, plus the
    warnings for prompts longer than CLIP reads."""
    warnings = token_warnings(pipe, {f"prompt {i}": row["prompt"] for i, row in enumerate(table)})
    cond = encode_texts(pipe, [row["prompt"] for row in table])
    uncond = encode_texts(pipe, [row["negative_prompt"] for row in table])
    return cond, uncond, warnings


def render(ctx, pipe, spec, rows: list[Row], cond, uncond, size: tuple[int, int], strength: float = 1.0,
           ) -> list[Image.Image]:
    """Run every row: grouped by steps, `spec.batch_size` rows per UNet batch, with
    per-step progress and cancel, and a preview of the first row every
    `preview_every` steps. Returns the images in row order."""
    batches = []
    for steps in sorted({r.steps for r in rows}):
        batches += chunks([i for i, r in enumerate(rows) if r.steps == steps], spec.batch_size)

    def run_steps(steps: int) -> int:
        """Denoising steps the loop will take (PNDM takes one more; img2img fewer)."""
        scheduler = make_scheduler(pipe, spec.scheduler)
        scheduler.set_timesteps(steps)
        n = len(scheduler.timesteps)
        if rows[0].init_latents is not None:
            n -= (steps - min(int(steps * strength), steps)) * scheduler.order
        return n

    lengths = {steps: run_steps(steps) for steps in {r.steps for r in rows}}
    total = sum(lengths[rows[b[0]].steps] for b in batches)
    preview_every = spec.preview_every or max(1, rows[0].steps // 8)
    images: list[Image.Image | None] = [None] * len(rows)
    done = 0
    ctx.progress(0, total, "denoising", phase="denoise")
    for n_batch, batch in enumerate(batches):

        def on_step(i: int, n: int, latents, n_batch=n_batch, done=done) -> None:
            step_done(ctx, pipe, i, n, latents, preview_every if n_batch == 0 else 0, done + i, total,
                      f"batch {n_batch + 1}/{len(batches)} step {i}/{n}")

        latents = denoise(pipe, spec.scheduler, [rows[i] for i in batch], cond, uncond, size[0], size[1],
                          strength, on_step)
        for i, image in zip(batch, decode(pipe, latents, spec.batch_size)):
            images[i] = image
        done += lengths[rows[batch[0]].steps]
    return images


def step_done(ctx, pipe, i: int, n: int, latents, preview_every: int, done: int, total: int, message: str) -> None:
    """After denoising step i of n: cancel check, progress, and every `preview_every`
    steps (0: never) a preview of the first row (the source shows one every steps // 8)."""
    ctx.check_cancelled()
    ctx.progress(done, total, message)
    if preview_every and (i % preview_every == 0 or i == n):
        preview = preview_image(pipe, latents[:1])
        meta = {"step": str(i), "of": str(n)}
        ctx.write_image(f"previews/step-{i:04d}.png", preview, meta)
        ctx.write_image("preview.png", preview, meta)


# ------------------------------------------------------------------ several jobs, one batch
@dataclass
class Plan:
    """One job's images, planned but not yet made: its rows (indexing its own
    embeddings), and `finish(images) -> result`, which writes its outputs."""

    ctx: object  # the job's JobContext
    spec: object
    pipe: StableDiffusionPipeline
    rows: list[Row]
    cond: torch.Tensor
    uncond: torch.Tensor
    finish: Callable[[list[Image.Image]], dict]


def render_plan(plan: Plan) -> dict:
    """A job run alone: its plan's rows through `render`, then its outputs."""
    spec = plan.spec
    images = render(plan.ctx, plan.pipe, spec, plan.rows, plan.cond, plan.uncond, (spec.height, spec.width))
    return plan.finish(images)


@dataclass
class Share:
    """One job's rows in a coalesced batch: its own scheduler (and so its own
    multistep state), generators, guidance scales and text embeddings."""

    scheduler: object
    latents: torch.Tensor
    guidance: torch.Tensor  # (rows, 1, 1, 1)
    uncond: torch.Tensor
    cond: torch.Tensor
    step_kwargs: dict
    preview_every: int


def share_of(plan: Plan) -> Share:
    """A job's rows set up as `denoise` sets up a batch: its noise from each row's generator."""
    pipe, spec = plan.pipe, plan.spec
    device, dtype = pipe.device, pipe.unet.dtype
    scheduler = make_scheduler(pipe, spec.scheduler)
    scheduler.set_timesteps(plan.rows[0].steps, device=device)
    generators = [torch.Generator("cpu").manual_seed(row.seed) for row in plan.rows]
    shape = (pipe.unet.config.in_channels, spec.height // pipe.vae_scale_factor, spec.width // pipe.vae_scale_factor)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
    return Share(
        scheduler=scheduler,
        latents=noise * scheduler.init_noise_sigma,
        guidance=torch.tensor([row.guidance for row in plan.rows], device=device, dtype=dtype)[:, None, None, None],
        uncond=plan.uncond[[row.uncond for row in plan.rows]],
        cond=plan.cond[[row.cond for row in plan.rows]],
        step_kwargs={"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {},
        preview_every=spec.preview_every or max(1, plan.rows[0].steps // 8),
    )


@torch.no_grad()
def render_coalesced(plans: list[Plan], on_error: Callable[[int, Exception], None]) -> dict[int, list[Image.Image]]:
    """Several jobs' rows (same pipeline, size, steps and scheduler) through the UNet
    as one batch: the classifier-free-guidance loop of `denoise`, where each job
    keeps its own `Share` (schedulers keep per-batch state: PNDM's ets, DPM++'s
    model outputs), progress, previews and cancel.

    A job whose step hook raises (cancelled, lease lost, a failed write) leaves the
    batch through `on_error(index, exc)`, and the others go on; WorkerShuttingDown
    stops the whole batch. Returns {plan index: images} for the jobs that finished."""
    pipe = plans[0].pipe
    shares = [share_of(plan) for plan in plans]
    timesteps = shares[0].scheduler.timesteps
    n = len(timesteps)
    note = f"batched with {len(plans) - 1} other job(s)"
    live = each_live(list(range(len(plans))), on_error,
                     lambda k: plans[k].ctx.progress(0, n, f"denoising, {note}", phase="denoise"))
    for i, t in enumerate(timesteps):
        if not live:
            break
        # 1. One UNet call on every live job's rows: all unconditional halves, then all conditional ones.
        scaled = [shares[k].scheduler.scale_model_input(torch.cat([shares[k].latents] * 2), t) for k in live]
        sizes = [len(shares[k].latents) for k in live]
        latent_in = torch.cat([x[:m] for x, m in zip(scaled, sizes)] + [x[m:] for x, m in zip(scaled, sizes)])
        text = torch.cat([shares[k].uncond for k in live] + [shares[k].cond for k in live])
        uncond_all, cond_all = pipe.unet(latent_in, t, encoder_hidden_states=text).sample.chunk(2)
        # 2. Each job's guidance and scheduler step on its own rows.
        for k, uncond, cond in zip(live, uncond_all.split(sizes), cond_all.split(sizes)):
            share = shares[k]
            noise = uncond + share.guidance * (cond - uncond)
            share.latents = share.scheduler.step(noise, t, share.latents, **share.step_kwargs).prev_sample
        # 3. Each job's cancel check, progress and previews; a job that stops leaves the batch.
        live = each_live(live, on_error, lambda k: step_done(
            plans[k].ctx, pipe, i + 1, n, shares[k].latents, shares[k].preview_every, i + 1, n,
            f"step {i + 1}/{n}, {note}"))
    images = {}

    def decode_job(k: int) -> None:
        images[k] = decode(pipe, shares[k].latents, plans[k].spec.batch_size)

    each_live(live, on_error, decode_job)
    return images


def png_meta(record: dict) -> dict:
    return {k: v if isinstance(v, str) else str(v) for k, v in record.items() if v is not None}


def write_prompt_outputs(ctx, images, records: list[dict], warnings: list[str], per_prompt: int) -> None:
    """txt2img / img2img outputs: each image with its settings as PNG text, the grid
    (a row per prompt), and manifest.json mapping every image to its prompt and seed."""
    from worker.diffusion import make_grid

    for image, record in zip(images, records):
        ctx.write_image(record["name"], image, png_meta(record))
    several_prompts = len({r["prompt_index"] for r in records}) > 1
    ctx.write_image("grid.png", make_grid(images, cols=per_prompt if several_prompts else None))
    ctx.write_json("manifest.json", {"images": records, "warnings": warnings})
    for warning in warnings:
        ctx.log.warning(warning)
