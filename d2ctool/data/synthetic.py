"""A built-in class-conditional image set that needs no download (source `synthetic`).

The class decides the shape, how many copies there are and where (the layout), and the colour
family: structure a coarse discrete code captures. Each image adds continuous detail a coarse code
cannot capture exactly: a background colour gradient, a smooth noise texture, directional lighting
on the objects, jittered positions and sizes, and fine grain. Image `i` is a pure function of
(seed, i), so the set is identical on every machine and in every worker process.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "hbars", "vbars", "checker", "star")
LAYOUTS = ("center", "pair", "diagonal", "quad")
PALETTES = ("warm", "cool", "green", "violet", "earth")
PALETTE_HUES = (0.03, 0.58, 0.33, 0.78, 0.10)

# object centres and relative sizes, in [-1, 1] coordinates
_LAYOUT_SLOTS = {
    "center": [(0.0, 0.0, 0.55)],
    "pair": [(-0.48, 0.0, 0.32), (0.48, 0.0, 0.32)],
    "diagonal": [(-0.45, -0.45, 0.3), (0.45, 0.45, 0.3)],
    "quad": [(-0.45, -0.45, 0.25), (0.45, -0.45, 0.25), (-0.45, 0.45, 0.25), (0.45, 0.45, 0.25)],
}

MAX_CLASSES = len(SHAPES) * len(LAYOUTS) * len(PALETTES)


def class_names(num_classes: int) -> list[str]:
    """Names whose sorted order is the class index order."""
    if num_classes > MAX_CLASSES:
        raise ValueError(f"the synthetic source has at most {MAX_CLASSES} classes, asked for {num_classes}")
    return [f"{c:03d}-{'-'.join(_class_parts(c))}" for c in range(num_classes)]


def _class_parts(c: int) -> tuple[str, str, str]:
    shape = SHAPES[c % len(SHAPES)]
    layout = LAYOUTS[(c // len(SHAPES)) % len(LAYOUTS)]
    palette = PALETTES[c // (len(SHAPES) * len(LAYOUTS))]
    return shape, layout, palette


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signed distance-like field of a unit-size shape centred at 0: < 0 inside."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r - 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85
    if shape == "triangle":
        return np.maximum(np.abs(x) * 0.866 + y * 0.5, -y) - 0.5
    if shape == "ring":
        return np.abs(r - 0.75) - 0.25
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(x) - 0.3, np.abs(y) - 1.0), np.maximum(np.abs(x) - 1.0, np.abs(y) - 0.3))
    if shape == "diamond":
        return (np.abs(x) + np.abs(y)) - 1.1
    if shape in ("hbars", "vbars"):
        t = y if shape == "hbars" else x
        bars = np.abs(((t * 2.5 + 0.25) % 1.0) - 0.5) - 0.22
        return np.maximum(bars, np.maximum(np.abs(x), np.abs(y)) - 0.95)
    if shape == "checker":
        cell = np.sign(np.sin(x * 4.0)) * np.sign(np.sin(y * 4.0))
        return np.maximum(-cell * 0.2, np.maximum(np.abs(x), np.abs(y)) - 0.95)
    if shape == "star":
        angle = np.arctan2(y, x) + rng.uniform(0, 0.3)
        return r - (0.7 + 0.3 * np.cos(5.0 * angle))
    raise ValueError(shape)


def _smooth_noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, octaves: int = 4) -> np.ndarray:
    """A smooth random texture in about [-1, 1]: a sum of random plane waves."""
    out = np.zeros_like(x)
    for k in range(octaves):
        freq = 1.5 * 2.0**k
        theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        out += np.sin(freq * (x * np.cos(theta) + y * np.sin(theta)) * np.pi + phase) / 2.0**k
    return out / 1.875


def render(index: int, num_classes: int, resolution: int, seed: int) -> tuple[np.ndarray, int]:
    """Image `index` of the set as uint8 HWC RGB, and its class. Classes cycle so each is balanced."""
    label = index % num_classes
    shape, layout, _ = _class_parts(label)
    hue = PALETTE_HUES[label // (len(SHAPES) * len(LAYOUTS))]
    rng = np.random.default_rng([seed, index])

    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0
    x, y = np.meshgrid(coords, coords)
    pixel = 2.0 / resolution

    # background: a two-colour gradient along a random direction, modulated by smooth texture
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((x * np.cos(angle) + y * np.sin(angle)) * 0.5 + 0.5, 0, 1)[..., None]
    bg_a = _hsv_to_rgb(hue + 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(0.1, 0.4), rng.uniform(0.55, 0.95))
    bg_b = _hsv_to_rgb(hue + 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(0.1, 0.4), rng.uniform(0.15, 0.5))
    image = bg_a * (1 - t) + bg_b * t
    image *= 1.0 + 0.12 * _smooth_noise(rng, x, y)[..., None]

    # objects: the class's shape at the layout's slots, jittered, lit from a random direction
    light = rng.uniform(-1, 1, size=2)
    light /= np.linalg.norm(light) + 1e-6
    for cx, cy, size in _LAYOUT_SLOTS[layout]:
        cx += rng.uniform(-0.08, 0.08)
        cy += rng.uniform(-0.08, 0.08)
        size *= rng.uniform(0.85, 1.15)
        u, v = (x - cx) / size, (y - cy) / size
        dist = _shape_distance(shape, u, v, rng)
        alpha = np.clip(0.5 - dist * size / (1.5 * pixel), 0, 1)[..., None]  # anti-aliased edge
        colour = _hsv_to_rgb(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.55, 0.95), rng.uniform(0.7, 1.0))
        shading = 1.0 + 0.35 * np.clip(u * light[0] + v * light[1], -1.5, 1.5)
        texture = 1.0 + 0.1 * _smooth_noise(rng, u, v, octaves=3)
        obj = colour * (shading * texture)[..., None]
        image = image * (1 - alpha) + obj * alpha

    image += rng.normal(0, 0.015, size=image.shape).astype(np.float32)  # fine grain
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label


def render_png(index: int, num_classes: int, resolution: int, seed: int) -> tuple[bytes, int]:
    """Image `index` as PNG bytes (lossless, so the shards hold exactly what was rendered)."""
    pixels, label = render(index, num_classes, resolution, seed)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), label
