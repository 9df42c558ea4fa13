"""On-disk cache of extracted features, keyed by the input's content hash, the extractor and the settings.

One npz per entry (`<kind>-<key>.npz`), written to a temporary name and renamed, so an interrupted run
leaves no partial entry. An unreadable entry is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from d2ctool.io import atomic_path
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

    def load(self, kind: str, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files if k != "meta"}
                meta = json.loads(str(data["meta"]))
        except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
            info(f"fid: ignoring unreadable cache entry {path} ({type(e).__name__}: {e})")
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
