"""Image preprocessing shared by every stage that reads pixels (encode, fid-ref, training grids)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion `center_crop_arr`), used by MAR, LlamaGen and the evaluator.

    Box-downsample by 2 while the short side is >= 2*size, bicubic-resize the short side to `size`
    (long side rounded), then crop the centre (offsets rounded down).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_minus_one_one(image: Image.Image) -> np.ndarray:
    """uint8 RGB image -> float32 CHW array in [-1, 1]."""
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0
