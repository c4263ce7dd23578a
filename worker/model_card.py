"""The README.md model card of a `ddpm.train` job's exported model/ folder.

Made with diffusers' model-card helpers, as diffusers' training scripts make theirs.
Besides the training params, data and metrics it holds a snippet that samples the
model with stock diffusers: `DDPMPipeline` for an unconditional model; for a
class-conditional one, which `DDPMPipeline` cannot sample (it passes the UNet no
class labels), a short loop over the UNet and the folder's scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path

from shared.specs import DDPMTrainSpec
from worker import hub

CARD_NAME = "README.md"
UNCONDITIONAL_IMAGES = 4  # what the unconditional snippet writes; the conditional one writes one per class
# Where the job's `?prefix=model/` archive unzips: the snippet runs as is beside it.
SNIPPET_MODEL_DIR = "model"


def sampling_snippet(spec: DDPMTrainSpec, class_conditional: bool) -> str:
    """Python that samples the exported folder with the job's sampler and step count
    (those of its sample grids) and writes the images as PNGs."""
    ddim = spec.sample_scheduler == "ddim"
    if not class_conditional:
        lines = [
            "import torch",
            f"from diffusers import {'DDIMScheduler, ' if ddim else ''}DDPMPipeline",
            "",
            f'model_dir = "{SNIPPET_MODEL_DIR}"  # this folder',
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            "pipeline = DDPMPipeline.from_pretrained(model_dir).to(device)",
            *(["pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)"] if ddim else []),
            f"images = pipeline(batch_size={UNCONDITIONAL_IMAGES}, num_inference_steps={spec.sample_steps},",
            "                  generator=torch.manual_seed(0)).images",
            "for i, image in enumerate(images):",
            '    image.save(f"sample-{i}.png")',
        ]
        return "\n".join(lines)
    scheduler = "DDIMScheduler" if ddim else "DDPMScheduler"
    return f'''import json
from pathlib import Path

import torch
from diffusers import {scheduler}, UNet2DModel
from PIL import Image

model_dir = Path("{SNIPPET_MODEL_DIR}")  # this folder
device = "cuda" if torch.cuda.is_available() else "cpu"
unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").to(device).eval()
scheduler = {scheduler}.from_pretrained(model_dir, subfolder="scheduler")
class_names = json.loads((model_dir / "class_names.json").read_text())

# One image per class: a label is an index into class_names.
labels = torch.arange(len(class_names), device=device)
generator = torch.manual_seed(0)
size = unet.config.sample_size
x = torch.randn((len(labels), unet.config.in_channels, size, size), generator=generator).to(device)
scheduler.set_timesteps({spec.sample_steps})
with torch.no_grad():
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample

# [-1, 1] to 8-bit pixels: grayscale for one channel, RGB for three.
pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
for label, image in zip(labels.tolist(), pixels):
    path = f"sample-{{label:03d}}.png"
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    print(path, class_names[label])'''


def describe_dataset(dataset: str) -> str:
    if dataset == "digits":
        return "`digits`: scikit-learn's handwritten digits (8×8 px, upscaled)"
    if dataset.startswith("upload:"):
        return f"`{dataset}`: a zip uploaded to diffqueue"
    return f"`{dataset}`: a Hugging Face dataset"


def card_body(spec: DDPMTrainSpec, job_id: str, metrics: dict, in_channels: int) -> str:
    classes = metrics["classes"]
    resumed = metrics["resumed_from_step"]
    how = (
        "It is class-conditional, so `DDPMPipeline.from_pretrained(...)()` cannot sample it: the pipeline gives "
        "the UNet no class labels (\"class_labels should be provided\"). This loop, with stock diffusers only, "
        "passes them and writes one PNG per class:"
        if classes else
        "It is a `DDPMPipeline` folder; this samples it with stock diffusers and writes the images as PNGs:"
    )
    rows = [
        ("Dataset", f"{describe_dataset(spec.dataset)}; {metrics['dataset_size']} images"),
        ("Images", f"{spec.image_size}×{spec.image_size} px, {in_channels} channel{'s' if in_channels > 1 else ''}"),
        # A class name may hold a "|" (a folder name, a dataset's label): it would end the cell.
        ("Classes", ", ".join(f"`{c}`".replace("|", "\\|") for c in classes) if classes else "none: unconditional"),
        ("Steps trained", f"{metrics['steps']}" + (f" (resumed from step {resumed})" if resumed is not None else "")),
        ("Final loss", f"{metrics['final_loss']:.6f} (MSE on the `{spec.prediction_type}` target, last step)"),
        ("Noise schedule", f"`{spec.beta_schedule}`, {spec.num_train_timesteps} timesteps"),
        ("Weights", "EMA" if spec.use_ema else "as trained (no EMA)"),
        ("UNet parameters", f"{metrics['num_params']:,}"),
        ("Trained on", f"{metrics['device']}, mixed precision `{metrics['mixed_precision']}`, "
                       f"{metrics['wall_time_s']} s of training"),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    params = json.dumps(spec.model_dump(mode="json"), indent=2)
    return f"""# DDPM from diffqueue job `{job_id}`

A diffusers `UNet2DModel` with a `DDPMScheduler`, trained from scratch by a diffqueue
`ddpm.train` job.

## How to sample it

{how}

```python
{sampling_snippet(spec, bool(classes))}
```

Run it from the folder that holds this one: the job's model archive unzips to `{SNIPPET_MODEL_DIR}/`.

## Training

{table}

### Metrics

```json
{json.dumps(metrics, indent=2)}
```

### Training params

The job's validated params (preset values filled in):

```json
{params}
```
"""


def write_model_card(model_dir: Path, spec: DDPMTrainSpec, job_id: str, metrics: dict, in_channels: int) -> Path:
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    body = card_body(spec, job_id, metrics, in_channels)
    # Offline: the card is never looked up on the hub, so the job's repo name misses in
    # the local cache at once and a fresh card comes from diffusers' training template.
    with hub.offline_mode(True):
        card = load_or_create_model_card(f"diffqueue/ddpm-{job_id}", from_training=True, inference=False,
                                         model_description=body)
    # The template's other sections are TODOs for a person to fill (how to use, training
    # data); the body answers them all, so it replaces them rather than sit above them.
    card.text = body
    tags = ["diffusers", "diffusers-training", "ddpm", "diffqueue",
            "class-conditional" if metrics["classes"] else "unconditional-image-generation"]
    card = populate_model_card(card, tags=tags)
    if spec.hf_dataset:
        card.data.datasets = [spec.hf_dataset[0]]
    path = Path(model_dir) / CARD_NAME
    card.save(path)
    return path
