"""Tokenizer over tiktoken: a byte-level BPE trained on our corpus, or a named encoding.

A trained tokenizer is stored in tiktoken's own format (`tokenizer.tiktoken`: one
"base64(token-bytes) rank" line per token); the pre-tokenizer pattern and the special
tokens travel in a small dict (`to_dict`) that checkpoints and data manifests keep.
Training uses the Hugging Face `tokenizers` library (Rust BPE trainer) with the same
split pattern, and its merges become tiktoken ranks.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

# GPT-4 (cl100k) pre-tokenizer pattern: contractions, words, 1-3 digit numbers, punctuation, spaces.
PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"
NAMED = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
FILE = "tokenizer.tiktoken"


class TokenizerError(ValueError):
    """Tokenizer cannot be built or loaded; the message is one line."""


class Tokenizer:
    """Text <-> token ids. `eot_id` ends every document; `n_vocab` counts all ids."""

    def __init__(self, enc: tiktoken.Encoding, info: dict) -> None:
        self.enc, self.info = enc, info
        self.eot_id = enc.eot_token
        self.n_vocab = enc.n_vocab

    # ------------------------------------------------------------------ building

    @classmethod
    def named(cls, name: str) -> Tokenizer:
        """A tiktoken encoding by name; needs its file cached (TIKTOKEN_CACHE_DIR) or network access."""
        if name not in NAMED:
            raise TokenizerError(f"unknown tokenizer {name!r}; named encodings: {', '.join(NAMED)}")
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # network errors come in many types
            raise TokenizerError(
                f"could not load tiktoken encoding {name!r} ({type(e).__name__}): it is downloaded on first use; "
                "put its file in TIKTOKEN_CACHE_DIR or go online once") from None
        return cls(enc, {"kind": "tiktoken", "name": name})

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE with `vocab_size` ids (256 bytes + merges + <|endoftext|>)."""
        from tokenizers import Regex, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        if vocab_size < 257:
            raise TokenizerError(f"vocab_size must be >= 257 (256 bytes + end-of-text), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False, special_tokens=[])
        hf.train_from_iterator(texts, trainer=trainer)
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = hf.get_vocab()  # token string -> id; ids follow merge order after the 256 bytes
        ranks: dict[bytes, int] = {}
        for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            ranks[bytes(byte_of[c] for c in tok)] = len(ranks)
        return cls.from_ranks(ranks)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str = PATTERN, special: dict[str, int] | None = None,
                   name: str = "bpe") -> Tokenizer:
        special = special if special is not None else {EOT: len(ranks)}
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        info = {"kind": "bpe", "file": FILE, "pattern": pattern, "special_tokens": special}
        tok = cls(enc, info)
        tok._ranks = ranks
        return tok

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> dict:
        """Write the rank file (trained BPE) into `directory`; return the dict that reloads it."""
        if self.info["kind"] == "bpe":
            lines = (f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(self._ranks.items(), key=lambda x: x[1]))
            (Path(directory) / FILE).write_text("\n".join(lines) + "\n")
        return dict(self.info)

    @classmethod
    def load(cls, directory: str | Path, info: dict) -> Tokenizer:
        kind = info.get("kind")
        if kind == "tiktoken":
            return cls.named(info["name"])
        if kind != "bpe":
            raise TokenizerError(f"unknown tokenizer kind {kind!r} in {directory}")
        path = Path(directory) / info.get("file", FILE)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file missing: {path}")
        ranks: dict[bytes, int] = {}
        try:
            for line in path.read_text().splitlines():
                if line:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        except ValueError:
            raise TokenizerError(f"tokenizer file {path} is not in tiktoken format") from None
        special = {str(k): int(v) for k, v in info.get("special_tokens", {EOT: len(ranks)}).items()}
        return cls.from_ranks(ranks, info.get("pattern", PATTERN), special)

    # ------------------------------------------------------------------ use

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token strings in the text are plain text unless allow_special."""
        ids = self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)
        return [self.eot_id] + ids if bos else ids

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, never an error."""
        return self.enc.decode([int(i) for i in ids if int(i) < self.n_vocab], errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids if int(i) < self.n_vocab])

    def iter_text(self, ids: Iterable[int]) -> Iterator[str]:
        """Stream text pieces as ids arrive, holding back incomplete UTF-8 sequences."""
        import codecs

        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            piece = dec.decode(self.decode_bytes([i]))
            if piece:
                yield piece
        tail = dec.decode(b"", final=True)
        if tail:
            yield tail


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
