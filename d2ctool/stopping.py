"""Stopping cleanly when asked: pre-emption (SIGTERM), Ctrl-C (SIGINT) and SLURM's warning signal.

Inside `StopSignals()`, these signals only set a flag; the long loops (training steps, sample batches, encode
shards, feature batches) look at it at their next boundary, keep what is finished (training first writes a
checkpoint) and raise `Stopped`, which the CLI prints as one line before exiting with 128 + the signal's number.
A second signal of the same kind stops at once (finished work is still kept: every file is written atomically).
Under torchrun the ranks agree at every boundary (`requested(world, device)`): a signal that reaches one rank
stops them all at the same boundary.

SLURM sends its warning signal `--signal=B:USR1@120` before the end of a job's time; the signal to treat
as "stop" besides SIGTERM and SIGINT is $D2C_STOP_SIGNAL (default SIGUSR1; e.g. SIGUSR2, or "none").
"""

from __future__ import annotations

import os
import signal
import threading

from d2ctool.errors import UserError

STOP_SIGNAL_ENV = "D2C_STOP_SIGNAL"


class Interrupted(BaseException):
    """Ctrl-C outside a loop that stops cleanly. Not a KeyboardInterrupt: Typer would turn that into a silent
    exit 130 before the CLI could say that finished work is kept."""


def interrupt_raises() -> None:
    """From now on, SIGINT raises `Interrupted` (the CLI's handler prints what to do)."""
    def handler(signum, frame):
        raise Interrupted

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


class Stopped(Exception):
    """A command stopped on a signal after keeping its finished work; str(self) is the line to print."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def stop_signals() -> list[signal.Signals]:
    names = ["SIGTERM", "SIGINT"]
    extra = os.environ.get(STOP_SIGNAL_ENV, "SIGUSR1").strip().upper()
    if extra not in ("", "NONE"):
        extra = extra if extra.startswith("SIG") else f"SIG{extra}"
        if not hasattr(signal, extra) or extra in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"${STOP_SIGNAL_ENV}={os.environ[STOP_SIGNAL_ENV]!r} is not a signal that can be "
                            "caught; give e.g. SIGUSR1, SIGUSR2 or none")
        names.append(extra)
    return [getattr(signal, name) for name in dict.fromkeys(names)]


class StopSignals:
    """Context manager: while inside, the stop signals set `received` instead of killing the process.

    Outside the main thread (e.g. a library caller's worker thread) signals cannot be caught: it does nothing.
    """

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == self.received:  # asked twice: stop now
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in stop_signals():
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return self.received.name if self.received is not None else ""

    def requested(self, world: int = 1, device=None) -> bool:
        """Whether to stop now. With several ranks every rank must call it at the same point: they agree
        (any rank signalled stops them all at the same step)."""
        if world == 1:
            return self.received is not None
        import torch

        flag = torch.tensor([0 if self.received is None else int(self.received)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = signal.Signals(int(flag.item()))
        return bool(flag.item())

    def stop(self, message: str) -> Stopped:
        return Stopped(f"stopped by {self.name}: {message}", int(self.received))
