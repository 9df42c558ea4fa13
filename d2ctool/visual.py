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


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return out


def save_loss_curve(path: str | Path, steps: list[int], losses: list[float], title: str, size=(640, 400)) -> None:
    """loss.png: the logged losses (light) and their smoothed curve (dark) against the step, log-scaled
    when they span more than a decade."""
    import math

    width, height = size
    left, right, top, bottom = 64, 16, 28, 36
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 8), title, fill=(0, 0, 0))
    if finite:
        xs, ys = zip(*finite)
        log = min(ys) > 0 and max(ys) / min(ys) > 10
        f = math.log10 if log else (lambda v: v)
        lo, hi = f(min(ys)), f(max(ys))
        hi = hi if hi > lo else lo + 1
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

        def point(x, y):
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    top + (hi - f(y)) / (hi - lo) * (height - top - bottom))

        draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
        for y, label in ((max(ys), f"{max(ys):.4g}"), (min(ys), f"{min(ys):.4g}")):
            draw.text((4, point(x0, y)[1] - 5), label, fill=(0, 0, 0))
        draw.text((left, height - bottom + 6), f"step {x0}", fill=(0, 0, 0))
        draw.text((width - right - 70, height - bottom + 6), f"step {x1}", fill=(0, 0, 0))
        for series, colour in ((ys, (170, 200, 235)), (smoothed(list(ys)), (20, 80, 160))):
            points = [point(x, y) for x, y in zip(xs, series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())
