"""Structured output: a request's response_format compiled by llguidance into a grammar over the tokenizer's
byte vocabulary, one matcher per sequence, applied as a token bitmask at every step.

Why llguidance (over xgrammar): it reads a tiktoken Encoding as it is (our tokenizers are tiktoken BPEs), it
compiles JSON schemas, regexes and Lark / GBNF grammars with one call each and reports an unusable one with
a reason (the 400's message), it computes the masks of a batch in parallel off the GIL (`LLExecutor`), and
its wheel depends on nothing (xgrammar's pins torch, which this project must never let pip change).

  response_format {"type": "text"}                                   no constraint
                  {"type": "json_object"}                            any JSON object
                  {"type": "json_schema", "json_schema": {"schema": S}}  JSON valid under S
                  {"type": "regex", "regex": R}                      (extension) text matching R
                  {"type": "grammar", "grammar": G}                  (extension) a Lark or GBNF grammar

JSON is compact (no whitespace between tokens) unless the schema's "x-guidance" says otherwise, so a
sampled answer cannot wander off into whitespace. When the grammar is complete the mask allows only the
end-of-text token, so a constrained sequence ends when its value does.
"""

from __future__ import annotations

import json

import llguidance as llg
import torch
from llguidance.tiktoken import lltokenizer_from_encoding
from torch import Tensor

from llm.tokenizer import Tokenizer

JSON_DEFAULTS = {"whitespace_flexible": False}
KINDS = ("text", "json_object", "json_schema", "regex", "grammar")


class GrammarError(ValueError):
    """A response_format that cannot be compiled; the message says why (one line)."""


class Grammars:
    """The llguidance view of one tokenizer: compiles response formats and makes per-sequence matchers."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._lltok: llg.LLTokenizer | None = None

    def lltok(self) -> llg.LLTokenizer:
        """The tokenizer as llguidance sees it (built on first use, ~30 ms for a small vocabulary)."""
        if self._lltok is None:
            if self.tok.info.get("kind") not in ("bpe", "tiktoken"):
                raise GrammarError(f"structured output needs a byte-level BPE tokenizer; this model's is "
                                   f"{self.tok.info.get('kind')!r}")
            self._lltok = lltokenizer_from_encoding(self.tok.enc, n_vocab=self.tok.n_vocab, eos_token=self.tok.eot_id)
        return self._lltok

    def compile(self, kind: str, spec: dict | str | None) -> str | None:
        """The grammar of a response format (None for "text"); GrammarError with llguidance's reason if unusable."""
        if kind == "text":
            return None
        try:
            if kind == "json_object":
                grammar = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
            elif kind == "json_schema":
                grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=JSON_DEFAULTS)
            elif kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(str(spec))
            elif kind == "grammar":
                grammar = llg.grammar_from("grammar", str(spec))
            else:
                raise GrammarError(f"unknown response_format type {kind!r}; one of {', '.join(KINDS)}")
        except ValueError as e:
            raise GrammarError(f"response_format {kind}: {first(e)}") from None
        err = llg.LLMatcher.validate_grammar(grammar, self.lltok())
        if err:
            raise GrammarError(f"response_format {kind} cannot be compiled: {first(err)}")
        return grammar

    def matcher(self, grammar: str) -> llg.LLMatcher:
        m = llg.LLMatcher(self.lltok(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"response_format cannot be compiled: {first(m.get_error())}")
        return m


def first(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class Masker:
    """Token masks of a batch of matchers in one parallel llguidance call."""

    def __init__(self) -> None:
        self.executor = llg.LLExecutor()

    def allowed(self, matchers: list[llg.LLMatcher], vocab: int) -> Tensor:
        """(K, vocab) bool: the tokens each matcher allows next."""
        words = (vocab + 31) // 32
        bits = torch.zeros(len(matchers), words, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.data_ptr(), words * 4,
                                              len(matchers))
        shifts = torch.arange(32, dtype=torch.int32)
        return ((bits[:, :, None] >> shifts) & 1).reshape(len(matchers), -1)[:, :vocab].bool()
