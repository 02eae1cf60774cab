"""Record files -> documents: jsonl (plain, .gz, .zst), parquet, and a Hugging Face `save_to_disk` folder.

Each reader yields (split, name, text) like every other source of `llm.data.corpus`, streaming: a parquet
file is read one row group at a time (only the text column), a compressed jsonl one line at a time, a
saved Hugging Face dataset in batches of rows. A document goes to val by a hash of its name
(`<file>:<row>`), unless a saved DatasetDict has its own validation split.

Problems are one-line `DataError`s naming the file (and the line or row group): a missing or non-string
text field, a file that is not what its suffix says (corrupt, truncated), a shard that holds no rows.
`check_files` runs the cheap checks (parquet footers and schemas) before anything is tokenized.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from llm.runtime import first_line

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
HF_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what `Dataset(Dict).save_to_disk` writes at the top
HF_VAL_SPLITS = ("validation", "val", "valid", "test")
PARQUET_BATCH_ROWS = 8192  # rows per record batch inside a row group (bounded memory on huge row groups)


class DataError(ValueError):
    """The dataset cannot be found or used; the message is one line."""


def record_kind(path: Path) -> str | None:
    """'jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet' for a record file (by suffix), else None (a text file)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    for suffix in JSONL_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:].replace("zstd", "zst")
    return None


def is_hf_disk(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / m).is_file() for m in HF_DISK_MARKERS)


def record_docs(path: Path, text_field: str, in_val: Callable[[str], bool]) -> Iterator[tuple[str, str, str]]:
    """(split, "<path>:<row>", text) for every non-blank document of a record file, streamed."""
    kind = record_kind(path)
    rows = _parquet_rows(path, text_field) if kind == "parquet" else _jsonl_rows(path, kind, text_field)
    n = 0
    for i, text in rows:
        n += 1
        if text.strip():
            name = f"{path}:{i}"
            yield ("val" if in_val(name) else "train"), name, text
    if n == 0:
        raise DataError(f"{path} is an empty shard: it holds no records")


def check_files(files: list[Path], text_field: str) -> None:
    """Before any tokenizing: every parquet file opens, has the text column as strings, and holds rows."""
    for f in files:
        if record_kind(f) == "parquet":
            _parquet_file(f, text_field)


# ----------------------------------------------------------------------------- jsonl (plain or compressed)


def _open_text(path: Path, kind: str | None) -> io.TextIOBase:
    if kind == "jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if kind == "jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path} is zstd-compressed: reading it needs the `zstandard` package "
                            "(pip install zstandard, or the llm[data] extra)") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _jsonl_rows(path: Path, kind: str | None, text_field: str) -> Iterator[tuple[int, str]]:
    i = 0
    try:
        with _open_text(path, kind) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{i} is not valid JSON (.jsonl holds one JSON object per line)") from None
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{i} has no string field {text_field!r} (choose one with --text-field)")
                yield i, text
    except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile, zstd errors, truncated streams
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} is corrupt or not {kind or 'jsonl'} (after line {i}: {first_line(e)})") from None


# ----------------------------------------------------------------------------- parquet


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("parquet datasets need the `pyarrow` package (pip install pyarrow, or the llm[data] "
                        "extra)") from None
    return pq


def _parquet_file(path: Path, text_field: str):
    """The opened pq.ParquetFile after the footer checks: readable, has a string text column, holds rows."""
    pq = _pyarrow()
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} is not a readable parquet file ({first_line(e)})") from None
    schema = pf.schema_arrow
    if schema.get_field_index(text_field) < 0:
        cols = ", ".join(schema.names[:8]) + (", ..." if len(schema.names) > 8 else "")
        raise DataError(f"{path} has no column {text_field!r} (its columns: {cols}); choose one with --text-field")
    typ = schema.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or getattr(pa.types, "is_string_view", bool)(typ)):
        raise DataError(f"{path} column {text_field!r} holds {typ}, not strings; choose another with --text-field")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path} is an empty shard: it holds no rows")
    return pf


def _parquet_rows(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(row index, text) one row group at a time, only the text column; null cells are skipped."""
    import pyarrow as pa

    pf = _parquet_file(path, text_field)
    row = 0
    for g in range(pf.num_row_groups):
        try:
            batches = list(pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g], columns=[text_field]))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path} row group {g} cannot be read ({first_line(e)})") from None
        for batch in batches:
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield row, text
                row += 1


# ----------------------------------------------------------------------------- Hugging Face save_to_disk


def hf_disk_docs(path: Path, text_field: str, in_val: Callable[[str], bool]) -> Iterator[tuple[str, str, str]]:
    """Documents of a `save_to_disk` folder: a Dataset (split by hash) or a DatasetDict (its train split, and
    its validation/val/test split when it has one; else split by hash)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} was saved by Hugging Face `datasets` (save_to_disk); reading it needs that "
                        "package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # the library raises many types for a damaged folder
        raise DataError(f"{path} cannot be loaded as a saved Hugging Face dataset "
                        f"({type(e).__name__}: {first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} is a DatasetDict without a 'train' split (it has {', '.join(ds)})")
        val = next((s for s in HF_VAL_SPLITS if s in ds), None)
        parts = [("train", ds["train"])] + ([("val", ds[val])] if val else [])
    else:
        parts, val = [(None, ds)], None
    for split, d in parts:
        if text_field not in d.column_names:
            raise DataError(f"{path} has no column {text_field!r} (its columns: {', '.join(d.column_names)}); "
                            "choose one with --text-field")
        if len(d) == 0:
            raise DataError(f"{path} is an empty shard: its {split or 'dataset'} split holds no rows")
        for start in range(0, len(d), PARQUET_BATCH_ROWS):
            texts = d[start: start + PARQUET_BATCH_ROWS][text_field]
            for i, text in enumerate(texts, start):
                if not isinstance(text, str):
                    if text is None:
                        continue
                    raise DataError(f"{path} row {i} field {text_field!r} is {type(text).__name__}, not a string")
                if text.strip():
                    name = f"{path}:{split or ''}:{i}"
                    yield (split if val else ("val" if in_val(name) else "train")), name, text
