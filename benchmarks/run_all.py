"""Run every kernel benchmark in turn: `python -m benchmarks.run_all` (or `make bench`).

Each benchmark writes CSV + PNG + markdown under benchmarks/results/<device>/. Without CUDA
this says so in one line and exits non-zero, like each kernel benchmark.
"""

from __future__ import annotations

import importlib
import sys

import torch

KERNEL_BENCHMARKS = ["bench_rmsnorm", "bench_rope", "bench_swiglu", "bench_cross_entropy", "bench_attention",
                     "bench_decode_attention", "bench_moe"]


def main() -> int:
    if not torch.cuda.is_available():
        print("run_all: no CUDA device found; kernel benchmarks need a GPU (nothing measured).")
        return 2
    failed = []
    for name in KERNEL_BENCHMARKS:
        print(f"\n===== {name} =====", flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            sys.argv = [name]  # each benchmark parses its own flags: give it none, so defaults apply
            rc = mod.main()
            if rc not in (None, 0):
                failed.append(name)
        except Exception as e:  # keep going: one broken benchmark must not hide the others
            print(f"{name} failed: {type(e).__name__}: {e}")
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
