"""On-disk cache of extracted features, keyed by the input's content hash, the extractor and the settings.

One npz per entry (`<kind>-<key>.npz`), written to a temporary name and renamed, so an interrupted run
leaves no partial entry. An unreadable, non-finite or mis-shaped entry is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from d2ctool.checks import check_array
from d2ctool.errors import UserError
from d2ctool.io import atomic_path, read_npz
from d2ctool.progress import info


def default_cache_dir() -> Path:
    from d2ctool.identity import cache_root

    return cache_root() / "fid"


def make_cache(cfg) -> "FeatureCache":
    """The cache a `fid` recipe section asks for (fid.cache, fid.cache_dir)."""
    return FeatureCache((cfg.cache_dir or default_cache_dir()) if cfg.cache else None)


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class FeatureCache:
    """`root=None` disables caching (every load misses, saves do nothing)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root is not None else None

    def path(self, kind: str, key: str) -> Path | None:
        return self.root / f"{kind}-{key}.npz" if self.root is not None else None

    def load(self, kind: str, key: str, check: Callable[[dict, dict], None] | None = None
             ) -> tuple[dict[str, np.ndarray], dict] | None:
        """The entry's (arrays, meta), or None when absent, unreadable, or refused by `check` (which raises a
        UserError naming the problem): such an entry is recomputed, never trusted."""
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            arrays = read_npz(path)
            meta = json.loads(str(arrays.pop("meta")))
            if not isinstance(meta, dict):
                raise UserError("its metadata is not a JSON object")
            for name, array in arrays.items():
                check_array(array, name, finite=True)
            if check is not None:
                check(arrays, meta)
        except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
            info(f"fid: ignoring damaged cache entry {path} ({type(e).__name__}: {e}); recomputing it")
            return None
        return arrays, meta

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path | None:
        path = self.path(kind, key)
        if path is None:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        except OSError as e:  # a full or read-only cache must not lose the run's results
            info(f"fid: could not write the feature cache {path} ({e}); continuing without it")
            return None
        return path
