"""Image preprocessing shared by every stage that reads pixels (encode, fid-ref, training grids)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any decoded image. High-bit-depth grayscale (16-bit PNG: mode I;16 or I) is scaled to 8 bits
    with its range kept (Pillow's own conversion clips every value above 255 to white); grayscale, palette,
    CMYK and alpha convert as Pillow does (alpha dropped)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        full = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


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


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
    """[10, size, size, C]: the ten views of LlamaGen's code extraction from an [H, W, C] image, in torchvision
    `TenCrop` order: the four corners (top-left, top-right, bottom-left, bottom-right) and the centre, then the
    same five of the horizontal flip. The centre's offsets are rounded as torchvision rounds them (half to even)."""
    height, width = image.shape[:2]
    if min(width, height) < size:
        raise ValueError(f"ten_crop: a {width}x{height} image is smaller than the {size} px crop")
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    origins = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), (top, left)]
    flipped = image[:, ::-1]
    return np.stack([source[y:y + size, x:x + size] for source in (image, flipped) for y, x in origins])


def to_minus_one_one(image: Image.Image) -> np.ndarray:
    """uint8 RGB image -> float32 CHW array in [-1, 1]."""
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0
