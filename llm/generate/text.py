"""Output bytes -> text pieces that never split a UTF-8 character or show part of a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """One row's output bytes -> text pieces, cut before the first stop string.

    Holds back an incomplete UTF-8 sequence and any tail that could still grow into a stop string,
    so what has been emitted never needs taking back. Invalid UTF-8 becomes U+FFFD, never an error.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stops = [s.encode() for s in stop if s]
        self.pending, self.stopped = b"", False
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that became final ('' if none)."""
        if self.stopped:
            return ""
        buf = self.pending + data
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, b""
            return self.dec.decode(buf[: min(hits)], final=True)
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - hold:]
        return self.dec.decode(buf[: len(buf) - hold])

    def close(self) -> str:
        """The held-back rest at the end of the output."""
        if self.stopped:
            return ""
        out, self.pending = self.dec.decode(self.pending, final=True), b""
        return out

