"""Checks on numbers crossing a boundary: arrays read from a user's file, and results about to be written.

NaN compares false with everything, so `value < lo` lets it through every range check; these are the
places that say "not finite" instead. Each failure is a UserError that names the thing and its source.
"""

from __future__ import annotations

import math

from d2ctool.errors import UserError


def count_non_finite(values) -> int:
    """How many entries of a number, numpy array or torch tensor are NaN or ±inf (0 for integer data)."""
    if isinstance(values, (int, bool)):
        return 0
    if isinstance(values, float):
        return 0 if math.isfinite(values) else 1
    try:
        import torch

        if isinstance(values, torch.Tensor):
            if not (values.is_floating_point() or values.is_complex()):
                return 0
            return int((~torch.isfinite(values)).sum())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    import numpy as np

    values = np.asarray(values)
    if values.dtype.kind not in "fc":
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def require_finite(values, what: str, remedy: str = ""):
    """`values` unchanged when every entry is finite, else a UserError naming `what` (and the `remedy`)."""
    bad = count_non_finite(values)
    if bad:
        total = values.numel() if hasattr(values, "numel") else getattr(values, "size", 1)
        raise UserError(f"{what}: {bad} of {total} value(s) are not finite (NaN or infinite)"
                        + (f"; {remedy}" if remedy else ""))
    return values


def non_finite_paths(obj, prefix: str = "") -> list[str]:
    """Dotted paths of the non-finite floats inside a JSON-like object (dicts, lists, numbers)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{prefix or '(value)'} = {obj}"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite_paths(v, f"{prefix}[{i}]")]
    return []


def check_array(array, what: str, *, kinds: str | None = None, ndim: int | None = None,
                shape: tuple | None = None, finite: bool = False, remedy: str = ""):
    """A numpy array read from a file: its dtype kind (numpy's letters: 'f' float, 'u'/'i' integer), number of
    dimensions, shape (None entries match any size) and, when asked, finiteness. Returns the array."""
    import numpy as np

    tail = f"; {remedy}" if remedy else ""
    if not isinstance(array, np.ndarray):
        raise UserError(f"{what}: expected an array, got {type(array).__name__}{tail}")
    if kinds is not None and array.dtype.kind not in kinds:
        raise UserError(f"{what}: has dtype {array.dtype}, expected {_kind_names(kinds)}{tail}")
    if ndim is not None and array.ndim != ndim:
        raise UserError(f"{what}: has shape {list(array.shape)}, expected {ndim} dimension(s){tail}")
    if shape is not None and (array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape))):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise UserError(f"{what}: has shape {list(array.shape)}, expected {expected}{tail}")
    if finite:
        require_finite(array, what, remedy)
    return array


def _kind_names(kinds: str) -> str:
    names = {"f": "floating point", "u": "unsigned integer", "i": "integer", "b": "boolean", "U": "text"}
    return " or ".join(names.get(k, k) for k in kinds)
