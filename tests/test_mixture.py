"""Weighted dataset mixtures (llm/data/mixture.py): one tokenizer for every source, rows drawn by weight and
deterministic per step, realised proportions in metrics.jsonl, an exact resume, and one-line errors."""

import json

import numpy as np
import pytest
from conftest import metrics_records, train_argv

from llm.config import DataConfig, load_toml
from llm.data import mixture
from llm.data.corpus import DataError
from llm.data.mixture import MixtureLoader, parse_mixture, prepare_mixture
from llm.data.shards import load_manifest, prepare
from llm.tokenizer import Tokenizer
from llm.train.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two jsonl corpora with disjoint alphabets: 'ab' words and 'xy' words."""
    d = tmp_path_factory.mktemp("mix")
    for name, letters in (("ab", "ab"), ("xy", "xy")):
        rows = ["".join(letters[(i * j) % 2] for j in range(3 + i % 5)) + " " for i in range(60)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": "".join(rows[i:] + rows[:i]) * 3}) + "\n"
                                                 for i in range(60)))
    return d


def test_weights_are_parsed_and_bad_ones_are_one_line():
    assert parse_mixture("pystdlib") is None and parse_mixture("/data/books") is None
    assert parse_mixture("a:3,b:1") == [("a", 0.75), ("b", 0.25)]
    assert parse_mixture("C:/x/y.jsonl:1,b:1") == [("C:/x/y.jsonl", 0.5), ("b", 0.5)]
    for spec, msg in [("a:0,b:1", "weight of 'a' must be a positive number, got 0"),
                      ("a:-0.5,b:1", "must be a positive number"), ("a:inf,b:1", "must be a positive number"),
                      ("a,b:1", "mixture part 'a' has no weight"), ("a:1,a:2", "names a dataset twice")]:
        with pytest.raises(DataError, match=msg):
            parse_mixture(spec)


def test_a_toml_table_is_a_mixture(tmp_path):
    (tmp_path / "c.toml").write_text('[data]\ndataset = {"corpus/a.jsonl" = 0.7, pystdlib = 0.3}\n')
    spec = load_toml(str(tmp_path / "c.toml"))["dataset"]
    assert parse_mixture(spec) == [("corpus/a.jsonl", 0.7), ("pystdlib", 0.3)]


def test_one_tokenizer_rows_by_weight_deterministic_per_step(two, tmp_path):
    cfg = DataConfig(dataset=f"{two}/ab.jsonl:0.7,{two}/xy.jsonl:0.3", data_dir=str(tmp_path), vocab_size=280)
    out = prepare_mixture(cfg, **QUIET)
    m = load_manifest(out)
    assert m["kind"] == "mixture" and [s["weight"] for s in m["sources"]] == [0.7, 0.3]
    assert len({json.dumps(load_manifest(s["path"])["tokenizer"]) for s in m["sources"]}) == 1  # one tokenizer
    assert prepare_mixture(cfg, **QUIET) == out  # prepared once
    tok = Tokenizer.load(out, m["tokenizer"])
    loader = MixtureLoader(out, "train", 8, 16, seed=3)
    b = loader.batch(5)
    again = MixtureLoader(out, "train", 8, 16, seed=3).batch(5)
    assert bool((b[0] == again[0]).all()) and (b.sources == again.sources).all()
    for row, s in zip(b[0], b.sources):  # each row comes from the source it is labelled with
        text = tok.decode(row.tolist()).replace("<|endoftext|>", "")
        assert not set(text) & ({"x", "y"} if s == 0 else {"a", "b"}), (s, text)
    share = np.mean([loader.batch(i).sources.mean() for i in range(200)])
    assert abs(share - 0.3) < 0.04  # realised proportion of source 1 over 1600 rows (std ~0.011)


def test_sources_with_different_tokenizers_are_refused(two, tmp_path, monkeypatch):
    other = prepare(DataConfig(dataset=f"{two}/xy.jsonl", data_dir=str(tmp_path), vocab_size=300), **QUIET)
    real = mixture.prepare
    monkeypatch.setattr(mixture, "prepare", lambda cfg, log, tokenizer=None: other if "xy" in cfg.dataset
                        else real(cfg, log, tokenizer=tokenizer))
    with pytest.raises(DataError, match=r"mixture sources '.*ab\.jsonl' and '.*xy\.jsonl' were tokenized "
                                        r"differently .*prepare them with one --tokenizer"):
        prepare_mixture(DataConfig(dataset=f"{two}/ab.jsonl:1,{two}/xy.jsonl:1", data_dir=str(tmp_path),
                                   vocab_size=280), **QUIET)


def test_training_logs_realised_proportions_and_resumes_exactly(two, tmp_path):
    kw = dict(dataset=f"{two}/ab.jsonl:0.7,{two}/xy.jsonl:0.3", vocab_size=280, save_interval=2)
    assert main(train_argv(tmp_path, "straight", max_steps=4, **kw)) == 0
    assert main(train_argv(tmp_path, "resumed", max_steps=2, **kw)) == 0
    assert main(train_argv(tmp_path, "resumed", max_steps=4, **kw) + ["--resume"]) == 0
    runs = {o: {r["step"]: r for r in metrics_records(tmp_path / o) if "loss" in r} for o in ("straight", "resumed")}
    assert sorted(runs["resumed"]) == [1, 2, 3, 4]
    assert [runs["resumed"][s]["loss"] for s in range(1, 5)] == [runs["straight"][s]["loss"] for s in range(1, 5)]
    names = [f"mix/{two}/ab.jsonl", f"mix/{two}/xy.jsonl"]
    for r in runs["straight"].values():
        assert abs(r[names[0]] + r[names[1]] - 1) < 1e-6 and r[names[0]] * 4 == round(r[names[0]] * 4)
    mean = np.mean([r[names[1]] for r in runs["straight"].values()])
    assert 0 < mean < 1
