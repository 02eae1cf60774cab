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
    # speculative decoding (llm.generate.speculative); all 0 for plain decoding
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # of those, tokens the target kept
    target_passes: int = 0  # target forward passes after the prefill (one per round)
    row_passes: int = 0  # sum over those passes of the rows still running
    plain_passes: int = 0  # what plain decoding would have needed: the longest row's new tokens - 1
    # compiled / CUDA-graph decoding: the first step compiles or captures; its time and tokens are kept
    # out of the decode rate (it is a one-off cost, and it would make the rate depend on the cache's state)
    warmup: float = 0.0  # seconds of that first step
    warmup_tokens: int = 0  # tokens it produced
    warmup_what: str = ""  # "compile" or "capture"
    note: str = ""  # appended to the summary line (e.g. how max_new_tokens was chosen)

    def record(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        if not self.ttft:
            self.ttft = self.total

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after each row's first, per second of decoding, the compile/capture step left out
        (None for a single step)."""
        dt, n = self.total - self.ttft - self.warmup, self.new_tokens - self.rows - self.warmup_tokens
        return n / dt if dt > 0 and n > 0 else None

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def spec_line(self) -> str:
        """Speculative decoding's summary: acceptance, tokens per target pass, passes saved."""
        acc = f"{100 * self.acceptance:.1f}%" if self.drafted else "n/a"
        per = 1 + self.accepted / self.row_passes if self.row_passes else 1.0
        return (f"--- speculative: {self.accepted}/{self.drafted} drafted tokens accepted ({acc}) | "
                f"{per:.2f} tokens per row and target pass | {self.target_passes} target passes instead of "
                f"{self.plain_passes} ({self.plain_passes - self.target_passes} saved)")

    def line(self) -> str:
        tps = self.decode_tok_s
        rate = f"{tps:.1f} tok/s decode ({1e3 * self.rows / tps:.2f} ms/step)" if tps else "n/a tok/s decode"
        warm = (f" | {self.warmup_what} {self.warmup:.2f} s (first step, not in the rate)"
                if self.warmup_what else "")
        note = f" | {self.note}" if self.note else ""
        return (f"--- {self.rows} row(s), {self.prompt_tokens} prompt + {self.new_tokens} new tokens | "
                f"TTFT {1e3 * self.ttft:.1f} ms | {rate}{warm} | total {self.total:.2f} s{note}")

