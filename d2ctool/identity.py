"""Content identity of a command's inputs: one sha256 per input, recorded in the plan, checked on reuse.

Every command that reuses or resumes work (sample, encode, the training commands) records its inputs as
`{"name": {"path": ..., "sha256": ...}}`: checkpoint and tokenizer files by their bytes, shard folders by
their manifest.json (which lists every shard's sha256), reference npz files by their bytes. A finished or
half-finished output whose recorded digests differ from the inputs' digests now is refused, naming the input
and both digests (`check_same_inputs`): a model trained further, or data that changed, is never silently
reused. Paths are recorded for people; only the digests decide.

Hashing a multi-GB checkpoint on every `d2c sample` would cost minutes, so digests of files of at least
`CACHE_MIN_BYTES` are cached under the user's cache folder, keyed by the file's identity on disk: real path,
device, inode, size, modification time and change time (ns). Rewriting a file changes its change time (which
no user tool can set back), so a rewritten file is hashed again even when its size and mtime were restored.
`D2C_DIGEST_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from d2ctool.errors import UserError
from d2ctool.io import sha256_file, write_text

CACHE_MIN_BYTES = 64 << 20
FORCE_RESTART = "--force-restart"


def cache_root() -> Path:
    """d2c's cache folder: $D2C_CACHE_DIR, else $XDG_CACHE_HOME/d2c, else ~/.cache/d2c."""
    if os.environ.get("D2C_CACHE_DIR"):
        return Path(os.environ["D2C_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d2c"


def _stat_key(path: Path) -> str:
    st = os.stat(path)
    parts = [os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes; large files go through the digest cache (see the module's docstring)."""
    path = Path(path)
    if path.stat().st_size < CACHE_MIN_BYTES or os.environ.get("D2C_DIGEST_CACHE") == "0":
        return sha256_file(path)
    key = _stat_key(path)
    entry = cache_root() / "sha256" / key
    try:
        cached = entry.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass
    digest = sha256_file(path)
    if _stat_key(path) == key:  # unchanged while it was read: the digest belongs to this state of the file
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_text(entry, digest + "\n")
        except OSError:
            pass  # a read-only or full cache only costs time
    return digest


def shard_folder_sha256(folder: str | Path) -> str:
    """A shard folder's identity: its manifest.json, which lists every shard's size and sha256."""
    return sha256_file(Path(folder) / "manifest.json")


def file_input(path: str | Path) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def shard_input(folder: str | Path) -> dict:
    return {"path": str(Path(folder).resolve()), "sha256": shard_folder_sha256(folder)}


def short(digest: str | None) -> str:
    return f"{digest[:16]}…" if digest else "none"


def changed_inputs(old: dict | None, new: dict | None) -> list[str]:
    """One phrase per input whose digest differs (or that appeared or went away) between two plans."""
    old, new = old or {}, new or {}
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = (old.get(name) or {}).get("sha256"), (new.get(name) or {}).get("sha256")
        if a != b:
            where = (new.get(name) or old.get(name) or {}).get("path")
            out.append(f"{name} ({where}) has sha256 {short(b)} now, {short(a)} when it was made")
    return out


def check_same_inputs(old: dict | None, new: dict | None, out: str | Path, command: str,
                      restart: str = f"add {FORCE_RESTART}") -> None:
    """Refuse to reuse or resume `out` when an input's content changed since `out` was made."""
    changed = changed_inputs(old, new)
    if changed:
        raise UserError(f"{command}: {out} was made from other inputs: {'; '.join(changed)}. To start fresh, "
                        f"write to a new output folder or {restart}")
