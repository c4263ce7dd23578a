"""scikit-learn's bundled handwritten digits (1797 8x8 images, labels 0-9).

They ship inside scikit-learn, so training works with no network.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

NUM_CLASSES = 10
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]


def digits_images() -> tuple[list[Image.Image], list[int]]:
    """The digits as 8x8 grayscale PIL images, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    return [Image.fromarray(img, mode="L") for img in raw], digits.target.tolist()


def load_digits_dataset(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images upscaled to `image_size` as floats in [-1, 1], shape (N, 1, S, S), and int64 labels."""
    images, labels = digits_images()
    resized = np.stack([np.asarray(img.resize((image_size, image_size), Image.BILINEAR)) for img in images])
    return torch.from_numpy(resized).float().div(127.5).sub(1.0).unsqueeze(1), torch.tensor(labels)
