"""Data preparation and loading: manifest, dtype, split, determinism, clear errors."""

import json

import numpy as np
import pytest

from llm.config import DataConfig
from llm.data.corpus import DataError
from llm.data.shards import Loader, prepare


def write_corpus(d, n_files=6):
    d.mkdir()
    for i in range(n_files):
        (d / f"doc{i}.txt").write_text(f"document {i}: " + "the cat sat on the mat. " * 40 + "日本 😀\n")
    return d


def test_prepare_writes_shards_and_manifest(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = prepare(DataConfig(dataset=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=300,
                             val_fraction=0.3), log=lambda *_: None)
    m = json.loads((out / "manifest.json").read_text())
    # a small corpus can run out of merges before 300 ids; never more than asked
    V = m["n_vocab"]
    assert m["dtype"] == "uint16" and 257 < V <= 300
    shards = m["splits"]["train"]["shards"]
    train = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in shards])
    assert train.size == m["splits"]["train"]["tokens"] > 0 and m["splits"]["val"]["tokens"] > 0
    assert train.max() < V and (train == V - 1).sum() >= 1  # documents end with <|endoftext|>
    assert 0 < m["unigram_entropy"] < np.log(V)
    # preparing again reuses the result
    assert prepare(DataConfig(dataset=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=300,
                              val_fraction=0.3), log=lambda *_: None) == out


def test_loader_is_deterministic_per_step_and_shifted(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = prepare(DataConfig(dataset=str(corpus), data_dir=str(tmp_path / "d"), vocab_size=300), log=lambda *_: None)
    a = Loader(out, "train", 4, 16, seed=1)
    x1, y1 = a.batch(7)
    x2, y2 = Loader(out, "train", 4, 16, seed=1).batch(7)
    assert x1.shape == (4, 16) and bool((x1 == x2).all()) and bool((y1 == y2).all())
    assert bool((x1[:, 1:] == y1[:, :-1]).all())
    assert not bool((a.batch(8)[0] == x1).all())
    assert not bool((Loader(out, "train", 4, 16, seed=1, rank=1).batch(7)[0] == x1).all())


def test_missing_empty_and_binary_datasets(tmp_path):
    with pytest.raises(DataError, match="neither a known corpus"):
        prepare(DataConfig(dataset=str(tmp_path / "nope"), data_dir=str(tmp_path / "d")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        prepare(DataConfig(dataset=str(tmp_path / "empty"), data_dir=str(tmp_path / "d")))
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match="is empty"):
        prepare(DataConfig(dataset=str(tmp_path / "blank.txt"), data_dir=str(tmp_path / "d")))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="not a text file"):
        prepare(DataConfig(dataset=str(tmp_path / "bin.txt"), data_dir=str(tmp_path / "d")))


def test_dataset_too_small_for_one_window(tmp_path):
    (tmp_path / "small.txt").write_text("hello world " * 30)
    out = prepare(DataConfig(dataset=str(tmp_path / "small.txt"), data_dir=str(tmp_path / "d"), vocab_size=260),
                  log=lambda *_: None)
    with pytest.raises(DataError, match=r"has \d+ tokens, fewer than one window of block_size \+ 1 = 1025"):
        Loader(out, "val", 2, 1024)
