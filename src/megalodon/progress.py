"""Progress of long loops: a tqdm bar on a terminal, plain periodic log lines anywhere else.

A bar redraws itself with a carriage return on every update; in a log file (nohup, CI, a pipe) that is one line
per step, glued together. So when stderr is not a terminal the same calls log one line every `interval` seconds.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

logger = logging.getLogger("megalodon.progress")
LOG_INTERVAL_S = 10.0  # seconds between progress lines in a log


def progress_bar(total: int | None = None, desc: str = "", disable: bool = False, interval: float = LOG_INTERVAL_S,
                 **tqdm_options):
    """A tqdm bar when stderr is a terminal, else a LogProgress with the same methods (update, set_postfix,
    write, close, total, n)."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, disable=disable, **tqdm_options)
    return LogProgress(total, desc, tqdm_options.get("initial", 0), tqdm_options.get("delay", 0.0), interval)


class LogProgress:
    """`desc: n/total (p%), postfix, elapsed, left` logged every `interval` seconds and once at the end; nothing at
    all for a loop that ends within `delay` seconds."""

    def __init__(self, total: int | None, desc: str, initial: int = 0, delay: float = 0.0,
                 interval: float = LOG_INTERVAL_S):
        self.total, self.desc, self.n, self.initial, self.interval = total, desc, initial, initial, interval
        self.start = time.perf_counter()
        self.first_line_at = self.start + delay
        self.last_line_at: float | None = None
        self.postfix = ""
        self.logged_n: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        due = now >= self.first_line_at and now - (self.last_line_at or self.start) >= self.interval
        if due or (self.total is not None and self.n >= self.total and now >= self.first_line_at):
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def write(self, message: str) -> None:
        logger.info(message)

    def close(self) -> None:
        now = time.perf_counter()
        if self.logged_n != self.n and now >= self.first_line_at:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = f", {_clock((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        logger.info("%s: %s%s [%s elapsed%s]", self.desc, done, postfix, _clock(elapsed), left)
        self.last_line_at, self.logged_n = now, self.n


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
