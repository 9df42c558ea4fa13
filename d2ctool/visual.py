"""Image grids: the PNGs a run writes to show what a model does (samples, reconstructions)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from d2ctool.checks import require_finite
from d2ctool.io import write_bytes


def to_uint8(images: torch.Tensor, what: str = "decoded images") -> np.ndarray:
    """Images [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3] (clipped, rounded).

    Non-finite pixels are an error naming `what`: cast to uint8 they would pass for black (or white) pixels.
    """
    require_finite(images, what, "a model, its weights or its latent statistics hold non-finite values, or its "
                                 "settings make it diverge")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: np.ndarray, columns: int, row_labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """uint8 [N, H, W, 3] -> one image, `columns` per row, with an optional text label left of each row."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    label_w = 0 if not row_labels else max(8 * max(len(t) for t in row_labels) // 1 + 6, 24)
    canvas = Image.new("RGB", (label_w + columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas.paste(Image.fromarray(images[i]), (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((3, pad + r * (h + pad) + h // 2 - 5), text, fill=(0, 0, 0))
    return canvas


def save_grid(path: str | Path, images: np.ndarray, columns: int, row_labels: list[str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    grid_image(images, columns, row_labels).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())
