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


def ten_crop(image: Image.Image, size: int) -> list[Image.Image]:
    """The ten views of LlamaGen's code extraction, in torchvision `TenCrop` order: the four corners
    (top-left, top-right, bottom-left, bottom-right) and the centre of `image`, then the same five of its
    horizontal flip. The centre's offsets are rounded as torchvision rounds them (half to even)."""
    width, height = image.size
    if min(width, height) < size:
        raise ValueError(f"ten_crop: a {width}x{height} image is smaller than the {size} px crop")

    def five(img: Image.Image) -> list[Image.Image]:
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        boxes = [(0, 0), (width - size, 0), (0, height - size), (width - size, height - size), (left, top)]
        return [img.crop((x, y, x + size, y + size)) for x, y in boxes]

    return five(image) + five(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def to_minus_one_one(image: Image.Image) -> np.ndarray:
    """uint8 RGB image -> float32 CHW array in [-1, 1]."""
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0
