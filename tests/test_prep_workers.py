"""Tokenizing on worker processes (llm.data.encode, --prep-workers): the shards and the manifest are the same
bytes for 1, 2 or 3 workers and for fork or spawn, workers never import torch, and a preparation killed with
-9 while its workers run leaves nothing that reads as complete and resumes (with another worker count) to
the same bytes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llm.config import DataConfig
from llm.data import encode, shards
from llm.data.corpus import open_source
from llm.data.encode import Encoder, Meter, encode_docs
from llm.data.shards import fingerprint, load_manifest, prepare, verify
from llm.tokenizer import Tokenizer

QUIET = dict(log=lambda *_: None)
WORDS = "def return self import class for in if else while the of a to and ( ) : = + 0 1 42 é 你好 \n".split(" ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~40 documents of 20-2000 words (some non-ASCII), ~250 KB."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 2000))))
    return d


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train((f.read_text() for f in sorted(corpus.iterdir())), 300)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_CHARS", 4000)  # ~60 chunks: every worker gets many, out of order
    monkeypatch.setattr(shards, "COMMIT_TOKENS", 3000)


def files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_shards_and_manifest_are_the_same_bytes_for_1_2_3_workers(tmp_path, corpus, tok, small_chunks):
    outs = []
    for workers in (1, 2, 3):
        cfg = DataConfig(dataset=str(corpus), data_dir=str(tmp_path / f"w{workers}"), prep_workers=workers,
                         val_fraction=0.2)
        logs: list[str] = []
        outs.append(prepare(cfg, log=logs.append, tokenizer=tok, shard_tokens=20_000))
        how = f"on {workers} worker processes" if workers > 1 else "on 1 process"
        assert any(line.startswith("tokenized ") and line.endswith(how) for line in logs), logs
    ref = files(outs[0])
    assert len([f for f in ref if f.endswith(".bin")]) >= 4  # several shards per split
    for out in outs[1:]:
        assert files(out) == ref
        assert fingerprint(load_manifest(out)) == fingerprint(load_manifest(outs[0]))
    # and the bytes are the right ones: every document's ids then <|endoftext|>, in source order, per split
    want: dict[str, list[int]] = {"train": [], "val": []}
    for split, _, text in open_source(cfg).docs():
        want[split] += tok.encode(text) + [tok.eot_id]
    m = load_manifest(outs[0])
    for split in ("train", "val"):
        got = np.concatenate([np.fromfile(outs[0] / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])
        assert got.tolist() == want[split] and m["splits"][split]["documents"] > 0


def test_spawned_workers_encode_the_same_ids_without_importing_torch(corpus, tok):
    texts = [f.read_text() for f in sorted(corpus.iterdir())]
    chunks = [(i, texts[i: i + 5]) for i in range(0, len(texts), 5)]
    with Encoder(tok, np.uint16, 2, start_method="spawn") as enc:
        got = list(enc.map(chunks))
        assert enc.used == 2 and enc.pool.submit(eval, "'torch' in __import__('sys').modules").result() is False
    assert [i for i, _ in got] == [i for i, _ in chunks]  # in order
    for (_, e), (_, part) in zip(got, chunks):
        ref = encode_docs(tok, part, np.uint16)
        assert e.ids.tobytes() == ref.ids.tobytes() and e.lengths.tolist() == ref.lengths.tolist()
        assert e.n_bytes == sum(len(t.encode()) for t in part)


KILLED_RUN = """
import sys, time
import llm.data.shards as s
s.CHUNK_CHARS, s.COMMIT_TOKENS = 4000, 3000
chunks = s._chunks
def slow(docs):  # reading is slow, so the kill lands in the middle
    for c in chunks(docs):
        time.sleep(0.05)
        yield c
