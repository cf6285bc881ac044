"""Generated ids -> text, incrementally: what may be printed now, and whether a stop string appeared.

Two things make "print each token's text" wrong: a multi-byte character can be split across tokens (it decodes
to U+FFFD until its last byte arrives), and a stop string can span tokens (its first characters must not be
printed before we know whether the rest follows). So the tracker holds back an undecodable tail and any tail
that could still grow into a stop string, and releases it once that is settled.
"""

from __future__ import annotations

from megalodon.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextTracker:
    """Follows one row's generated ids; `push` returns the newly printable text."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.settled_text = ""  # decoded text of ids[:settled_ids]
        self.settled_ids = 0
        self.ids: list[int] = []
        self.printed = 0  # characters of `text` already released
        self.stop_at: int | None = None  # character offset where a stop string begins, once seen
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """Everything generated so far, cut before the stop string if one appeared."""
        full = self.settled_text + self._pending_text()
        return full if self.stop_at is None else full[:self.stop_at]

    def _pending_text(self) -> str:
        return self.tokenizer.decode(self.ids[self.settled_ids:]) if self.settled_ids < len(self.ids) else ""

    def push(self, token_id: int, final: bool = False) -> str:
        """Add a token; return the text that can be released now (everything left when final)."""
        self.ids.append(int(token_id))
        pending = self._pending_text()
        # Decoding in pieces is exact for byte-level tokenizers once a piece ends on a whole character.
        if not pending.endswith(REPLACEMENT):
            self.settled_text += pending
            self.settled_ids = len(self.ids)
            pending = ""
        full = self.settled_text + pending
        if self.stop_at is None and self.stop_strings:
            self._find_stop(full)
        if self.stop_at is not None:
            final, full = True, full[:self.stop_at]
        if final:
            release_to = len(full)
        else:
            release_to = len(full) - len(pending) if pending else len(full)
            release_to = min(release_to, len(full) - self._stop_prefix_overlap(full))
        out = full[self.printed:max(release_to, self.printed)]
        self.printed = max(self.printed, release_to)
        return out

    def _find_stop(self, full: str) -> None:
        longest = max(len(s) for s in self.stop_strings)
        search_from = max(0, self.printed - longest)  # text before this was already searched
        hits = [(full.find(s, search_from), s) for s in self.stop_strings]
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            self.stop_at, self.stop_string = min(hits)

    def _stop_prefix_overlap(self, full: str) -> int:
        """Length of the longest tail of `full` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(full)), best, -1):
                if full.endswith(stop[:size]):
                    best = size
                    break
        return best
