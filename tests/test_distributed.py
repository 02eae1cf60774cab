"""torchrun data parallelism on CPU (gloo): 2 processes train exactly like 1 process with the same global batch.

One torchrun launch (2 ranks) runs a DDP job that stops at step 3 (a final checkpoint), and an
FSDP2 job (with activation checkpointing) that stops at step 3 and resumes to step 6; one process
then resumes the DDP checkpoint with the world size remapped (2 ranks x 1 micro-batch -> 1 rank
x 2 micro-batches) and must continue the reference exactly.
"""

from pathlib import Path

import pytest
from conftest import run_two_ranks, step_losses, train_argv, write_code_corpus

from llm import checkpoint as ck
from llm.train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a torchrun launch of 2 processes


def tiny_args(tmp: Path, out: str, **kw) -> list[str]:
    return train_argv(tmp, out, **(dict(n_layer=2, global_batch_tokens=256, eval_interval=3, eval_iters=3) | kw))


losses = step_losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    write_code_corpus(tmp)
    assert main(tiny_args(tmp, "one")) == 0  # the 1-process reference: 2 micro-batches of 4 per step
    fsdp = tiny_args(tmp, "fsdp") + ["--fsdp", "--activation-checkpointing"]
    jobs = [(tiny_args(tmp, "ddp"), 3), (fsdp, 3), (fsdp + ["--resume"], -1)]
    return tmp, run_two_ranks(tmp, jobs).stdout


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(runs):
    tmp, stdout = runs
    ref, ddp = losses(tmp / "one"), losses(tmp / "ddp")
    assert sorted(ddp) == [1, 2, 3]
    assert all(ddp[s] == ref[s] for s in ddp), (ddp, ref)  # bitwise
    assert "2 rank(s) x 1 accumulation x 4 seqs" in stdout and "1 rank(s) x 2" not in stdout
    assert stdout.count("plan: ") == 3  # rank 0 alone prints (one line per job)
    assert (tmp / "ddp" / "latest").read_text().strip() == "ckpt-0000003"


def test_resume_remaps_world_size_exactly(runs):
    """Promise 6, the explicit remap: 2 ranks x 1 micro-batch resumed as 1 rank x 2 continues the same run."""
    tmp, _ = runs
    assert main(tiny_args(tmp, "ddp") + ["--resume"]) == 0
    assert losses(tmp / "ddp") == losses(tmp / "one")
    a, _ = ck.read_tensors(tmp / "one" / "ckpt-0000006" / ck.MODEL_FILE)
    b, _ = ck.read_tensors(tmp / "ddp" / "ckpt-0000006" / ck.MODEL_FILE)
    assert all((a[k] - b[k]).abs().max() == 0 for k in a)


def test_fsdp_two_processes_match_one_process_through_a_resume(runs):
    tmp, _ = runs
    ref, fsdp = losses(tmp / "one"), losses(tmp / "fsdp")
    assert sorted(fsdp) == list(range(1, 7)) and "resumed from" in runs[1]
    # Sharded gradient norms sum in a different order than one process's; nothing else differs.
    assert all(abs(fsdp[s] - ref[s]) <= 1e-5 * abs(ref[s]) for s in fsdp), (fsdp, ref)
    model, _, _ = ck.load_checkpoint(tmp / "fsdp")  # a full (gathered) checkpoint, loadable by one process
    a, _ = ck.read_tensors(tmp / "one" / "ckpt-0000006" / ck.MODEL_FILE)
    assert all((model.state_dict()[k] - a[k]).abs().max() < 1e-4 for k in a)
