"""Sharded checkpoints (torch.distributed.checkpoint) on CPU with gloo: promises 29 and 30.

One 4-rank torchrun launch trains FSDP2 + Muon to step 3 (every rank writes its own shards); one 2-rank launch
resumes that checkpoint at world 2 under FSDP2 and under DDP, and runs a straight --async-checkpoint run;
one process resumes it at world 1. Every continuation must give the uninterrupted one-process run's losses.
The same checkpoint is consolidated into a single file, loaded directly, and corrupted on purpose.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_two_ranks, step_losses, train_argv, write_code_corpus

from llm import checkpoint as ck
from llm.loading import load_model
from llm.train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: torchrun launches


def args(tmp: Path, out: str, *extra, **kw) -> list[str]:
    """Micro-batch 2, 8 sequences per step: 4 ranks x 1, 2 ranks x 2 or 1 rank x 4 micro-batches; Muon."""
    kw = dict(n_layer=2, global_batch_tokens=256, batch_size=2, optimizer="muon", eval_interval=100) | kw
    return [str(a) for a in train_argv(tmp, out, **kw)] + list(extra)


def close(a: dict, b: dict, steps) -> bool:
    """Equal losses within 1e-5 relative (sharded gradient norms sum in another order than one process's)."""
    return all(abs(a[s] - b[s]) <= 1e-5 * abs(b[s]) for s in steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    write_code_corpus(tmp)
    assert main(args(tmp, "one")) == 0  # the uninterrupted reference: 6 steps, one process
    run_two_ranks(tmp, [(args(tmp, "w4", "--fsdp", save_interval=1, keep_last=2), 3)], nproc=4)
    w4 = str(tmp / "w4")
    jobs = [(args(tmp, "w4to2", "--fsdp", "--resume", w4), -1), (args(tmp, "w4toddp", "--no-fsdp", "--resume", w4), -1),
            (args(tmp, "async", "--async-checkpoint", save_interval=2), -1)]
    out = run_two_ranks(tmp, jobs).stdout
    assert main(args(tmp, "w4to1", "--resume", w4)) == 0
    return tmp, out


def test_every_rank_writes_its_own_shards_and_latest_moves_last(runs):
    tmp, _ = runs
    w4 = tmp / "w4"
    assert ck.pointed(w4) == "ckpt-0000003"
    assert sorted(p.name for p in w4.iterdir() if p.name.startswith(("ckpt-", ".ckpt-"))) == [
        "ckpt-0000002", "ckpt-0000003"]  # --keep-last 2, no temp folder left
    src = w4 / "ckpt-0000003"
    assert ck.is_sharded(src) and not (src / ck.MODEL_FILE).exists() and not (src / ck.OPTIM_FILE).exists()
    shards = sorted((src / ck.SHARD_DIR).iterdir())
    per_rank: dict[str, list[int]] = {}
    for p in shards:
        per_rank.setdefault(p.name[:11], []).append(p.stat().st_size)
    assert sorted(per_rank) == ["shard-00001", "shard-00002", "shard-00003", "shard-00004"]
    total = sum(map(sum, per_rank.values()))
    assert max(map(sum, per_rank.values())) < 0.4 * total  # FSDP2: each rank wrote about a quarter, nobody all
    # one file per (module, state kind): a rank never builds its whole part in memory as one file
    assert all(len(sizes) > 10 and max(sizes) < 0.5 * sum(sizes) for sizes in per_rank.values()), per_rank
    assert sorted(p.name for p in src.glob("rank-*.json")) == [f"rank-{r:05d}.json" for r in range(4)]
    crcs = json.loads((src / ck.CHECKSUMS).read_text())
    assert {p.name for p in shards} <= {Path(k).name for k in crcs} and "trainer.json" in crcs
    tensors = ck.read_sharded(src, prefix="optim.")
    assert any(k.endswith("momentum_buffer") for k in tensors)  # Muon's momentum is in the checkpoint


def test_sharded_checkpoint_resumes_at_another_world_size_and_wrapper(runs):
    """Promise 30: world 4 FSDP2 -> world 2 FSDP2, world 2 DDP, world 1: the uninterrupted run's losses."""
    tmp, out = runs
    ref = step_losses(tmp / "one")
    assert close(step_losses(tmp / "w4"), ref, [1, 2, 3])
    for name in ("w4to2", "w4toddp", "w4to1"):
        got = step_losses(tmp / name)
        assert sorted(got) == [4, 5, 6] and close(got, ref, [4, 5, 6]), (name, got, ref)
    assert "sharded checkpoint written by 4 ranks FSDP2, read resharded by torch.distributed.checkpoint for 2 " \
           "ranks DDP" in out
    assert "remapped from 4 to 2 rank(s) with grad_accum 1 -> 2" in out
    assert ck.is_sharded(ck.resolve(tmp / "w4toddp")) and not ck.is_sharded(ck.resolve(tmp / "w4to1"))


def test_async_checkpoints_train_like_sync_ones(runs):
    tmp, _ = runs
    ref, got = step_losses(tmp / "one"), step_losses(tmp / "async")
    assert sorted(got) == list(range(1, 7)) and close(got, ref, range(1, 7)), (got, ref)
    assert ck.pointed(tmp / "async") == "ckpt-0000006"
    assert sorted(p.name for p in (tmp / "async").glob("*ckpt-*")) == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000006"]
    ck.verify_sharded(tmp / "async" / "ckpt-0000004")


def test_consolidate_and_direct_loading_of_a_sharded_checkpoint(runs, tmp_path, capsys):
    tmp, _ = runs
    assert ck.main(["consolidate", str(tmp / "w4"), str(tmp_path / "single")]) == 0
    assert "wrote" in capsys.readouterr().out
    one, _, _ = ck.load_checkpoint(tmp_path / "single")
    direct, _, cfg = load_model(tmp / "w4")  # the loaders take the sharded checkpoint itself
    assert cfg["sharded"]["world"] == 4
    a, b = one.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() == 0 for k in a)
    assert ck.main(["consolidate", str(tmp / "w4"), str(tmp_path / "single")]) == 2  # not over a non-empty dir
    assert capsys.readouterr().err.startswith("error: ")
    # --init-from takes the sharded checkpoint directly
    assert main(args(tmp, "ft", "--init-from", str(tmp / "w4"), max_steps=1, optimizer="adamw")) == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-checksums", "extra-shard"])
def test_a_damaged_sharded_checkpoint_is_one_error_line(runs, tmp_path, damage, capsys):
    tmp, _ = runs
    src = tmp_path / "ckpt"
    shutil.copytree(tmp / "w4" / "ckpt-0000003", src)
    shard = sorted((src / ck.SHARD_DIR).iterdir())[1]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        shard.write_bytes(data)
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "no-checksums":
        (src / ck.CHECKSUMS).unlink()
    else:
        shutil.copy(shard, src / ck.SHARD_DIR / "shard-00009-model-00001-of-00001.safetensors")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(src)
    msg = str(e.value)
    want = {"flip": "corrupted (crc32", "truncate": "not a readable safetensors shard",
            "no-checksums": "the sharded save did not finish",
            "extra-shard": "a shard that checksums.json does not list"}
    assert "\n" not in msg and want[damage] in msg, msg
    assert main(args(tmp, "bad", "--resume", str(src))) == 2  # resume refuses it with one line, before training
    assert capsys.readouterr().err.count("error:") == 1


KILL_JOB = """
import json, os, signal, sys, time
from pathlib import Path
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
from llm.train.cli import resolve_configs
from llm.train.trainer import train

argv, flag = json.loads(sys.argv[1]), Path(sys.argv[2])
real = HuggingFaceStorageWriter.write_data

def slow_write(self, plan, planner):  # the step-4 save's shards take a minute to write
    if "ckpt-0000004" in str(self.path):
        flag.with_suffix(".writing").touch()
        time.sleep(60)
    return real(self, plan, planner)

def kill_at_5(step, rec):  # training went on while the save was in flight; die in the middle of its write
    if step == 5:
        for _ in range(600):  # the background thread plans on its own group first: on a loaded machine step 5
            if flag.with_suffix(".writing").exists():  # can end before the write begins (a race, not a failure)
                break
            time.sleep(0.1)
        flag.write_text(str(flag.with_suffix(".writing").exists()))
        os.kill(os.getpid(), signal.SIGKILL)

HuggingFaceStorageWriter.write_data = slow_write
mcfg, dcfg, tcfg, args = resolve_configs(argv)
train(mcfg, dcfg, tcfg, args.resume, args.explicit, callbacks=[kill_at_5])
"""


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint_loadable(runs):
    """Promise 29: SIGKILL on every rank while the step-4 save is written in the background: `latest` still names
    step 2, which loads and resumes to the uninterrupted run's losses."""
    tmp, _ = runs
    script, flag = tmp / "kill_job.py", tmp / "kill_flag"
    script.write_text(KILL_JOB)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), json.dumps(args(tmp, "killed", "--async-checkpoint", save_interval=2)),
                        str(flag)], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and flag.read_text() == "True"  # killed at step 5 with the step-4 write under way
    out = tmp / "killed"
    assert ck.pointed(out) == "ckpt-0000002"
    assert (out / ".ckpt-0000004.tmp-sharded").is_dir() and not (out / "ckpt-0000004").exists()
    ck.load_checkpoint(out)
    assert main(args(tmp, "killed", "--resume", "--no-async-checkpoint", "--checkpoint-format", "single")) == 0
    ref, got = step_losses(tmp / "one"), step_losses(out)
    assert sorted(got) == list(range(1, 7)) and close(got, ref, range(1, 7)), (got, ref)
