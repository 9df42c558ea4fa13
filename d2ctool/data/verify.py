"""Decode a candidate file completely before it is accepted (runs in `prepare`'s worker processes)."""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from d2ctool.data import synthetic
from d2ctool.data.transforms import to_rgb

# Formats kept as they are, and the extension their bytes get in the shards.
ACCEPTED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


def decode_check(data: bytes) -> tuple[str | None, dict]:
    """Return (None, info) for a fully decodable image, else (reason, {})."""
    if not data:
        return "empty file (0 bytes)", {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                if fmt not in ACCEPTED_FORMATS:
                    return f"unsupported image format {fmt} (accepted: {', '.join(ACCEPTED_FORMATS)})", {}
                img.load()  # decodes every byte: truncated or corrupt data raises here
                width, height, mode = img.width, img.height, img.mode
                to_rgb(img)  # CMYK, palette, grayscale, alpha, 16-bit: must convert when read
    except UnidentifiedImageError:
        return "not an image (no known image format in its bytes)", {}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"too large to decode safely: {e}", {}
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt {fmt}: {e}", {}
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})", {}
    return None, {"ext": ACCEPTED_FORMATS[fmt], "width": width, "height": height, "mode": mode}


def load_file(root: str, relpath: str) -> dict:
    """Read and check one source file. Returns {'reason': ...} or {'data', 'ext', 'width', ...}."""
    path = os.path.join(root, relpath)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"reason": f"unreadable: {e.strerror or e}"}
    reason, meta = decode_check(data)
    if reason is not None:
        return {"reason": reason}
    return {"data": data, **meta}


def load_synthetic(num_classes: int, resolution: int, seed: int, index: int) -> dict:
    data, _ = synthetic.render_png(index, num_classes, resolution, seed)
    return {"data": data, "ext": "png", "width": resolution, "height": resolution, "mode": "RGB"}
