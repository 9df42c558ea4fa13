"""Resumable output folders: a plan, one record per finished piece, and a manifest written last.

Commands that fill a folder piece by piece (prepare, encode) use this so that a killed run, re-run
with the same arguments, skips finished pieces; a finished run is a no-op; and a folder made with
different arguments, or by something else, is refused instead of being mixed or overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from d2ctool.data.shards import MANIFEST, RESOLVED_CONFIG
from d2ctool.errors import UserError
from d2ctool.io import TMP_SUFFIX, write_json, write_text


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


class OutputFolder:
    def __init__(self, root: str | Path, command: str, plan: dict):
        self.root, self.command, self.plan = Path(root), command, plan
        self.state = self.root / f".d2c-{command}"

    def check(self) -> bool:
        """True when the folder already holds this exact finished run; refuse any other non-empty folder."""
        root = self.root
        if not root.exists():
            return False
        if not root.is_dir():
            raise UserError(f"output {root} exists and is not a folder")
        if (root / MANIFEST).is_file():
            previous = json.loads((root / MANIFEST).read_text()).get("plan")
        elif (self.state / "plan.json").is_file():
            previous = json.loads((self.state / "plan.json").read_text())
        elif any(root.iterdir()):
            raise UserError(f"output {root} is not empty and was not made by `d2c {self.command}`; "
                            "choose a new or empty folder")
        else:
            return False
        if previous != self.plan:
            diff = "; ".join(differences(previous or {}, self.plan)) or "unknown"
            raise UserError(f"output {root} was made with different arguments ({diff}). "
                            "Use the same arguments to resume, or a new folder")
        return (root / MANIFEST).is_file()

    def start(self, resolved_config: str) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".*{TMP_SUFFIX}"):  # temporaries of a killed run
            stale.unlink()
        write_json(self.state / "plan.json", self.plan)
        write_text(self.root / RESOLVED_CONFIG, resolved_config)

    def _record_path(self, index: int) -> Path:
        return self.state / f"{index:06d}.json"

    def done(self, index: int) -> bool:
        """A piece is done when its record exists and so does the file it names (if any)."""
        path = self._record_path(index)
        if not path.is_file():
            return False
        file = json.loads(path.read_text()).get("file")
        return file is None or (self.root / file).is_file()

    def write_record(self, index: int, record: dict) -> None:
        """Call before renaming the piece's file into place: file present => record present."""
        write_json(self._record_path(index), record)

    def records(self, count: int) -> list[dict]:
        return [json.loads(self._record_path(i).read_text()) for i in range(count)]

    def finish(self, manifest: dict) -> dict:
        manifest = {**manifest, "plan": self.plan}
        write_json(self.root / MANIFEST, manifest)
        shutil.rmtree(self.state)
        return manifest
