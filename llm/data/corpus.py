"""Where text comes from: the dataset registry and local paths -> documents (split, name, text).

The registry (`--dataset`):
  pystdlib      the running Python's standard-library sources (embedded: on every machine)
  shakespeare   tiny-shakespeare (1.1 MB), downloaded once from its public URL into <data_dir>/downloads/
  tinystories   roneneldan/TinyStories through Hugging Face `datasets` (streamed; its own val split)
  fineweb-edu   HuggingFaceFW/fineweb-edu sample-10BT through `datasets` (streamed; cap it with --max-tokens)
  PATH          a text file, a folder of files, a glob ("shards/*.parquet"); record files hold many
                documents, the text in --text-field: .jsonl (one JSON object per line), .jsonl.gz,
                .jsonl.zst, .parquet (llm.data.sources); or a folder written by Hugging Face
                `datasets`' save_to_disk

Documents go to val by a hash of their name unless the dataset has its own val split; a
one-document corpus has its tokens split instead (see llm.data.shards).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import sysconfig
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llm.config import DataConfig
from llm.data.sources import DataError, check_files, hf_disk_docs, is_hf_disk, record_docs, record_kind
from llm.runtime import first_line

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex", ".c", ".h", ""}
RECORD_SUFFIXES = {".parquet", ".pq", ".gz", ".zst", ".zstd"}  # kept in a folder only when record_kind says so

# name -> (public URL, file name); fetched once into <data_dir>/downloads/<name>/.
DOWNLOADS = {
    "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "input.txt"),
}
# name -> (Hugging Face dataset, config, {our split: their split}); no "val" = split by document hash.
HF_DATASETS = {
    "tinystories": ("roneneldan/TinyStories", None, {"val": "validation", "train": "train"}),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", {"train": "train"}),
}



# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A dataset's documents: `docs()` yields (split, name, text) in a fixed order."""

    name: str
    slug: str  # directory-safe identity
    docs: Callable[[], Iterator[tuple[str, str, str]]]
    single: Path | None = None  # a one-document corpus: its tokens are split between train and val
    size: int | None = None  # bytes of all the text when known beforehand (plain text files): progress in %


def pystdlib_files() -> list[Path]:
    """The top-level modules of the running Python's standard library (~4.7 MB, on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise DataError(f"no Python standard-library sources found under {root}")
    return files


def registry() -> list[str]:
    return ["pystdlib", *DOWNLOADS, *HF_DATASETS]


def open_source(cfg: DataConfig) -> Source:
    """The Source for a registered name or a local path / glob; raises DataError naming what is wrong."""
    name = cfg.dataset
    if name in HF_DATASETS:
        return Source(name, name, lambda: _hf_docs(name, cfg))
    p = Path(name).expanduser()
    if is_hf_disk(p):
        in_val = lambda n: _in_val(n, cfg.val_fraction)  # noqa: E731
        return Source(name, _slug(p.name, str(p.resolve())), lambda: hf_disk_docs(p, cfg.text_field, in_val))
    slug, files = corpus_files(name, cfg.data_dir)
    check_files(files, cfg.text_field)
    return _file_source(name, slug, files, cfg)


def corpus_files(dataset: str, data_dir: str | Path = "data") -> tuple[str, list[Path]]:
    """(slug, files) for pystdlib, a downloadable corpus, or a local file / folder / glob."""
    if dataset == "pystdlib":
        return dataset, pystdlib_files()
    if dataset in DOWNLOADS:
        return dataset, [download(dataset, data_dir)]
    if dataset in HF_DATASETS:
        raise DataError(f"dataset {dataset!r} is streamed from Hugging Face, not a set of files")
    if any(c in dataset for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(dataset), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"dataset glob {dataset!r} matches no files")
        key, base = dataset, re.sub(r"[*?\[\]]+", "_", Path(dataset).name)
    else:
        p = Path(dataset).expanduser()
        if not p.exists():
            raise DataError(f"dataset {dataset!r} is neither a known corpus ({', '.join(registry())}) "
                            "nor an existing path")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _listed(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise DataError(f"dataset folder {p} holds no text files nor record files "
                                f"({', '.join(sorted(TEXT_SUFFIXES - {''}))}, .jsonl.gz, .jsonl.zst, .parquet)")
        else:
            files = [p]
        key, base = str(p.resolve()), p.name
    return _slug(base, key), files


def _slug(base: str, key: str) -> str:
    """A directory-safe identity: the readable base name plus a hash of the full key (a path or glob)."""
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', base)[:40]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _listed(f: Path) -> bool:
    """A folder's file that is a dataset file: a text suffix, or a record file (.parquet, .jsonl.gz, ...)."""
    suffix = f.suffix.lower()
    return suffix in TEXT_SUFFIXES if suffix not in RECORD_SUFFIXES else record_kind(f) is not None


