"""Shared test setup: the interpreter switch, the tolerance table, comparison helpers.

Without CUDA, Triton kernels run through TRITON_INTERPRET=1 on CPU tensors. The
variable must be set before any @triton.jit function is created, so it is set
here, before tests import kernel modules.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Device kernel tests run on: CUDA when present, else CPU through the interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Absolute / relative tolerances for a kernel output vs the fp32 reference, per input dtype.
# Used where the FlashAttention rule (below) does not apply (e.g. exact elementwise ops).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# Floor for the FlashAttention rule, so an exact low-precision reference (error 0) does not
# demand an exact kernel: error <= FA_FACTOR * ref_error + FA_FLOOR[dtype].
FA_FACTOR = 2.0
FA_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Seed torch's global RNG per test from its id: inputs stay random but do not depend on which
    tests ran before (a run of one file, -k, or a different order gives the same numbers)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def assert_fa_rule(out: torch.Tensor, ref_lp: torch.Tensor, ref_hp: torch.Tensor, name: str = "out") -> None:
    """FlashAttention rule: max|out - ref_hp| <= 2 * max|ref_lp - ref_hp| + floor.

    out: kernel result in low precision; ref_lp: reference op run in the same low
    precision; ref_hp: reference in fp32/fp64.
    """
    err = (out.double() - ref_hp.double()).abs().max().item()
    ref_err = (ref_lp.double() - ref_hp.double()).abs().max().item()
    bound = FA_FACTOR * ref_err + FA_FLOOR[out.dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, name: str = "out") -> None:
    tol = TOL[dtype or out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), msg=lambda m: f"{name}: {m}", **tol)
