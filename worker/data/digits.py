"""scikit-learn's bundled handwritten digits (1797 8x8 images, labels 0-9), upscaled.

It ships inside scikit-learn, so training works with no network.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

NUM_CLASSES = 10


def load_digits_dataset(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images as float tensors in [-1, 1], shape (N, 1, S, S), and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to 0..255 and resize with PIL (no torchvision here).
    raw = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    resized = np.stack(
        [np.asarray(Image.fromarray(img, mode="L").resize((image_size, image_size), Image.BILINEAR)) for img in raw]
    )
    images = torch.from_numpy(resized).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels
