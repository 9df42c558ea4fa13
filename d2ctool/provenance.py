"""What made an output: the command line, the source's git commit, the versions and the devices."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the d2ctool source, with `+dirty` when it has uncommitted changes; None outside a checkout."""
    source = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def provenance() -> dict:
    """The command line, working folder, git commit and versions of d2c, torch, CUDA and Python."""
    import torch

    from d2ctool import __version__

    return {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "cwd": os.getcwd(), "git_commit": git_commit(),
            "d2ctool": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def devices(device) -> list[str]:
    import torch

    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [platform.processor() or platform.machine()]
