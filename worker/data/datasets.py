"""One loader for every training dataset: `digits`, `upload:<id>` and `hf:<name>[:split]`.

Each becomes a `TrainData`: uint8 images (N, C, S, S) already resized or padded to
the training size (the seeds' Resize / Pad), optional int64 labels and the class
names. Random flips and the [-1, 1] normalisation happen per batch in the trainer,
so the whole set fits in memory as bytes and needs no DataLoader workers.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

from shared.model_refs import hub_refusal
from shared.specs import DDPMTrainSpec
from shared.uploads import dataset_members
from worker.context import JobContext
from worker.data.digits import CLASS_NAMES, digits_images
from worker import hub


CHANNEL_PROBE = 256  # images looked at to choose 1 or 3 channels when `channels` is empty


class DatasetUnavailable(RuntimeError):
    """The dataset could not be read (offline hub, unknown name, bad column)."""


@dataclass
class TrainData:
    images: torch.Tensor  # uint8, (N, C, S, S)
    labels: torch.Tensor | None  # int64, (N,)
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.images)


def preprocess(image: Image.Image, size: int, mode: str, channels: int) -> np.ndarray:
    """One image to (C, size, size) uint8: `resize` stretches to the square (the
    seeds' Resize((S, S))); `pad` shrinks to fit, then pads centred with black (Pad(2))."""
    image = image.convert("L" if channels == 1 else "RGB")
    if mode == "resize":
        image = image.resize((size, size), Image.BILINEAR)
    else:
        if max(image.size) > size:
            image = ImageOps.contain(image, (size, size), Image.BILINEAR)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    arr = np.asarray(image, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _digits():
    images, labels = digits_images()
    return images, labels, CLASS_NAMES


class ZipImages:
    """The images of a dataset zip, decoded one at a time on access (a list of all
    decoded images could need many GB)."""

    def __init__(self, zf: zipfile.ZipFile, names: list[str]):
        self.zf, self.names = zf, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Image.Image:
        with self.zf.open(self.names[i]) as fh:
            image = Image.open(fh)
            image.load()
        return image


class HubImages:
    """One column of a datasets.Dataset, decoded one row at a time."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Image.Image:
        return self.ds[i][self.column]


def _upload(spec: DDPMTrainSpec, ctx: JobContext):
    path, _ = ctx.fetch_upload(spec.dataset, "dataset")
    zf = zipfile.ZipFile(path)  # read while the job runs; its workdir goes with it
    members, classes = dataset_members(zf, ctx.settings)  # the upload's checks, again
    labels = [label for _, label in members] if classes else None
    return ZipImages(zf, [name for name, _ in members]), labels, classes


def _hub(spec: DDPMTrainSpec, ctx: JobContext):
    import datasets

    name, split = spec.hf_dataset

    def unavailable(why: str, exc: Exception) -> DatasetUnavailable:
        return DatasetUnavailable(hub.load_error(f"dataset hf:{name} (split {split})", why, exc))

    # Checked at submit too; again here, before any download, for a job that waited
    # while the allowlist changed.
    refused = hub_refusal(name, ctx.settings.hub_models_allow, "hub dataset")
    if refused:
        raise DatasetUnavailable(f"dataset hf:{name}: {refused}")
    try:
        offline = hub.lookup("dataset", name, ctx.log)
    except Exception:  # the hub answered: let datasets, which also knows legacy names, decide
        offline = False
    with hub.offline_mode(offline):
        try:
            # No trust_remote_code=False: datasets 4.0 removed loading scripts altogether (a
            # repo or folder with one is refused, its code never runs) and with them the
            # parameter, which it now only tolerates. pyproject.toml requires datasets>=4.0
            # for that reason; before 4.0 the parameter decided whether a script ran.
            ds = datasets.load_dataset(name, split=split)
        except Exception as exc:
            why = "the hub is unreachable and it is not in the local cache" if offline else "unknown name or split?"
            raise unavailable(why, exc) from None
    features = ds.features
    image_col = spec.image_column or next(
        (col for col, f in features.items() if type(f).__name__ == "Image"), None
    )
    if image_col not in features:
        raise DatasetUnavailable(
            f"image_column {image_col!r} is not a column of hf:{name}; columns: {', '.join(features)}"
        )
    label_col = spec.label_column
    if label_col is None and spec.class_conditional is not False:
        label_col = next((col for col, f in features.items() if type(f).__name__ == "ClassLabel"), None)
    if label_col is not None and label_col not in features:
        raise DatasetUnavailable(
            f"label_column {label_col!r} is not a column of hf:{name}; columns: {', '.join(features)}"
        )
    if spec.max_train_samples:
        ds = ds.select(range(min(spec.max_train_samples, len(ds))))
    images = HubImages(ds.select_columns([image_col]), image_col)
    if label_col is None:
        return images, None, None
    raw = ds[label_col]
    names = getattr(features[label_col], "names", None)
    if names is None:  # plain values: number them in sorted order
        names = sorted({str(v) for v in raw})
        index = {n: i for i, n in enumerate(names)}
        raw = [index[str(v)] for v in raw]
    return images, list(raw), list(names)


def load_dataset(spec: DDPMTrainSpec, ctx: JobContext) -> TrainData:
    if spec.dataset == "digits":
        images, labels, classes = _digits()
    elif spec.dataset.startswith("upload:"):
        images, labels, classes = _upload(spec, ctx)
    else:
        images, labels, classes = _hub(spec, ctx)
    count = min(len(images), spec.max_train_samples or len(images))
    if count == 0:
        raise DatasetUnavailable(f"dataset {spec.dataset} has no images")
    labels = labels[:count] if labels is not None else None
    channels = spec.channels or _channels(images[i] for i in range(min(count, CHANNEL_PROBE)))
    arrays = np.empty((count, channels, spec.image_size, spec.image_size), dtype=np.uint8)
    for i in range(count):
        arrays[i] = preprocess(images[i], spec.image_size, spec.resize_mode, channels)
    if spec.class_conditional is False or spec.class_conditional is None and labels is None:
        labels, classes = None, None
    elif labels is None:
        raise DatasetUnavailable(
            f"class_conditional is set but dataset {spec.dataset} has no labels "
            "(for an upload: put each class's images in its own sub-folder)"
        )
    return TrainData(
        torch.from_numpy(arrays),
        torch.tensor(labels, dtype=torch.int64) if labels is not None else None,
        classes,
    )


def _channels(images: Iterable[Image.Image]) -> int:
    """1 when every probed image is grayscale, else 3."""
    return 1 if all(img.mode in ("1", "L", "LA", "I", "I;16", "F") for img in images) else 3
