"""Validate a shard sample's members at the boundary, before any of it reaches a model.

`SampleCheck(manifest)` is built once per reader and called on every sample the reader yields. It
checks what is cheap and what would otherwise fail far away (inside a DataLoader worker, or as an
IndexError in an embedding): the label, and the presence of the image, or, for a format that registers
a member check of its own (encoded shards: data/encoded.py), that check: each `.npy` member's dtype,
shape, values. A bad member is
a UserError naming shard, key and member. Image bytes are decoded later, by whoever needs the pixels;
`decode_failure` names the sample a decode error came from.
"""

from __future__ import annotations

import threading

import numpy as np

from d2ctool.data.shards import FORMATS, read_npy
from d2ctool.errors import UserError

IMAGE_EXTS = ("jpg", "png", "webp", "bmp")
_current = threading.local()  # the sample a reader yielded last in this thread: named by decode errors


class SampleCheck:
    def __init__(self, manifest: dict, root):
        self.root = root
        self.num_classes = len(manifest["classes"])
        fmt = FORMATS.get(manifest.get("format"))
        # a format with members of its own (encoded shards: codes and moments) checks them; else an image
        self.members = fmt.member_check(manifest, root) if fmt is not None and fmt.member_check else None

    def __call__(self, shard: str, key: str, members: dict[str, bytes]) -> None:
        where = f"shard {shard}, sample {key!r}"
        _current.where = where
        try:
            label = int(members["cls"])
        except KeyError:
            raise UserError(f"{where}: no 'cls' member (the class label)") from None
        except ValueError:
            raise UserError(f"{where}: member 'cls' is not an integer: {members['cls'][:20]!r}") from None
        if not 0 <= label < self.num_classes:
            raise UserError(f"{where}: class label {label} outside 0..{self.num_classes - 1} (the manifest's classes)")
        if self.members is not None:
            self.members(where, members)
        elif not any(ext in members for ext in IMAGE_EXTS):
            raise UserError(f"{where}: no image member ({', '.join(IMAGE_EXTS)}); found {', '.join(sorted(members))}")


def npy_member(where: str, members: dict, name: str, kind: str, shape: tuple) -> np.ndarray:
    """The array of member `name`, checked: readable without pickles, `kind` "i" (integer) or "f" (float),
    of `shape`; a UserError naming the sample and the member otherwise."""
    if name not in members:
        raise UserError(f"{where}: member {name} is missing")
    try:
        array = read_npy(members[name])
    except (ValueError, EOFError, OSError) as e:  # garbage bytes, a cut header, a pickled object array
        raise UserError(f"{where}, member {name}: not a readable .npy array ({e})") from None
    if array.dtype.kind != kind and not (kind == "i" and array.dtype.kind == "u"):
        expected = "integer" if kind == "i" else "floating-point"
        raise UserError(f"{where}, member {name}: dtype {array.dtype}, expected {expected}")
    if array.shape != shape:
        raise UserError(f"{where}, member {name}: shape {list(array.shape)}, the manifest says {list(shape)}")
    return array


def decode_failure(error: Exception, where: str | None = None) -> UserError:
    """A stored image that does not decode, named by `where` or the sample the reader yielded last in this thread."""
    where = where or getattr(_current, "where", "a shard sample")
    return UserError(f"{where}: the image member is not a decodable image ({type(error).__name__}: {error})")