s._chunks = slow
from llm.data.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_multi_process_preparation_resumes_to_the_same_bytes(tmp_path, corpus, tok, small_chunks):
    cfg = DataConfig(dataset=str(corpus), data_dir=str(tmp_path / "k"), prep_workers=2, val_fraction=0.2,
                     vocab_size=300)
    args = ["--dataset", cfg.dataset, "--data-dir", cfg.data_dir, "--prep-workers", "2", "--val-fraction", "0.2",
            "--vocab-size", "300"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = shards.dataset_dir(cfg)
    partial = out.with_name(out.name + ".partial")
    try:
        deadline, done = time.monotonic() + 120, 0
        while not done and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
            try:
                done = json.loads((partial / "progress.json").read_text())["docs"]
            except (OSError, ValueError):
                pass
        assert done, f"no commit was seen before the run ended: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must notice and exit
        proc.wait()
        for _ in range(100):  # the workers are gone within a few polls
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("worker processes outlived their killed main process")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not out.exists() and not (partial / "manifest.json").exists()  # nothing reads as complete
    with pytest.raises(shards.DataError, match="is not a prepared dataset"):
        load_manifest(partial)
    assert done < len(list(corpus.iterdir()))
    cfg.prep_workers = 3
    logs: list[str] = []
    again = prepare(cfg, log=logs.append, shard_tokens=shards.SHARD_TOKENS)
    assert any(f"{done:,} documents already done" in line for line in logs) and not partial.exists()
    verify(again)
    ref_tok = Tokenizer.load(again, load_manifest(again)["tokenizer"])
    ref = prepare(DataConfig(dataset=cfg.dataset, data_dir=str(tmp_path / "ref"), prep_workers=1, val_fraction=0.2),
                  tokenizer=ref_tok, **QUIET)  # uninterrupted, one process, the same tokenizer
    assert load_manifest(again)["splits"] == load_manifest(ref)["splits"]  # same shards, same checksums
    assert {k: v for k, v in files(again).items() if k.endswith(".bin")} == \
        {k: v for k, v in files(ref).items() if k.endswith(".bin")}


def test_the_progress_line_counts_earlier_runs_in_its_share_and_this_run_in_its_rates():
    lines: list[str] = []
    m = Meter(lines.append, total=4_000_000, done=1_000_000, every=0)
    m.add(1_000_000, 300, 2)
    assert lines[0].startswith("tokenizing: 2.0 of 4.0 MB (50%, ETA ") and ", 300 tokens, 2 documents | " in lines[0]
    assert m.summary(3).startswith("tokenized 1.0 MB (2 documents) into 300 tokens in ")
    assert m.summary(3).endswith(" on 3 worker processes") and m.summary(1).endswith(" on 1 process")
    Meter(lines.append, every=0).add(2_500_000, 7, 1)
    assert lines[1].startswith("tokenizing: 2.5 MB, 7 tokens, 1 documents | ")  # no total: no share


def _die(texts: list[str]) -> None:  # a worker killed while tokenizing (out of memory, kill -9)
    os._exit(1)


def test_a_worker_that_dies_is_one_error_line_and_the_run_resumes(tmp_path, corpus, tok, small_chunks, monkeypatch):
    cfg = DataConfig(dataset=str(corpus), data_dir=str(tmp_path), prep_workers=2, val_fraction=0.2)
    monkeypatch.setattr(encode, "START_METHOD", "fork")  # the test's _die reaches the workers through fork
    work = encode._encode_in_worker
    monkeypatch.setattr(encode, "_encode_in_worker", _die)
    with pytest.raises(shards.DataError, match=r"^a tokenizing worker process died \(killed, or out of memory\?\); "
                                               r"run the same command again to resume"):
        prepare(cfg, tokenizer=tok, **QUIET)
    monkeypatch.setattr(encode, "_encode_in_worker", work)
    logs: list[str] = []
    out = prepare(cfg, tokenizer=tok, log=logs.append)
    assert any("documents already done" in line for line in logs) and logs[-2].endswith("on 2 worker processes")
    verify(out)


def test_llm_data_reports_a_tokenizer_it_cannot_load_in_one_line(tmp_path, capsys):
    from llm.data.__main__ import main

    assert main(["--tokenizer", "nope", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown tokenizer 'nope'; named encodings: gpt2") and err.count("\n") == 1


def test_llm_data_after_ctrl_c_says_how_to_resume_in_one_line(tmp_path, capsys, monkeypatch):
    from llm.data import __main__ as cli

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "prepare", interrupted)
    assert cli.main(["--data-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ("error: interrupted (Ctrl-C); run the same command again to resume from the "
                                       "last commit\n")


def test_a_run_stopped_before_its_first_commit_keeps_its_trained_tokenizer(tmp_path, corpus, monkeypatch):
    cfg = DataConfig(dataset=str(corpus), data_dir=str(tmp_path), prep_workers=2, vocab_size=300, val_fraction=0.2)
    chunks = shards._chunks

    def broken(docs):
        yield next(chunks(docs))
        raise shards.DataError("the disk went away")

    monkeypatch.setattr(shards, "_chunks", broken)
    logs: list[str] = []
    with pytest.raises(shards.DataError, match="the disk went away"):
        prepare(cfg, log=logs.append)
    assert any(line.startswith("training a 300-token BPE") for line in logs)
    monkeypatch.setattr(shards, "_chunks", chunks)
    logs.clear()
    out = prepare(cfg, log=logs.append)
    assert not any(line.startswith("training") for line in logs), logs  # the BPE was not trained again
    assert any("0 documents already done" in line for line in logs)
    verify(out)
