"""kernels/selfcheck.py (`make check-gpu`): its CPU-side logic; the GPU table itself needs CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA

from kernels import selfcheck


def test_fa_bound_takes_the_worst_output():
    exact = [torch.zeros(4), torch.zeros(4)]
    lowp = [torch.full((4,), 0.01), torch.full((4,), 0.001)]
    outs = [torch.full((4,), 0.015), torch.full((4,), 0.004)]  # second: 0.004 > 2 * 0.001 + 1e-3
    err, bound = selfcheck.fa_bound(outs, lowp, exact, torch.float16)
    assert err == pytest.approx(0.004) and bound == pytest.approx(0.003)
    assert not selfcheck.Result("x", "float16", err, bound, 0.1).ok
    err, bound = selfcheck.fa_bound(outs[:1], lowp[:1], exact[:1], torch.float16)
    assert err <= bound


def test_table_has_one_row_per_result():
    rows = [selfcheck.Result("rms_norm", "bfloat16", 1e-3, 2e-2, 0.05),
            selfcheck.Result("attention", "float16", 5e-3, 1e-3, 0.2)]
    lines = selfcheck.table(rows).splitlines()
    assert len(lines) == 3 and "pass" in lines[1] and "FAIL" in lines[2]


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rope"])
def test_a_case_runs_end_to_end_through_the_interpreter(op):
    """The same code path as on a GPU (inputs, gradients, FA bound), in fp16 on CPU (bf16 dots are wrong
    under the interpreter; these elementwise ops have none, but fp16 keeps the case cheap and exact)."""
    case = next(c for c in selfcheck.cases("cpu") if c[0] == op)
    res = selfcheck.run_case(*case, torch.float16, bench=lambda f: (f(), 0.0)[1])
    assert res.ok, res


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA message")
def test_exits_nonzero_with_one_line_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.selfcheck"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr
