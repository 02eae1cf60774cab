"""The dataset registry: downloads, Hugging Face streaming (faked: no network here), local globs and .jsonl,
resumable sharded preparation, manifest checksums, and clear errors (RELIABILITY.md promise 12)."""

import json
import sys
import types

import numpy as np
import pytest

from llm.config import DataConfig
from llm.data import corpus, shards
from llm.data.corpus import DataError
from llm.data.shards import Loader, prepare, verify

QUIET = dict(log=lambda *_: None)


def stories(n: int) -> list[dict]:
    return [{"id": f"s{i}", "text": f"Once upon a time {i} cats sat on {i % 7} mats. The end."} for i in range(n)]


def fake_datasets(splits: dict[str, list[dict]], fail: tuple[int, int] | None = None, calls: list | None = None):
    """A stand-in for the `datasets` package: load_dataset(..., streaming=True) iterates the given rows;
    fail = (n, i): the n-th stream opened breaks at row i like a dropped connection."""
    calls = [] if calls is None else calls

    def load_dataset(path, name=None, split=None, streaming=False):
        assert streaming, "datasets must be streamed"
        calls.append((path, name, split))
        n = len(calls)

        def rows():
            for i, row in enumerate(splits[split]):
                if fail is not None and (n, i) == fail:
                    raise ConnectionError("connection reset by peer")
                yield row

        return rows()

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_shakespeare_is_downloaded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    src = tmp_path / "remote.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 200)
    monkeypatch.setitem(corpus.DOWNLOADS, "shakespeare", (src.as_uri(), "input.txt"))
    cfg = DataConfig(dataset="shakespeare", data_dir=str(tmp_path / "d"), vocab_size=300)
    out = prepare(cfg, **QUIET)
    assert (tmp_path / "d" / "downloads" / "shakespeare" / "input.txt").read_bytes() == src.read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["tokens"] > 10 * m["splits"]["val"]["tokens"] > 0  # one document: tokens split
    monkeypatch.setitem(corpus.DOWNLOADS, "shakespeare", ("http://127.0.0.1:9/input.txt", "input.txt"))
    assert prepare(cfg, **QUIET) == out  # no network needed any more


def test_unreachable_download_names_the_dataset_and_how_to_provide_it_offline(tmp_path, monkeypatch):
    monkeypatch.setitem(corpus.DOWNLOADS, "shakespeare", ("http://127.0.0.1:9/input.txt", "input.txt"))
    with pytest.raises(DataError) as e:
        prepare(DataConfig(dataset="shakespeare", data_dir=str(tmp_path)), **QUIET)
    msg = str(e.value)
    assert msg.startswith("dataset 'shakespeare' could not be downloaded from http://127.0.0.1:9/input.txt (")
    assert f"put it at {tmp_path}/downloads/shakespeare/input.txt" in msg and "\n" not in msg
    assert not list((tmp_path / "downloads" / "shakespeare").iterdir())  # no partial file left


def test_hugging_face_dataset_without_the_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match=r"dataset 'tinystories' \(roneneldan/TinyStories\) needs the Hugging Face "
                                        r"`datasets` package: pip install datasets; offline, .*--dataset PATH"):
        prepare(DataConfig(dataset="tinystories", data_dir=str(tmp_path)), **QUIET)


def test_unreachable_hugging_face_dataset_is_a_clear_error(tmp_path, monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError) as e:
        prepare(DataConfig(dataset="fineweb-edu", data_dir=str(tmp_path)), **QUIET)
    assert str(e.value).startswith("dataset 'fineweb-edu' (HuggingFaceFW/fineweb-edu) cannot be reached "
                                   "(ConnectionError: Couldn't reach") and "HF_DATASETS_OFFLINE=1" in str(e.value)


def test_hugging_face_dataset_streams_into_capped_shards(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({"train": stories(3000), "validation": stories(50)},
                                                               calls=calls))
    monkeypatch.setattr(shards, "COMMIT_TOKENS", 2000)
    cfg = DataConfig(dataset="tinystories", data_dir=str(tmp_path), vocab_size=300, max_tokens=20000)
    out = prepare(cfg, shard_tokens=5000, **QUIET)
    m = json.loads((out / "manifest.json").read_text())
    train = m["splits"]["train"]
    assert ("roneneldan/TinyStories", None, "validation") in calls and out.name.startswith("tinystories-max20000")
    assert 20000 <= train["tokens"] < 20000 + 2 * 512 * 30 and len(train["shards"]) >= 3  # capped, sharded
    assert m["splits"]["val"]["documents"] == 50  # the dataset's own validation split
    assert sum(s["tokens"] for s in train["shards"]) == train["tokens"]
    loader = Loader(out, "train", 64, 16, seed=0)
    x, y = loader.batch(0)
    assert x.shape == (64, 16) and bool((x[:, 1:] == y[:, :-1]).all()) and len(loader.shards) >= 3
    verify(out)


def test_preparation_resumes_after_an_interruption_and_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "COMMIT_TOKENS", 1000)
    rows = {"train": stories(1500)}
    cfg = DataConfig(dataset="fineweb-edu", data_dir=str(tmp_path / "a"), vocab_size=300, val_fraction=0.1)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows))
    whole = prepare(cfg, shard_tokens=4000, **QUIET)  # uninterrupted reference
    cfg.data_dir = str(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, fail=(2, 1200)))  # 1: BPE sample, 2: encoding
    with pytest.raises(DataError, match="cannot be reached.*connection reset"):
        prepare(cfg, shard_tokens=4000, **QUIET)
    partial = tmp_path / "b" / (whole.name + ".partial")
    done = json.loads((partial / "progress.json").read_text())["docs"]
    assert 0 < done <= 1200
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows))
    logs: list[str] = []
    again = prepare(cfg, log=logs.append, shard_tokens=4000)
    assert any(f"{done:,} documents already done" in line for line in logs) and not partial.exists()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (whole, again))
    assert ma["splits"] == mb["splits"]  # same shards, same checksums
    assert ma["splits"]["val"]["documents"] > 0  # no native val split: held out by document hash


def test_globs_folders_and_jsonl(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(5):
        (d / f"a{i}.txt").write_text(f"alpha {i} " * 100)
        (d / f"b{i}.md").write_text(f"beta {i} " * 100)
    (d / "c.jsonl").write_text("\n".join(json.dumps({"body": f"gamma {i} " * 30}) for i in range(40)) + "\n")
    glob_out = prepare(DataConfig(dataset=str(d / "a*.txt"), data_dir=str(tmp_path / "g"), vocab_size=280,
                                  val_fraction=0.2), **QUIET)
    assert json.loads((glob_out / "manifest.json").read_text())["documents"] == 5
    jl = prepare(DataConfig(dataset=str(d / "c.jsonl"), data_dir=str(tmp_path / "j"), vocab_size=280,
                            text_field="body", val_fraction=0.2), **QUIET)
    m = json.loads((jl / "manifest.json").read_text())
    assert m["documents"] == 40 and m["splits"]["val"]["documents"] > 0  # one document per line
    with pytest.raises(DataError, match=r"c\.jsonl:1 has no string field 'text' \(choose one with --text-field\)"):
        prepare(DataConfig(dataset=str(d / "c.jsonl"), data_dir=str(tmp_path / "x")), **QUIET)
    (d / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        prepare(DataConfig(dataset=str(d / "bad.jsonl"), data_dir=str(tmp_path / "x")), **QUIET)
    with pytest.raises(DataError, match=r"dataset glob '.*\*\.none' matches no files"):
        prepare(DataConfig(dataset=str(d / "*.none"), data_dir=str(tmp_path / "x")), **QUIET)
    with pytest.raises(DataError, match=r"'tinystory' is neither a known corpus \(pystdlib, shakespeare, "
                                        r"tinystories, fineweb-edu\) nor an existing path"):
        prepare(DataConfig(dataset="tinystory", data_dir=str(tmp_path / "x")), **QUIET)


def test_manifest_checksums_catch_corrupted_and_truncated_shards(tmp_path):
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    out = prepare(DataConfig(dataset=str(tmp_path / "t.txt"), data_dir=str(tmp_path / "d"), vocab_size=280), **QUIET)
    verify(out)
    shard = out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-00000\.bin is missing or corrupted \(sha256 differs"):
        verify(out)
    shard.write_bytes(bytes(raw[:-6]))
    with pytest.raises(DataError, match=r"train-00000\.bin is missing or truncated \(\d+ bytes, the manifest says"):
        Loader(out, "train", 2, 8)


def test_old_single_file_shards_still_load(tmp_path):
    (tmp_path / "m").mkdir()
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "m" / "train.bin")
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"dtype": "uint16", "splits": {"train": {"tokens": 100}}}))
    x, y = Loader(tmp_path / "m", "train", 3, 10, seed=1).batch(0)
    assert bool((y - x == 1).all())
