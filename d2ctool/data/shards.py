"""The shard format: webdataset-compatible tar files plus a manifest.json.

A sample is consecutive tar members `KEY.EXT` sharing a key without dots. Tars are written with
fixed metadata (mtime 0, uid 0, mode 0644), so the same samples always give the same bytes and sha256.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

from d2ctool.errors import UserError

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
RESOLVED_CONFIG = "config.yaml"


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def write_tar(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write samples [(key, {ext: bytes})] to a tar at `path` (the caller makes it atomic)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot")
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def iter_tar(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for samples start..stop-1 of a shard; skipped samples are not read."""
    index, key, members = -1, None, {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, basename = info.name.rpartition("/")
            stem, _, ext = basename.partition(".")  # webdataset's rule: the key ends at the first dot
            this_key = f"{folder}/{stem}" if folder else stem
            if this_key != key:
                if key is not None and index >= start:
                    yield key, members
                index += 1
                key, members = this_key, {}
                if stop is not None and index >= stop:
                    return
            if index >= start:
                members[ext] = tar.extractfile(info).read()
        if key is not None and index >= start and (stop is None or index < stop):
            yield key, members


def npy_bytes(array) -> bytes:
    """A `.npy` member's bytes (no pickles)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes):
    """The array of a `.npy` member (pickles refused)."""
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def load_manifest(root: str | Path, kind: str = "d2c-image-shards") -> dict:
    """Read and check a shard folder's manifest.json; the error says what to run when it is missing."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not a finished shard folder: {MANIFEST} is missing "
                        "(run `d2c prepare` into it, or let an interrupted run finish)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != kind:
        raise UserError(f"{path}: expected a {kind} manifest, found format {manifest.get('format')!r}")
    missing = [s["file"] for s in manifest["shards"] if not (Path(root) / s["file"]).is_file()]
    if missing:
        raise UserError(f"{root}: {len(missing)} shard(s) listed in {MANIFEST} are missing, e.g. {missing[0]}")
    return manifest
