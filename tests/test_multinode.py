"""Two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, one process each) train exactly like one process with the
same global batch (promise 31): the multi-node launch line of docs/scaling-out.md and scripts/slurm/train.sbatch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TWO_RANK_JOB, step_losses, train_argv, write_code_corpus

from llm import checkpoint as ck
from llm.train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: two torchrun launches

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_equal_one_process(tmp_path):
    write_code_corpus(tmp_path)
    argv = [str(a) for a in train_argv(tmp_path, "one", n_layer=2, global_batch_tokens=256, save_interval=3)]
    assert main(argv) == 0  # one process: 2 micro-batches of 4 per step
    script = tmp_path / "job.py"
    script.write_text(TWO_RANK_JOB)
    job = json.dumps([[[a if a != str(tmp_path / "one") else str(tmp_path / "nodes") for a in argv], -1]])
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-id", "i27-test",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", str(script), job],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=400) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    ref, got = step_losses(tmp_path / "one"), step_losses(tmp_path / "nodes")
    assert sorted(got) == list(range(1, 7)) and all(got[s] == ref[s] for s in ref), (got, ref)  # DDP: bitwise
    assert "2 rank(s) x 1 accumulation x 4 seqs" in "".join(o[0] for o in outs)
    assert ck.is_sharded(ck.resolve(tmp_path / "nodes"))  # both "nodes" wrote their part of the checkpoints
    a, _, _ = ck.load_checkpoint(tmp_path / "one")
    b, _, _ = ck.load_checkpoint(tmp_path / "nodes")
    assert all((a.state_dict()[k] - v).abs().max() == 0 for k, v in b.state_dict().items())
