"""Checkpoints that lose nothing (RELIABILITY.md promises 1, 5, 6, 7).

One straight 8-step run is the reference; a child process trains the same run and is killed
with SIGKILL in the middle of writing its step-6 checkpoint; resuming it must reproduce the
reference bit for bit (fp32, CPU).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import metrics_records, train_argv

from llm import checkpoint as ck
from llm.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_args(tmp: Path, out: str, **kw) -> list[str]:
    return train_argv(tmp, out, **(dict(max_steps=8, dropout=0.1) | kw))


def losses(out: Path) -> dict[int, float]:
    rows = metrics_records(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def tmp(corpus_tmp):
    return corpus_tmp


@pytest.fixture(scope="module")
def straight(tmp):
    assert main(tiny_args(tmp, "straight")) == 0
    return tmp / "straight"


CHILD = """
import os, signal, sys
from llm import checkpoint
from llm.train.cli import main

real_fsync = checkpoint._fsync

def fsync_then_die(path):  # SIGKILL ourselves in the middle of writing the step-6 checkpoint
    real_fsync(path)
    if path.name == "model.safetensors" and path.parent.name.startswith(".ckpt-0000006.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._fsync = fsync_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killed(tmp, straight):
    r = subprocess.run([sys.executable, "-c", CHILD, *tiny_args(tmp, "killed", save_interval=2)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    return tmp / "killed", r


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint_loadable(killed):
    """Promise 1: SIGKILL mid-save -> `latest` still names the previous, complete checkpoint."""
    out, r = killed
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / "latest").read_text().strip() == "ckpt-0000004"
    partial = [p.name for p in out.iterdir() if p.name.startswith(".ckpt-0000006.tmp")]
    assert partial and not (out / "ckpt-0000006").exists()
    model, _, _ = ck.load_checkpoint(out)
    assert ck.read_trainer_state(ck.resolve(out))["step"] == 4
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("crash", ["optimizer_write", "pointer_move"])
def test_crash_at_any_point_of_a_save_keeps_latest_on_a_complete_checkpoint(tmp_path, monkeypatch, crash):
    """Promise 1, the other crash points: while writing files into the temp dir, and after the rename."""
    from llm.config import ModelConfig
    from llm.model import Transformer
    from llm.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world " * 20], 260)
    model = Transformer(ModelConfig(vocab_size=260, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    opt = torch.optim.AdamW(model.parameters())
    ck.save(tmp_path, "ckpt-0000001", model, tok, None, opt, {"step": 1})
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)

    def boom(*a, **k):
        raise OSError("simulated crash")

    if crash == "optimizer_write":
        real = ck.save_file
        monkeypatch.setattr(ck, "save_file", lambda t, p, **k: boom() if p.name == ck.OPTIM_FILE else real(t, p, **k))
    else:
        monkeypatch.setattr(ck, "set_pointer", boom)
    with pytest.raises(OSError, match="simulated crash"):
        ck.save(tmp_path, "ckpt-0000002", model, tok, None, opt, {"step": 2})
    assert ck.resolve(tmp_path).name == "ckpt-0000001"
    loaded, _, _ = ck.load_checkpoint(tmp_path)
    assert not torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)  # the old weights, complete
    ck.prune(tmp_path, keep=3)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(tmp, straight, killed):
    """Promise 5: N steps + kill + resume == 2N straight steps, bitwise (fp32, CPU, dropout on)."""
    out, _ = killed
    assert main(tiny_args(tmp, "killed", save_interval=2) + ["--resume"]) == 0
    want, got = losses(straight), losses(out)
    assert sorted(got) == list(range(1, 9))
    assert got == want  # exact float equality, every step
    a, _ = ck.read_tensors(straight / "ckpt-0000008" / ck.MODEL_FILE)
    b, _ = ck.read_tensors(out / "ckpt-0000008" / ck.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the partial save was cleaned up


@pytest.mark.parametrize("change,msg", [
    (["--batch-size", "8"], "--resume: the batch changed"),
    (["--grad-accum", "2"], "--resume: the batch changed"),
    (["--n-layer", "2"], "--resume: the model config differs from the checkpoint's"),
], ids=["batch-size", "grad-accum", "model"])
def test_resume_with_changed_batch_is_refused(tmp, straight, capsys, change, msg):
    """Promise 6: a changed batch (or model) on resume is refused with one clear line."""
    assert main(tiny_args(tmp, "straight") + ["--resume", *change]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {msg}") and "\n" not in err, err


def test_resume_with_changed_dataset_is_refused(tmp, straight, capsys):
    """Promise 6: the data under a checkpoint is identified by its shards' checksums."""
    other = tmp / "other.txt"
    other.write_text("".join(f"class C{i}:\n    x = {i}\n\n" for i in range(400)))
    assert main(tiny_args(tmp, "straight") + ["--resume", "--dataset", str(other)]) == 2
    assert "error: --resume: the dataset differs from the checkpoint's" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint_and_resume_continues(tmp, straight):
    """Promise 7: SIGTERM -> checkpoint at the current step, exit 0; --resume carries on from there."""
    out = tmp / "term"
    p = subprocess.Popen([sys.executable, "train.py", *tiny_args(tmp, "term", max_steps=100000)], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    step = ck.read_trainer_state(ck.resolve(out))["step"]
    assert step >= 2 and f"interrupted at step {step}" in stdout
    assert (out / "latest").read_text().strip() == f"ckpt-{step:07d}"
    assert main(tiny_args(tmp, "term", max_steps=step + 2) + ["--resume"]) == 0
    assert (out / "latest").read_text().strip() == f"ckpt-{step + 2:07d}"
    assert sorted(losses(out)) == list(range(1, step + 3))


def test_ctrl_c_writes_a_final_checkpoint_and_exits_130(tmp, straight):
    """Promise 7: Ctrl-C (SIGINT) stops at the step boundary, saves, and exits 130."""

    def press_ctrl_c(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert main(tiny_args(tmp, "ctrlc"), callbacks=[press_ctrl_c]) == 130
    assert (tmp / "ctrlc" / "latest").read_text().strip() == "ckpt-0000002"