def download(name: str, data_dir: str | Path) -> Path:
    """The cached file of a downloadable corpus, fetching it from its public URL on first use."""
    url, fname = DOWNLOADS[name]
    dest = Path(data_dir) / "downloads" / name / fname
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(fname + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"dataset {name!r} could not be downloaded from {url} ({first_line(e)}); offline, fetch "
                        f"that file elsewhere and put it at {dest}, or pass --dataset /path/to/{fname}") from None
    os.replace(tmp, dest)
    return dest


def read_text(path: Path) -> str:
    raw = Path(path).read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} is not a text file (it contains NUL bytes)")
    return raw.decode("utf-8", errors="replace")


def _file_source(name: str, slug: str, files: list[Path], cfg: DataConfig) -> Source:
    plain = [f for f in files if record_kind(f) is None]
    single = files[0] if len(files) == 1 and plain else None
    val = {f for f in plain if _in_val(str(f), cfg.val_fraction) and not single}
    if len(plain) > 1 and not val and cfg.val_fraction > 0:  # always hold out at least one document
        val = {plain[-1]}

    def docs() -> Iterator[tuple[str, str, str]]:
        for f in files:
            if record_kind(f) is not None:
                yield from record_docs(f, cfg.text_field, lambda n: _in_val(n, cfg.val_fraction))
                continue
            text = read_text(f)
            if text.strip():
                yield ("val" if f in val else "train"), str(f), text

    size = sum(f.stat().st_size for f in files) if not any(record_kind(f) for f in files) else None
    return Source(name, slug, docs, single, size)


def _hf_docs(name: str, cfg: DataConfig) -> Iterator[tuple[str, str, str]]:
    repo, config, splits = HF_DATASETS[name]
    offline = ("offline, set HF_DATASETS_OFFLINE=1 with the dataset in the Hugging Face cache, or export it to "
               ".jsonl/.txt and pass --dataset PATH")
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset {name!r} ({repo}) needs the Hugging Face `datasets` package: pip install datasets; "
                        f"{offline}") from None
    for ours, theirs in splits.items():
        try:
            stream = datasets.load_dataset(repo, config, split=theirs, streaming=True)
            for i, row in enumerate(stream):
                text = row.get(cfg.text_field)
                if not isinstance(text, str):
                    raise DataError(f"dataset {name!r} rows have no string field {cfg.text_field!r}")
                doc = str(row.get("id", f"{theirs}:{i}"))
                split = ours if "val" in splits else ("val" if _in_val(doc, cfg.val_fraction) else "train")
                if text.strip():
                    yield split, doc, text
        except DataError:
            raise
        except Exception as e:  # network and hub errors come in many types
            raise DataError(f"dataset {name!r} ({repo}) cannot be reached ({type(e).__name__}: {first_line(e)}); "
                            f"{offline}") from None


def _in_val(name: str, fraction: float) -> bool:
    h = int(hashlib.sha1(Path(name).name.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction

