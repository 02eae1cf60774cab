"""Record-file sources (llm.data.sources): parquet files / folders / globs, .jsonl.gz, .jsonl.zst and a Hugging Face
save_to_disk folder give the same documents as plain jsonl; broken inputs are one line naming the file (and the row
group) before anything is tokenized (RELIABILITY.md promises 12 and 32). Test files are written here by pyarrow."""

import gzip
import json
import subprocess
import sys

import pytest

from llm.config import DataConfig
from llm.data.corpus import DataError, open_source
from llm.data.shards import Loader, prepare

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
QUIET = dict(log=lambda *_: None)


def texts(n: int, offset: int = 0) -> list[str]:
    return [f"Document {i + offset}: the {i % 5} foxes ran {i * 3} miles, then slept. " * (1 + i % 3)
            for i in range(n)]


def write_parquet(path, docs: list[str | None], row_group_size: int = 7, field: str = "text", **kw) -> None:
    table = pa.table({field: pa.array(docs, pa.string()), "id": pa.array(range(len(docs)), pa.int64())})
    pq.write_table(table, path, row_group_size=row_group_size, **kw)


def docs_of(dataset: str, **kw) -> list[str]:
    return [t for _, _, t in open_source(DataConfig(dataset=dataset, **kw)).docs()]


def test_parquet_gz_zst_and_saved_hf_datasets_give_the_documents_of_plain_jsonl(tmp_path):
    a, b = texts(20), texts(13, 20)
    d = tmp_path / "pq"
    d.mkdir()
    write_parquet(d / "a.parquet", a)  # 3 row groups
    write_parquet(d / "b.parquet", b[:6] + [None] + b[6:])  # a null cell is skipped
    (d / "notes.bin").write_bytes(b"\x00" * 10)  # not a dataset file: not listed
    assert docs_of(str(d)) == a + b  # folder, sorted
    assert docs_of(str(d / "*.parquet")) == a + b  # glob
    assert docs_of(str(d / "b.parquet")) == b
    lines = "".join(json.dumps({"text": t}) + "\n" for t in a)
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    zstd = pytest.importorskip("zstandard")
    (tmp_path / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(lines.encode()))
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        assert docs_of(str(tmp_path / name)) == a, name
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": a}).save_to_disk(str(tmp_path / "hf"))
    assert docs_of(str(tmp_path / "hf"), text_field="body") == a
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": a}),
                               "validation": datasets.Dataset.from_dict({"text": b})})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    got = list(open_source(DataConfig(dataset=str(tmp_path / "hfdict"))).docs())
    assert [t for s, _, t in got if s == "train"] == a and [t for s, _, t in got if s == "val"] == b


def test_a_parquet_folder_prepares_and_loads(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    for i in range(3):
        write_parquet(d / f"part-{i}.parquet", texts(40, 40 * i), row_group_size=16)
    out = prepare(DataConfig(dataset=str(d), data_dir=str(tmp_path / "data"), vocab_size=300, val_fraction=0.2),
                  **QUIET)
    m = json.loads((out / "manifest.json").read_text())
    assert m["documents"] == 120 and m["splits"]["val"]["documents"] > 0
    x, y = Loader(out, "train", 4, 32).batch(0)
    assert x.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())


def test_parquet_errors_name_the_file_before_any_tokenizing(tmp_path):
    write_parquet(tmp_path / "other.parquet", texts(5), field="content")
    with pytest.raises(DataError, match=r"other\.parquet has no column 'text' \(its columns: content, id\); "
                                        r"choose one with --text-field"):
        open_source(DataConfig(dataset=str(tmp_path / "other.parquet")))
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet column 'text' holds int64, not strings"):
        open_source(DataConfig(dataset=str(tmp_path / "ints.parquet")))
    write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match=r"empty\.parquet is an empty shard: it holds no rows"):
        open_source(DataConfig(dataset=str(tmp_path / "empty.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not a parquet file at all" * 10)
    with pytest.raises(DataError, match=r"junk\.parquet is not a readable parquet file \("):
        open_source(DataConfig(dataset=str(tmp_path / "junk.parquet")))
    good = tmp_path / "good.parquet"
    write_parquet(good, texts(30))
    raw = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])  # truncated: the footer is gone
    with pytest.raises(DataError, match=r"cut\.parquet is not a readable parquet file"):
        open_source(DataConfig(dataset=str(tmp_path / "cut.parquet")))
    assert not (tmp_path / "d").exists()  # refused before any preparation started


def test_a_corrupt_row_group_is_named_after_the_row_groups_before_it_streamed(tmp_path):
    f = tmp_path / "rg.parquet"
    write_parquet(f, texts(21), row_group_size=7, compression="NONE")
    col = pq.ParquetFile(f).metadata.row_group(1).column(0)
    raw = bytearray(f.read_bytes())
    start = col.data_page_offset
    raw[start: start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    f.write_bytes(bytes(raw))
    got = []
    with pytest.raises(DataError, match=r"rg\.parquet row group 1 cannot be read \("):
        for _, _, text in open_source(DataConfig(dataset=str(f))).docs():
            got.append(text)
    assert got == texts(7)  # row group 0 streamed before row group 1 was read


def test_broken_compressed_jsonl_and_empty_shards_are_one_line(tmp_path):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts(50)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:200])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz is corrupt or not jsonl\.gz \(after line \d+: "):
        docs_of(str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "plain.jsonl.gz").write_bytes(lines)  # not gzip at all
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz is corrupt or not jsonl\.gz"):
        docs_of(str(tmp_path / "plain.jsonl.gz"))
    (tmp_path / "none.jsonl.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=r"none\.jsonl\.gz is an empty shard: it holds no records"):
        docs_of(str(tmp_path / "none.jsonl.gz"))
    with gzip.open(tmp_path / "f.jsonl.gz", "wt") as fh:
        fh.write('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"f\.jsonl\.gz:2 has no string field 'text'"):
        docs_of(str(tmp_path / "f.jsonl.gz"))


def test_the_prepare_cli_prints_one_error_line_for_a_parquet_without_the_field(tmp_path):
    write_parquet(tmp_path / "x.parquet", texts(5), field="content")
    r = subprocess.run([sys.executable, "-m", "llm.data", "--dataset", str(tmp_path / "x.parquet"),
                        "--data-dir", str(tmp_path / "d")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "x.parquet has no column 'text'" in r.stderr
