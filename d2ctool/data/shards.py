"""The shard format: webdataset-compatible tar files plus a manifest.json.

A sample is consecutive tar members `KEY.EXT` sharing a key without dots. Tars are written with
fixed metadata (mtime 0, uid 0, mode 0644), so the same samples always give the same bytes and sha256.

Shards are verified, not trusted: opening a folder checks the manifest's structure and every shard's
size; reading a shard checks its sample count (a tar cut at a 512-byte boundary is a valid shorter
archive); `verify_shards` and `read_shard` also check the sha256. Every failure names the shard.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from d2ctool.errors import UserError
from d2ctool.io import read_json_object
from d2ctool.runstate import MANIFEST

REJECTED = "rejected.jsonl"
IMAGE_FORMAT = "d2c-image-shards"


@dataclass(frozen=True)
class ShardFormat:
    """What readers know of one kind of shard folder; the module that owns a format registers it."""

    made_by: str  # the command that writes it: what to re-run
    required: tuple[str, ...]  # manifest keys beside `shards` that its readers use
    member_check: Callable | None = None  # (manifest, root) -> check(where, members) of its samples' members


FORMATS = {IMAGE_FORMAT: ShardFormat("d2c prepare", ("classes", "class_counts"))}  # data/encoded.py adds its own


def register_format(name: str, fmt: ShardFormat) -> None:
    FORMATS[name] = fmt


def _remake(manifest: dict | None, root) -> str:
    fmt = FORMATS.get((manifest or {}).get("format"))
    command = fmt.made_by if fmt else "the command that made it"
    return f"re-run `{command}` into a new folder to rebuild {root}"


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


def iter_tar(path: str | Path, start: int = 0, stop: int | None = None,
             fileobj=None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for samples start..stop-1 of a shard; skipped samples are not read.

    With `stop`, the shard must hold at least `stop` samples. A damaged tar is a UserError naming the
    shard and the sample where it breaks.
    """
    index, key, members = -1, None, {}
    try:
        with tarfile.open(path if fileobj is None else None, "r", fileobj=fileobj) as tar:
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
    except (tarfile.TarError, EOFError, zlib.error) as e:  # OS faults pass on: the CLI names their path
        where = f", in sample {key!r}" if key is not None else ""
        raise UserError(f"shard {path}: damaged tar{where} ({type(e).__name__}: {e}); "
                        "rebuild the shard folder with the command that wrote it") from None
    if stop is not None and index + 1 < stop:
        raise UserError(f"shard {path}: holds {index + 1} samples, its manifest says at least {stop}; the file is "
                        "truncated: rebuild the shard folder with the command that wrote it")


def read_shard(root: str | Path, entry: dict, manifest: dict | None = None) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of one shard, read once: size, sha256 and sample count checked against the manifest."""
    path = Path(root) / entry["file"]
    data = path.read_bytes()
    problem = _mismatch(entry, len(data), lambda: hashlib.sha256(data).hexdigest())
    if problem:
        raise UserError(f"shard {path}: {problem}; {_remake(manifest, root)}")
    samples = list(iter_tar(path, 0, entry["samples"], fileobj=io.BytesIO(data)))
    if len(samples) != entry["samples"]:
        raise UserError(f"shard {path}: holds more samples than the {entry['samples']} its manifest says; "
                        f"{_remake(manifest, root)}")
    return samples


def _mismatch(entry: dict, size: int, sha256=None) -> str | None:
    if "bytes" in entry and size != entry["bytes"]:
        return f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    if sha256 is not None and "sha256" in entry and sha256() != entry["sha256"]:
        return "its sha256 differs from the manifest's (the file changed since it was written)"
    return None


def verify_shards(root: str | Path, manifest: dict) -> int:
    """Check every shard's sha256 against the manifest (reads every byte once). Returns how many shards had a
    sha256 to check: a manifest entry without one can only be checked by size."""
    from d2ctool.io import sha256_file

    for entry in manifest["shards"]:
        path = Path(root) / entry["file"]
        problem = _mismatch(entry, path.stat().st_size, lambda: sha256_file(path))
        if problem:
            raise UserError(f"shard {path}: {problem}; {_remake(manifest, root)}")
    return sum("sha256" in entry for entry in manifest["shards"])


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


def load_manifest(root: str | Path, kind: str = IMAGE_FORMAT, verify: bool = False) -> dict:
    """Read and check a shard folder's manifest.json and every shard's size (and sha256 with `verify`).

    The error says what to run when something is missing or damaged.
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown shard format {kind!r} (known: {', '.join(FORMATS)}); import the module that "
                         "registers it")
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not a finished shard folder: {MANIFEST} is missing "
                        f"(run `{FORMATS[kind].made_by}` into it, or let an interrupted run finish)")
    manifest = read_json_object(path, _remake({"format": kind}, root))
    if manifest.get("format") != kind:
        raise UserError(f"{path}: expected a {kind} manifest, found format {manifest.get('format')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("samples"), int)
            and s["samples"] >= 0 and "/" not in s["file"] for s in shards):
        raise UserError(f"{path}: no valid 'shards' list (each entry needs 'file' and 'samples'); "
                        f"{_remake(manifest, root)}")
    absent = [key for key in FORMATS[kind].required if key not in manifest]
    if absent or not isinstance(manifest.get("classes"), list):
        raise UserError(f"{path}: incomplete manifest (missing or invalid: {', '.join(absent or ['classes'])}); "
                        f"{_remake(manifest, root)}")
    missing = [s["file"] for s in shards if not (Path(root) / s["file"]).is_file()]
    if missing:
        raise UserError(f"{root}: {len(missing)} shard(s) listed in {MANIFEST} are missing, e.g. {missing[0]}; "
                        f"{_remake(manifest, root)}")
    for entry in shards:
        problem = _mismatch(entry, (Path(root) / entry["file"]).stat().st_size)
        if problem:
            raise UserError(f"shard {Path(root) / entry['file']}: {problem}; {_remake(manifest, root)}")
    if verify:
        verify_shards(root, manifest)
    return manifest


def shard_paths(root: str | Path, kind: str = "d2c-image-shards") -> list[str]:
    """The shard files of a checked folder, in manifest order: what `webdataset.WebDataset` takes to stream our
    shards into a user's own pipeline (see docs/data.md, "Streaming shards into your own pipeline")."""
    return [str(Path(root) / entry["file"]) for entry in load_manifest(root, kind)["shards"]]
