"""Tokenizer over tiktoken: a byte-level BPE trained on our corpus, or a named encoding.

A trained tokenizer is stored in tiktoken's own format (`tokenizer.tiktoken`: one
"base64(token-bytes) rank" line per token); the pre-tokenizer pattern and the special
tokens travel in a small dict (`to_dict`) that checkpoints and data manifests keep.
Training uses the Hugging Face `tokenizers` library (Rust BPE trainer) with the same
split pattern, and its merges become tiktoken ranks.

Hugging Face tokenizer files (`from_hf`): byte-level BPE (GPT-2 `vocab.json` + `merges.txt`,
or a `tokenizer.json` as Llama 3 / Qwen ship) becomes a tiktoken encoding with the file's
pre-tokenizer regex and added tokens; any other `tokenizer.json` runs through the
`tokenizers` library behind the same interface (kind "hf").
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import tiktoken

# GPT-4 (cl100k) pre-tokenizer pattern: contractions, words, 1-3 digit numbers, punctuation, spaces.
PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# GPT-2's pre-tokenizer (the `ByteLevel(use_regex=True)` pre-tokenizer of Hugging Face tokenizers).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
NAMED = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
FILE = "tokenizer.tiktoken"
EXTRA_KEYS = ("eot", "bos", "add_bos", "normalize", "always", "chat_template")  # info keys a BPE reload keeps


class TokenizerError(ValueError):
    """Tokenizer cannot be built or loaded; the message is one line."""


class Tokenizer:
    """Text <-> token ids. `eot_id` ends every document; `n_vocab` counts all ids.

    `bos_id` is what `encode(bos=True)` puts first (the end-of-text id unless the tokenizer
    names a BOS token); `add_bos` says whether the model's own tokenizer adds it by default.
    """

    def __init__(self, enc: tiktoken.Encoding, info: dict) -> None:
        self.enc, self.info = enc, info
        self.eot_id = enc.encode_single_token(info["eot"]) if info.get("eot") else enc.eot_token
        self.bos_id = enc.encode_single_token(info["bos"]) if info.get("bos") else self.eot_id
        self.add_bos = bool(info.get("add_bos", False))
        self.n_vocab = enc.n_vocab
        self._norm: str | None = info.get("normalize")
        self._always = frozenset(info.get("always", ()))  # added tokens matched in any text (HF non-special)
        self._holes: frozenset[int] = frozenset()  # ids below n_vocab that name no token

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
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        vocab = hf.get_vocab()  # token string -> id; ids follow merge order after the 256 bytes
        ranks: dict[bytes, int] = {}
        for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            ranks[bytes(byte_of[c] for c in tok)] = len(ranks)
        return cls.from_ranks(ranks)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str = PATTERN, special: dict[str, int] | None = None,
                   name: str = "bpe", extra: dict | None = None) -> Tokenizer:
        """tiktoken encoding from BPE ranks; `extra` holds optional info keys (eot, bos, add_bos, normalize, always)."""
        special = special if special is not None else {EOT: len(ranks)}
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        info = {"kind": "bpe", "file": FILE, "pattern": pattern, "special_tokens": special, **(extra or {})}
        tok = cls(enc, info)
        tok._ranks = ranks
        used = set(ranks.values()) | set(special.values())
        if len(used) < tok.n_vocab:
            tok._holes = frozenset(set(range(tok.n_vocab)) - used)
        return tok

    @classmethod
    def from_hf(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a Hugging Face model directory (tokenizer.json, or vocab.json + merges.txt)."""
        d = Path(directory)
        tcfg = _read_json(d / "tokenizer_config.json")
        if (d / "tokenizer.json").is_file():
            spec = _read_json(d / "tokenizer.json")
            added = {t["content"]: t for t in spec.get("added_tokens", [])}
            vocab, merges, pattern, normalize = _byte_level_bpe(spec)
            bos_first = _template_bos(spec.get("post_processor"))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            vocab = _read_json(d / "vocab.json")
            merges = [ln for ln in (d / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if ln and not ln.startswith("#version")]
            pattern, normalize, bos_first = GPT2_PATTERN, None, None
            added = {c: {"content": c, "id": vocab[c], "special": True} for c in [EOT] if c in vocab}
            for i, t in (tcfg.get("added_tokens_decoder") or {}).items():
                added[t["content"]] = {"content": t["content"], "id": int(i), "special": t.get("special", True)}
        else:
            raise TokenizerError(f"no tokenizer in {d} (need tokenizer.json, or vocab.json + merges.txt)")
        eot = _special_name(tcfg.get("eos_token")) or _eos_from_model_config(d, vocab, added) or \
            (EOT if EOT in added or EOT in (vocab or {}) else None)
        if eot is None:
            raise TokenizerError(f"{d}: cannot tell the end-of-text token (no eos_token in tokenizer_config.json, "
                                 "no eos_token_id in config.json)")
        bos = bos_first or _special_name(tcfg.get("bos_token"))
        add_bos = bos_first is not None or bool(tcfg.get("add_bos_token", False))
        info = {"eot": eot, "bos": bos, "add_bos": add_bos} | _chat_template(d, tcfg)
        ranks = _ranks_from_merges(vocab, merges, added) if vocab is not None else None
        try:
            if ranks is None:  # not plain byte-level BPE: the tokenizers library runs it
                return cls._from_tokenizers(d / "tokenizer.json", {"kind": "hf", "file": "tokenizer.json", **info})
            special = {c: t["id"] for c, t in added.items()}
            always = sorted(c for c, t in added.items() if not t.get("special", True))
            extra = {**info, "always": always, **({"normalize": normalize} if normalize else {})}
            return cls.from_ranks(ranks, pattern, special, name=d.name or "hf", extra=extra)
        except KeyError as e:
            raise TokenizerError(f"{d}: the tokenizer has no token {e} (named as eos/bos)") from None

    @classmethod
    def from_byte_level(cls, vocab: dict[str, int], merges: list, added: dict, pattern: str, info: dict,
                        name: str = "bpe") -> Tokenizer:
        """A byte-level BPE given as byte-level strings -> ids, "a b" merges and added tokens ({content: {"id",
        "special"}}), as GGUF files hold it; TokenizerError when tiktoken would not give the file's ids."""
        ranks = _ranks_from_merges(vocab, merges, added)
        if ranks is None:
            raise TokenizerError("the BPE vocabulary is not one tiktoken reproduces (merges out of id order, or "
                                 "tokens no merge makes)")
        special = {c: t["id"] for c, t in added.items()}
        always = sorted(c for c, t in added.items() if not t.get("special", True))
        try:
            return cls.from_ranks(ranks, pattern, special, name=name, extra={**info, "always": always})
        except KeyError as e:
            raise TokenizerError(f"the tokenizer has no token {e} (named as eos/bos)") from None

    @classmethod
    def _from_tokenizers(cls, path: Path, info: dict) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a plain Exception
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        tok = cls(_TokenizersEncoding(hf), info)
        tok._holes = tok.enc.holes
        return tok

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> dict:
        """Write the rank file (trained BPE) into `directory`; return the dict that reloads it."""
        if self.info["kind"] == "bpe":
            lines = (f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(self._ranks.items(), key=lambda x: x[1]))
            (Path(directory) / FILE).write_text("\n".join(lines) + "\n")
        elif self.info["kind"] == "hf":
            self.enc.hf.save(str(Path(directory) / self.info["file"]))
        return dict(self.info)

    @classmethod
    def load(cls, directory: str | Path, info: dict) -> Tokenizer:
        kind = info.get("kind")
        if kind == "tiktoken":
            return cls.named(info["name"])
        if kind == "hf":
            path = Path(directory) / info.get("file", "tokenizer.json")
            if not path.is_file():
                raise TokenizerError(f"tokenizer file missing: {path}")
            return cls._from_tokenizers(path, info)
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
        extra = {k: info[k] for k in EXTRA_KEYS if k in info}
        return cls.from_ranks(ranks, info.get("pattern", PATTERN), special, extra=extra)

    def special_tokens(self) -> dict[str, int]:
        """Special-token string -> id."""
        return dict(self.enc._special_tokens)

    def with_special(self, tokens: Iterable[str], **info) -> Tokenizer:
        """A copy with `tokens` added as special tokens after the last id; `info` sets keys such as eot, bos,
        chat_template. Byte-level BPE tokenizers only (ours, named tiktoken ones, HF byte-level BPE)."""
        if self.info["kind"] not in ("bpe", "tiktoken"):
            raise TokenizerError(f"cannot add special tokens to a {self.info['kind']!r} tokenizer (only byte-level "
                                 "BPE ones); give the model a chat template that uses its own tokens")
        ranks = self._ranks if self.info["kind"] == "bpe" else self.enc._mergeable_ranks
        special, nxt = self.special_tokens(), self.n_vocab
        for t in tokens:
            if t not in special:
                special[t], nxt = nxt, nxt + 1
        extra = {k: self.info[k] for k in EXTRA_KEYS if k in self.info} | info
        return Tokenizer.from_ranks(ranks, self.enc._pat_str, special, name=self.enc.name, extra=extra)

    # ------------------------------------------------------------------ use

    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        """Ids of `text` (bos=True puts `bos_id` first). Special-token strings are plain text unless allow_special."""
        if self._norm:
            text = unicodedata.normalize(self._norm, text)
        if allow_special:
            ids = self.enc.encode(text, allowed_special="all")
        elif self._always:
            ids = self.enc.encode(text, allowed_special=self._always, disallowed_special=())
        else:
            ids = self.enc.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        if self._norm or self._always:
            return [self.encode(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def _known(self, ids: Iterable[int]) -> list[int]:
        return [j for j in map(int, ids) if 0 <= j < self.n_vocab and j not in self._holes]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, never an error."""
        return self.enc.decode(self._known(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(self._known(ids))


def bytes_to_unicode() -> dict[int, str]:
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


# ----------------------------------------------------------------------------- Hugging Face files


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from None


def _chat_template(d: Path, tcfg: dict) -> dict:
    """{"chat_template": text} from chat_template.jinja or tokenizer_config.json ({} when the model has none)."""
    t = (d / "chat_template.jinja").read_text(encoding="utf-8") if (d / "chat_template.jinja").is_file() else \
        tcfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        t = next((x["template"] for x in t if x.get("name") == "default"), None)
    return {"chat_template": t} if isinstance(t, str) and t else {}


def _special_name(tok) -> str | None:
    """A token named in tokenizer_config.json: a string or {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _template_bos(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence (Llama 3: BOS)."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        return next((b for p in post.get("processors", []) if (b := _template_bos(p))), None)
    single = post.get("single") or []
    if post.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
        return single[0]["SpecialToken"]["id"]
    return None


def _eos_from_model_config(d: Path, vocab: dict | None, added: dict) -> str | None:
    """The eos token string from config.json / generation_config.json `eos_token_id` (first of a list)."""
    for name in ("generation_config.json", "config.json"):
        eid = _read_json(d / name).get("eos_token_id")
        eid = eid[0] if isinstance(eid, list) and eid else eid
        if isinstance(eid, int):
            names = {t["id"]: c for c, t in added.items()} | {i: c for c, i in (vocab or {}).items()}
            if eid in names:
                return names[eid]
    return None


def _byte_level_bpe(spec: dict) -> tuple[dict | None, list, str, str | None]:
    """(vocab, merges, split regex, normalizer) of a byte-level BPE tokenizer.json; vocab None if it is not one.

    Byte-level means: BPE model without byte fallback or subword affixes, a ByteLevel
    pre-tokenizer (alone with its GPT-2 regex, or after one regex Split), a ByteLevel decoder,
    and no normalizer other than NFC. Exactly these run in tiktoken with the same ids.
    """
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    no = (None, [], "", "")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return no
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or (norm and norm.get("type") != "NFC"):
        return no
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_PATTERN
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte = pre["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex")
        if split.get("type") != "Split" or regex is None or split.get("behavior") != "Isolated" or \
                split.get("invert") or byte.get("type") != "ByteLevel" or byte.get("use_regex", True) or \
                byte.get("add_prefix_space"):
            return no
        pattern = regex
    else:
        return no
    return model.get("vocab") or {}, model.get("merges") or [], pattern, "NFC" if norm else None


def _ranks_from_merges(vocab: dict[str, int], merges: list, added: dict) -> dict[bytes, int] | None:
    """tiktoken ranks (= the model's ids) of a byte-level BPE vocab; None when tiktoken would not give its ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; Hugging Face BPE
    merges the pair listed first in `merges`. They agree when every multi-byte token is the
    result of a merge and merge results have increasing ids in merge order.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    skip = {t["id"] for t in added.values()}
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if i in skip:
            continue
        if any(c not in byte_of for c in tok):
            return None
        ranks[bytes(byte_of[c] for c in tok)] = i
    if len(ranks) != len(vocab) - len(skip & set(vocab.values())) or not all(bytes([b]) in ranks for b in range(256)):
        return None
    last, made = -1, set()
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or a not in vocab or b not in vocab or i <= last:
            return None
        last = i
        made.add(i)
    if any(len(t) > 1 and i not in made for t, i in ranks.items()):
        return None
    return ranks


class _TokenizersEncoding:
    """The part of tiktoken.Encoding that Tokenizer uses, over a Hugging Face `tokenizers.Tokenizer`.

    For tokenizer.json kinds tiktoken cannot run (SentencePiece-style BPE with byte fallback,
    WordPiece, Unigram, ...). `decode_bytes` maps each id to its bytes (byte-level symbols,
    <0xNN> byte-fallback pieces, U+2581 as a space) so streaming can hold back partial UTF-8.
    """

    def __init__(self, hf) -> None:
        self.hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        self.n_vocab = max(vocab.values()) + 1
        self.holes = frozenset(set(range(self.n_vocab)) - set(vocab.values()))
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        byte_level = "ByteLevel" in json.dumps(json.loads(hf.to_str()).get("decoder"))
        added = {t.content for t in hf.get_added_tokens_decoder().values()}
        self._bytes: dict[int, bytes] = {}
        for tok, i in vocab.items():
            if tok in added:
                self._bytes[i] = tok.encode()
            elif byte_level and all(c in byte_of for c in tok):
                self._bytes[i] = bytes(byte_of[c] for c in tok)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
                self._bytes[i] = bytes([int(tok[3:5], 16)])
            else:
                self._bytes[i] = tok.replace("\u2581", " ").encode()

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        self.hf.encode_special_tokens = not special  # special-token strings as plain text unless allowed
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encode([text], False)[0]

    def encode(self, text: str, allowed_special="all", disallowed_special=()) -> list[int]:
        return self._encode([text], allowed_special == "all")[0]

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return self._encode(texts, False)

    def encode_single_token(self, text: str) -> int:
        i = self.hf.token_to_id(text)
        if i is None:
            raise KeyError(text)
        return i

    def decode(self, ids: list[int], errors: str = "replace") -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)
