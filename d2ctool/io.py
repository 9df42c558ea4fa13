"""Atomic file output: everything is written to a temporary name in the same folder, then renamed.

A reader therefore sees either the complete old file, the complete new one, or none: never a
half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"
# Fault injection for tests: with D2C_KILL_AT_WRITE=k the process SIGKILLs itself at the k-th write event
# (each atomic write has two: the temporary file complete, then renamed into place; a metrics line is one),
# which is deterministic, unlike killing after a delay. D2C_WRITE_LOG=FILE lists the events, one a line.
_write_events = 0


def write_event(path: str | Path, phase: str) -> None:
    global _write_events
    kill_at, log = os.environ.get("D2C_KILL_AT_WRITE"), os.environ.get("D2C_WRITE_LOG")
    if kill_at is None and log is None:
        return
    _write_events += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_write_events} {phase} {path}\n")
    if kill_at is not None and _write_events == int(kill_at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        write_event(path, "written")
        os.replace(tmp, path)
        write_event(path, "renamed")
    except OSError as e:
        if e.filename is None:  # written through a file object (tar, zip, torch.save): name the file for the user
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(OSError):  # the folder may be gone (deleted mid-run): nothing left to clean
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_files(folder: str | Path, files: dict[str, bytes]) -> None:
    """Several files that belong together (a table and its picture), written as one set: every one goes to a
    temporary name first, and only when all are complete on disk are they renamed into place. A failure while
    writing (a full disk) leaves the previous set untouched."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        ready = []
        for name, data in files.items():
            path = folder / name
            tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
            stack.callback(lambda t=tmp: t.unlink(missing_ok=True))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                if e.filename is None:
                    e.filename = str(path)
                raise
            write_event(path, "written")
            ready.append((tmp, path))
        for tmp, path in ready:
            os.replace(tmp, path)
            write_event(path, "renamed")


def json_text(obj, path: str | Path, indent: int | None = 2) -> str:
    """`obj` as JSON for the file `path`; a non-finite number in it is a UserError naming its key: a result
    holding NaN or infinity is never written as if it were complete (JSON has no such numbers either)."""
    from d2ctool.checks import non_finite_paths
    from d2ctool.errors import UserError

    bad = non_finite_paths(obj)
    if bad:
        raise UserError(f"{path}: not written, {len(bad)} value(s) are not finite ({', '.join(bad[:4])}): an input "
                        "holds NaN or infinite numbers, or the computation diverged; check the inputs it came from")
    return json.dumps(obj, indent=indent, allow_nan=False)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json_text(obj, path) + "\n")


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any expensive work.

    A read-only, full or forbidden location fails here with a one-line error instead of at the final write.
    """
    from d2ctool.errors import UserError, describe_os_error

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".d2c-write-probe.{os.getpid()}{TMP_SUFFIX}"
        try:
            with open(probe, "wb") as f:
                f.write(b"d2c")
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write output to {folder}: {describe_os_error(e)}") from None
    return folder


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: str | Path, remedy: str) -> dict:
    """A JSON object from `path`; anything else (not JSON, not an object) is a UserError ending in `remedy`."""
    from d2ctool.errors import UserError

    try:
        obj = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {remedy}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}; {remedy}")
    return obj


def read_npz(path: str | Path, keys: list[str] | None = None, remedy: str = "") -> dict:
    """The arrays `keys` (default: all) of an npz file, read without running code: a damaged zip, a member that is
    not an array, an object array or a pickle is a UserError naming the file and the member."""
    import zipfile
    import zlib

    import numpy as np

    from d2ctool.errors import UserError

    tail = f"; {remedy}" if remedy else ""
    try:
        opened = np.load(path, allow_pickle=False)
        if not hasattr(opened, "files"):
            raise UserError(f"{path}: a single .npy array, not an npz archive of named arrays{tail}")
        with opened as data:
            out = {}
            for key in data.files if keys is None else keys:
                if key not in data.files:
                    continue
                try:
                    out[key] = data[key]
                except ValueError as e:  # object arrays need pickle: refused, the message says so
                    what = "an object array (pickled Python objects, not loaded for safety)" if "allow_pickle" in str(e) \
                        else f"not a readable array ({e})"
                    raise UserError(f"{path}: '{key}' is {what}{tail}") from None
            return out
    except (zipfile.BadZipFile, EOFError, KeyError, zlib.error) as e:
        raise UserError(f"{path}: not a readable npz file ({type(e).__name__}: {e}){tail}") from None
    except ValueError as e:  # e.g. a pickle (np.load refuses it without allow_pickle)
        kind = "a pickle, not loaded for safety" if "allow_pickle" in str(e) else f"not an npz file ({e})"
        raise UserError(f"{path}: {kind}{tail}") from None
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
