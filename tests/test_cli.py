"""End to end through the command lines: train -> checkpoint -> sample, and clear errors on bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(400)))
    out = tmp / "out"
    r = run("train.py", "--dataset", str(corpus), "--data-dir", str(tmp / "data"), "--out-dir", str(out),
            "--vocab-size", "300", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
            "--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--save-interval", "4",
            "--batch-size", "4", "--warmup-steps", "2")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.mark.slow
def test_train_cli_writes_checkpoints_metrics_and_summary(trained):
    out, stdout = trained
    assert (out / "latest").read_text().strip() == "ckpt-0000006"
    assert (out / "ckpt-0000004" / "model.safetensors").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    assert "val loss" in stdout and "unigram entropy" in stdout


@pytest.mark.slow
def test_sample_cli_prints_text(trained):
    out, _ = trained
    r = run("sample.py", "--checkpoint", str(out), "--prompt", "def f1", "--max-new-tokens", "12", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f1") and "tok/s" in r.stderr
    q = run("sample.py", "--checkpoint", str(out), "--prompt", "def", "--max-new-tokens", "5", "--quiet",
            "--temperature", "0")
    assert q.returncode == 0 and q.stderr == ""


@pytest.mark.parametrize("args,msg", [
    (["train.py", "--preset", "nope"], "error: unknown preset 'nope'"),
    (["train.py", "--n-head", "5"], "error: n_embd (192) must be divisible by n_head (5)"),
    (["train.py", "--dataset", "/nonexistent/path"], "error: dataset '/nonexistent/path' is neither"),
    (["sample.py", "--checkpoint", "/nonexistent/ckpt"], "error: checkpoint not found: /nonexistent/ckpt"),
    (["sample.py", "--checkpoint", ".", "--top-p", "2"], "error: top_p must be in (0, 1], got 2.0"),
], ids=["preset", "config", "dataset", "checkpoint", "top-p"])
def test_bad_input_gets_one_clear_line(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.strip() == msg or r.stderr.strip().startswith(msg), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_train_help_lists_flags_with_defaults():
    r = run("train.py", "--help")
    assert r.returncode == 0
    for flag in ("--n-layer", "--max-steps", "--batch-size", "--lr", "--preset", "--config", "--resume",
                 "--kernels", "--dataset", "--compile", "--wandb", "--device", "--dtype", "--seed", "(default: 4)"):
        assert flag in r.stdout, flag
