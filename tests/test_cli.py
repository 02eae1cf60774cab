"""End to end through the command lines: train -> checkpoint -> sample, and clear errors on bad input."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_code_corpus

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_code_corpus(tmp)
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
    # one short config line naming the file with every setting (was three ~600-character lines)
    config = [ln for ln in stdout.splitlines() if ln.startswith("config: ")]
    assert len(config) == 1 and len(config[0]) < 400 and config[0].endswith(str(out / "config.toml")), config
    assert "n_layer=1" in config[0] and (out / "config.toml").is_file()
    assert not any(ln.startswith(("model: block_size=", "train: out_dir=")) for ln in stdout.splitlines())


@pytest.mark.slow
def test_sample_cli_prints_text(trained):
    out, _ = trained
    r = run("sample.py", "--checkpoint", str(out), "--prompt", "def f1", "--max-new-tokens", "12", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f1") and "tok/s" in r.stderr
    q = run("sample.py", "--checkpoint", str(out), "--prompt", "def", "--max-new-tokens", "5", "--quiet",
            "--temperature", "0")
    assert q.returncode == 0 and q.stderr == ""


def _hint(stdout: str) -> list[str]:
    """The argv of the trainer's closing `sample with: llm sample ...` hint, run with this interpreter
    (`llm` is the console script of `python -m llm`)."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("sample with: "))
    cmd = line.removeprefix("sample with: ").split()
    assert cmd[0] == "llm", line
    return ["-m", "llm", *cmd[1:]]


