"""Progress reporting: a Rich bar on a terminal, plain periodic log lines otherwise (logs, CI, SLURM)."""

from __future__ import annotations

import os
import sys
import time


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts work done out of `total`, showing the rate in `unit`s per second."""

    def __init__(self, total: int, desc: str, unit: str = "img", interval: float | None = None, start: int = 0,
                 enabled: bool | None = None):
        """Off a terminal, a line every `interval` seconds (default $D2C_LOG_INTERVAL, else 10)."""
        if interval is None:
            try:
                interval = float(os.environ.get("D2C_LOG_INTERVAL") or 10.0)
            except ValueError:
                interval = 10.0
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = start
        self.note = ""
        self._start_count = start
        self._t0 = self._last_log = time.monotonic()
        self._tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        if self._tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[note]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(desc, total=total, completed=start, rate="", note="")
            self._bar.start()

    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return (self.done - self._start_count) / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Count `n` more units; `note` (e.g. the current loss) is shown beside the bar."""
        self.done += n
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate():.1f} {self.unit}/s", note=self.note)
        elif time.monotonic() - self._last_log >= self.interval:
            self._last_log = time.monotonic()
            self._log_line()

    def _log_line(self) -> None:
        rate = self.rate()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _fmt_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        note = f", {self.note}" if self.note else ""
        info(f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s{note}, ETA {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
