"""What `megalodon generate` shows on the terminal while it works, and how it answers Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading

from megalodon.progress import progress_bar

PROGRESS_DELAY_S = 3.0  # a prompt read faster than this shows no bar


class CtrlC:
    """The first Ctrl-C (SIGINT) asks for a clean stop, which the generation polls through `requested`; a second
    one raises KeyboardInterrupt at once. Installed only in the main thread, and never where SIGINT is ignored
    (a background job of a shell script)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[Ctrl-C: stopping cleanly (press it again to quit at once)]", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class PrefillBar:
    """A progress bar on stderr while prompts are read; it appears only when reading one takes longer than
    `delay` seconds, and it is erased when it closes."""

    def __init__(self, n_prompts: int, delay: float | None = None):
        self.n_prompts = n_prompts
        self.delay = PROGRESS_DELAY_S if delay is None else delay
        self._bar = None  # a tqdm bar or a LogProgress, from the first update on
        self._row: int | None = None
        self.read = self.total = 0  # of the prompt being read

    def update(self, row: int, read: int, total: int) -> None:
        if row != self._row:
            self.close()
            self._row = row
            desc = "reading the prompt" if self.n_prompts == 1 else f"reading prompt {row + 1}/{self.n_prompts}"
            self._bar = progress_bar(total=total, desc=desc, unit="tok", unit_scale=True, delay=self.delay, leave=False,
                             file=sys.stderr, dynamic_ncols=True)
        self._bar.update(read - self._bar.n)
        self.read, self.total = read, total

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