@pytest.mark.slow
def test_the_trainers_sample_hint_runs_as_printed_with_the_room_the_context_leaves(trained):
    """`make train`'s closing hint (no --max-new-tokens) on a model whose context (32) is shorter than the
    default 200 new tokens: it runs, generating the room the context leaves, and the timing line says so."""
    out, stdout = trained
    r = run(*_hint(stdout), "--seed", "0", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "1 prompt + 31 new tokens" in r.stderr and "max-new-tokens 31: the room the context (32) leaves" in r.stderr
    for extra in (["--quantize", "int8"], ["--num-beams", "2"], ["--prompt-lookup", "2", "--temperature", "0"],
                  ["--prompt", "def f1(x):"]):
        r = run(*_hint(stdout), "--threads", "1", *extra)
        assert r.returncode == 0 and "max-new-tokens" in r.stderr, (extra, r.stderr)
    given = run(*_hint(stdout), "--max-new-tokens", "200")  # given and too large: today's error
    assert given.returncode == 2 and given.stderr.startswith("error: max_new_tokens (200) leaves no room"), given.stderr


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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random-weight checkpoint with a BPE tokenizer that knows some CJK and emoji (no training run)."""
    import torch

    from llm.checkpoint import save
    from llm.config import ModelConfig
    from llm.model import Transformer
    from llm.tokenizer import Tokenizer

    tok = Tokenizer.train(["def f(x):\n    return x + 1\n# 日本語 中文 😀 🎉\n" * 30], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32))
    return save(tmp_path_factory.mktemp("sample"), "ckpt", model, tok)


def test_sample_cli_streams_unicode_and_same_seed_gives_same_text(ckpt):
    args = ("sample.py", "--checkpoint", str(ckpt), "--prompt", "日本語 😀", "--max-new-tokens", "20", "--seed", "5",
            "--threads", "1",
            "--stream", "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.2")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("日本語 😀") and len(a.stdout) > len("日本語 😀\n")
    assert "TTFT" in a.stderr and "tok/s" in a.stderr


def test_sample_cli_batch_of_prompts_stops_and_beams(ckpt, tmp_path):
    (tmp_path / "p.txt").write_text("def f(x):")
    r = run("sample.py", "--checkpoint", str(ckpt), "--prompt", "", "--prompt", "中文", "--prompt-file",
            str(tmp_path / "p.txt"), "--max-new-tokens", "12", "--temperature", "0", "--num-samples", "2",
            "--stop", "\\n", "--quiet", "--threads", "1")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.splitlines()) >= 6  # 3 prompts x 2 samples, none holds the stop string
    q = run("sample.py", "--checkpoint", str(ckpt), "--prompt", "def", "--max-new-tokens", "8", "--num-beams", "3",
            "--num-samples", "2", "--threads", "1")
    assert q.returncode == 0, q.stderr
    assert "--- prompt 1, sample 2" in q.stdout and q.stdout.count("def") >= 2
    assert "--- 2 row(s), " in q.stderr and "beam search: 3 beam(s) x " in q.stderr, q.stderr  # what was returned


def test_context_overflow_names_both_numbers_unless_truncated(ckpt):
    long = "return x + 1 " * 20
    r = run("sample.py", "--checkpoint", str(ckpt), "--prompt", long, "--max-new-tokens", "30")
    assert r.returncode == 2 and r.stderr.startswith("error: prompt (") and "max_new_tokens (30)" in r.stderr
    assert "exceeds the context length 48" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    t = run("sample.py", "--checkpoint", str(ckpt), "--prompt", long, "--max-new-tokens", "30", "--truncate-prompt")
    assert t.returncode == 0 and "note: prompt truncated to its last 18 tokens" in t.stderr, t.stderr


def test_eval_cli_reports_loss_and_perplexity_as_json(ckpt, tmp_path):
    import json
    import math

    (tmp_path / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    r = run("-m", "llm.eval", "--checkpoint", str(ckpt), "--dataset", str(tmp_path / "doc.txt"), "--stride", "16",
            "--json", "--split", "all")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["split"] == "all" and res["stride"] == 16 and res["context"] == 48 and res["tokens"] > 100
    assert res["perplexity"] == math.exp(res["loss"]) and res["loss"] > 0
    v = run("-m", "llm.eval", "--checkpoint", str(ckpt), "--dataset", str(tmp_path / "doc.txt"))  # default: val
    assert v.returncode == 0 and "(val split: the 0.05 held out, as the trainer validates)" in v.stdout, v.stderr


@pytest.mark.parametrize("args,msg", [
    (["--min-p", "2"], "error: min_p must be in [0, 1], got 2.0"),
    (["--num-beams", "2", "--top-k", "5"], "error: beam search is deterministic: --top-k do not apply"),
    (["--max-new-tokens", "0"], "error: max_new_tokens must be >= 1, got 0"),
    (["--stream", "--prompt", "a", "--prompt", "b"], "error: --stream prints one sequence"),
    (["--prompt-file", "/nonexistent/p.txt"], "error: cannot read prompt file /nonexistent/p.txt"),
], ids=["min-p", "beams-top-k", "max-new", "stream-batch", "prompt-file"])
def test_bad_sample_flags_get_one_clear_line(args, msg):
    r = run("sample.py", "--checkpoint", ".", *args)
    assert r.returncode == 2 and r.stderr.startswith(msg), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_eval_input_gets_one_clear_line(ckpt):
    r = run("-m", "llm.eval", "--checkpoint", str(ckpt), "--dataset", "pystdlib", "--stride", "100")
    assert r.returncode == 2 and r.stderr.strip() == "error: need 1 <= stride <= context, got stride 100 and context 48"


def test_train_help_lists_flags_with_defaults():
    r = run("train.py", "--help")
    assert r.returncode == 0
    for flag in ("--n-layer", "--max-steps", "--batch-size", "--lr", "--preset", "--config", "--resume",
                 "--kernels", "--dataset", "--compile", "--wandb", "--device", "--dtype", "--seed", "(default: 4)"):
        assert flag in r.stdout, flag


def _help_entries(text: str) -> dict[str, str]:
    """{first flag: its help text} of an argparse --help."""
    out, flag = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            flag = m.group(1)
            out[flag] = line
        elif flag and line.startswith("   "):
            out[flag] += " " + line.strip()
        else:
            flag = None
    return out


def test_help_is_grouped_and_shows_each_default_once(tmp_path):
    """sample.py and train.py --help: sections, no '(default: None)', no flag naming its default twice, and
    --top-k only means sampling (MoE routing is train.py --moe-top-k; the config field stays top_k)."""
    from llm.train.cli import resolve_configs

    s, t = run("sample.py", "--help"), run("train.py", "--help")
    assert s.returncode == 0 and t.returncode == 0
    for section in ("model and checkpoint:", "prompt:", "sampling:", "beam search:", "speculative decoding:",
                    "decoding speed:", "output:"):
        assert f"\n{section}\n" in s.stdout, section
    for section in ("training: optimizer and schedule:", "training: fine-tuning", "training: µP:", "training: Muon:",
                    "training: health and loss spikes:", "training: checkpoints:"):
        assert f"\n{section}" in t.stdout, section
    for text in (s.stdout, t.stdout):
        entries = _help_entries(text)
        assert "(default: None)" not in text
        doubled = [f for f, h in entries.items() if h.count("default") > 1]
        assert not doubled, doubled
    assert "(default" not in _help_entries(s.stdout)["--checkpoint"]  # required
    assert "--moe-top-k" in t.stdout and "--top-k" not in _help_entries(t.stdout) and "--top-k" in s.stdout
    (tmp_path / "moe.toml").write_text("n_experts = 4\ntop_k = 1\n")  # saved configs keep the field name
    mcfg = resolve_configs(["--config", str(tmp_path / "moe.toml"), "--moe-top-k", "3"])[0]
    assert (mcfg.n_experts, mcfg.top_k) == (4, 3)
    assert resolve_configs(["--config", str(tmp_path / "moe.toml")])[0].top_k == 1
