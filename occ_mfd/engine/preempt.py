"""Stopping a training run on request: SIGTERM / SIGINT become "finish this step, checkpoint, return".

Cluster schedulers (SLURM) send SIGTERM some time before they kill a preempted or timed-out job, and a
terminal sends SIGINT on Ctrl-C. :class:`StopSignals` is a context manager the loop wraps around its steps:
inside it the first such signal only records itself (:attr:`StopSignals.signum`), the loop finishes the
current step, writes a checkpoint and returns; a second signal restores the previous handlers and
re-delivers itself to them, so the process exits at once (SIGTERM: killed; SIGINT: ``KeyboardInterrupt``).
A repeat within :data:`REPEAT_WINDOW_S` of the first counts as the same request: one notice often arrives
twice (SLURM signals every process of a step, and torchrun's agent, signalled too, forwards it to its
workers; a terminal's Ctrl-C reaches torchrun and its workers alike). On exit the previous handlers are back. Nothing is installed at import time and the module keeps no state.

The command-line tools exit with :data:`EXIT_PREEMPTED` after such a stop.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

# 128 + SIGTERM: what a shell reports for a job ended by SIGTERM, so batch scripts (SLURM requeue logic)
# treat a graceful stop like the termination it answers; used for SIGINT too, so that one status means
# "stopped on request, checkpoint written, run the same command to resume".
EXIT_PREEMPTED = 128 + signal.SIGTERM

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class StopSignals:
    """``with StopSignals() as stop: ... if stop.signum: ...`` (``signum`` is 0 until a signal arrives)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread install handlers; a run in a thread keeps the old behaviour.
            log.debug("not in the main thread: SIGTERM/SIGINT are not turned into a graceful stop")
            return self
        for s in self.signals:
            prev = signal.getsignal(s)
            # Respect a signal the parent chose to ignore (nohup, `cmd &` in a script ignores SIGINT), and
            # leave alone a handler installed outside Python (getsignal gives None: it cannot be restored).
            if prev in (signal.SIG_IGN, None):
                continue
            self._previous[s] = prev
            signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return                       # the same notice, delivered twice (see the module docstring)
        log.warning(f"second signal ({signal.Signals(signum).name}): exiting at once, without a checkpoint")
        prev = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(prev):
            prev(signum, frame)          # e.g. Python's SIGINT handler: raises KeyboardInterrupt
        else:                            # SIG_DFL: let the default action (termination) happen now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
