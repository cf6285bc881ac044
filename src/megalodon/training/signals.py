"""Ctrl-C and SIGTERM stop a run at a step boundary, so that its checkpoint is exactly resumable.

A KeyboardInterrupt raised in the middle of a step would leave the data cursor (and perhaps the optimizer) one
step ahead of the step counter. Instead the handler only records the request; the training loop looks at it
between steps, checkpoints and returns. Schedulers and `docker stop` send SIGTERM, so it is handled the same way.

A second signal is acknowledged and changes nothing: the step or the checkpoint in progress finishes. It also
puts the previous handlers back, so a third signal acts as it would without us (Ctrl-C raises KeyboardInterrupt,
SIGTERM ends the process) and quits without saving; the checkpoints already on disk stay whole, since each is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active, SIGINT and SIGTERM set `received` (the first signal's number) instead of interrupting."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; elsewhere leave them alone
        for signum in HANDLED:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:  # nohup, or a background job: the user asked for it to be ignored
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            _say(f"\n{name}: stopping after the current step, then saving a checkpoint "
                 f"(press Ctrl-C twice more to quit without saving)\n")
        else:
            _say(f"\n{name}: already stopping; the checkpoint is being saved. Once more quits without saving "
                 "(the previous checkpoint stays).\n")
            self._restore()

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 for Ctrl-C)."""
        return 128 + self.received if self.received else 0


def _say(message: str) -> None:
    # A handler may run while the main thread is inside a print to stderr (tqdm writes there all the time):
    # a buffered write here could then fail as reentrant, so write to the descriptor directly.
    try:
        os.write(sys.stderr.fileno(), message.encode())
    except (OSError, ValueError):
        pass  # stderr closed or not a real file: the stop still happens
