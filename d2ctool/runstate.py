"""Resumable output folders: a plan, one record per finished piece, and a manifest written last.

Commands that fill a folder piece by piece (prepare, encode) use this so that a killed run, re-run
with the same arguments, skips finished pieces; a finished run is a no-op; and a folder made with
different arguments, or by something else, is refused instead of being mixed or overwritten.

Every writing command holds an exclusive lock on its output folder (`lock_output`) for the whole run,
so a second run into the same folder stops at once instead of deleting the first one's temporaries.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from d2ctool.errors import UserError
from d2ctool.io import TMP_SUFFIX, check_writable, read_json_object, write_json, write_text

MANIFEST = "manifest.json"  # written last: its presence means the folder is finished
RESOLVED_CONFIG = "config.yaml"  # the resolved settings the folder was made with
LOCK_FILE = ".d2c-lock"
PROVENANCE = "provenance.json"  # command line, git commit, versions, start and end of the run that finished OUT
_held: dict[str, int] = {}  # real path of a locked folder -> the open lock file (kept until exit or release)


def lock_output(root: str | Path) -> None:
    """Take the exclusive lock on output folder `root` (created, and checked writable) for this process.

    The lock is `flock` on OUT/.d2c-lock, so the kernel drops it when the process ends however it ends: a
    killed run leaves no lock that blocks the next one. Re-entrant within a process; under torchrun only
    rank 0 takes it (all ranks of one run share the folder).
    """
    import fcntl

    from d2ctool.distributed import rank_and_world

    root = check_writable(root)
    key = os.path.realpath(root)
    if key in _held or rank_and_world()[0] != 0:
        return
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        pid, since = (holder + ["?", "?"])[:2]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since))) if since.replace(".", "").isdigit() else since
        raise UserError(f"{root} is being written by process {pid} since {when}; wait for it to finish, or "
                        "choose another output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
    _held[key] = fd


def release_output(root: str | Path) -> None:
    """Give the lock back before the process ends (library callers running several commands in one process)."""
    fd = _held.pop(os.path.realpath(root), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files (`.NAME.PID.tmp`) a killed run of this command left in `folder`; call while locked."""
    stale = sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable `key: old there, new now` lines between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _read_json(path: Path) -> dict:
    return read_json_object(path, "it is damaged: remove the output folder and re-run")


class OutputFolder:
    """`plan` holds everything that decides the output; its `inputs` entry, `{name: {"path", "sha256"}}`, the
    content identity of every input (see d2ctool.identity). With `force_restart` a folder this command made
    from other inputs or settings is started afresh instead of refused."""

    def __init__(self, root: str | Path, command: str, plan: dict, force_restart: bool = False):
        self.root, self.command, self.plan, self.force_restart = Path(root), command, plan, force_restart
        self.state = self.root / f".d2c-{command}"

    def _previous(self) -> dict | None:
        """The plan this folder was made with; None for an empty folder; refuses a folder made by something else."""
        root = self.root
        if (root / MANIFEST).is_file():
            return _read_json(root / MANIFEST).get("plan") or {}
        if (self.state / "plan.json").is_file():
            previous = _read_json(self.state / "plan.json")
            # started but nothing finished (e.g. stopped by a check): start afresh
            return previous if previous == self.plan or any(self.state.glob("[0-9]*.json")) else None
        if any(p.name != LOCK_FILE and not p.name.endswith(TMP_SUFFIX) for p in root.iterdir()):
            # temporaries do not count: under torchrun another rank's write probe may be there right now
            raise UserError(f"output {root} is not empty and was not made by `d2c {self.command}`; "
                            "choose a new or empty folder")
        return None

    def check(self) -> bool:
        """True when the folder already holds this exact finished run; refuse any other non-empty folder.

        Under torchrun every rank calls this (rank 0 restarts a folder first when asked to)."""
        from d2ctool import distributed
        from d2ctool.identity import FORCE_RESTART, check_same_inputs

        root = self.root
        if root.exists() and not root.is_dir():
            raise UserError(f"output {root} exists and is not a folder")
        if (root / MANIFEST).is_file() and _read_json(root / MANIFEST).get("plan") == self.plan:
            return True  # finished: only read, so a finished folder on a read-only mount is "nothing to do" too
        lock_output(root)
        if self.force_restart:
            if distributed.rank_and_world()[0] == 0 and self._previous() not in (None, self.plan):
                self.restart()
            distributed.barrier()
        previous = self._previous()
        if previous is None:
            return False
        if previous != self.plan:
            if "inputs" in previous:
                check_same_inputs(previous["inputs"], self.plan.get("inputs"), root, f"d2c {self.command}")
            diff = "; ".join(differences(previous, self.plan)) or "unknown"
            raise UserError(f"output {root} was made with different arguments ({diff}). Use the same arguments "
                            f"to resume, a new folder, or {FORCE_RESTART} to start it afresh")
        return (root / MANIFEST).is_file()

    def restart(self) -> None:
        """Forget what this command made in the folder (--force-restart): the manifest first, so that nothing
        looks finished at any instant, then every finished piece; the pieces' files are made again."""
        (self.root / MANIFEST).unlink(missing_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.forget_pieces()
        write_json(self.state / "plan.json", self.plan)

    def start(self, resolved_config: str) -> None:
        from d2ctool.provenance import now

        self.started = now()
        lock_output(self.root)
        self.state.mkdir(parents=True, exist_ok=True)
        clean_temporaries(self.root)  # temporaries of a killed run
        clean_temporaries(self.state)
        write_json(self.state / "plan.json", self.plan)
        write_text(self.root / RESOLVED_CONFIG, resolved_config)

    def _record_path(self, index: int) -> Path:
        return self.state / f"{index:06d}.json"

    def done(self, index: int) -> bool:
        """A piece is done when its record exists and so does the file it names (if any)."""
        path = self._record_path(index)
        if not path.is_file():
            return False
        try:
            file = _read_json(path).get("file")
        except UserError:  # a damaged record: the piece is redone, never trusted
            return False
        return file is None or (isinstance(file, str) and (self.root / file).is_file())

    def write_record(self, index: int, record: dict) -> None:
        """Call before renaming the piece's file into place: file present => record present."""
        write_json(self._record_path(index), record)

    def forget_pieces(self) -> None:
        """Drop every piece's record: the next run redoes them all (e.g. after the source was fixed)."""
        for path in self.state.glob("[0-9]*.json"):
            path.unlink()

    def records(self, count: int) -> list[dict]:
        return [_read_json(self._record_path(i)) for i in range(count)]

    def finish(self, manifest: dict) -> dict:
        from d2ctool.provenance import now, provenance

        # what made the output, beside the manifest: the manifest itself stays a function of the inputs and settings
        write_json(self.root / PROVENANCE, {**provenance(), "started": getattr(self, "started", None),
                                            "finished": now()})
        manifest = {**manifest, "plan": self.plan}
        write_json(self.root / MANIFEST, manifest)
        shutil.rmtree(self.state)
        return manifest
