"""Timing of one generation call: time to first token, decode throughput, the summary line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    """Timing of one generation call: time to first token and decode throughput (all rows)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    rows: int = 0
    ttft: float = 0.0  # seconds from the call until every row's first new token is on the host
    total: float = 0.0  # seconds for the whole call

    def record(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        if not self.ttft:
            self.ttft = self.total

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after each row's first, per second of decoding (None for a single step)."""
        dt, n = self.total - self.ttft, self.new_tokens - self.rows
        return n / dt if dt > 0 and n > 0 else None

    def line(self) -> str:
        tps = self.decode_tok_s
        rate = f"{tps:.1f} tok/s decode ({1e3 * self.rows / tps:.2f} ms/step)" if tps else "n/a tok/s decode"
        return (f"--- {self.rows} row(s), {self.prompt_tokens} prompt + {self.new_tokens} new tokens | "
                f"TTFT {1e3 * self.ttft:.1f} ms | {rate} | total {self.total:.2f} s")

