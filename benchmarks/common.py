"""Shared benchmark plumbing: device detection, peak tables, timing, result files.

Every kernel benchmark:
  * exits non-zero with one line when there is no CUDA device (`require_cuda`);
  * times providers side by side in one process with `bench` (triton.testing.do_bench:
    median, p20, p80 in ms);
  * writes CSV + markdown + PNG (and the PNG's spec) under benchmarks/results/<device>/ with `write_results`;
    `python -m benchmarks.replot` redraws every PNG from the committed CSVs.
Memory-bound ops (RMSNorm, RoPE, SwiGLU) time their providers in the modes fwd / bwd / fwd+bwd
with `bandwidth_rows`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm.plotting import PlotSpec, draw

RESULTS = Path(__file__).resolve().parent / "results"

# Datasheet peaks per device name fragment: (dense bf16 TFLOP/s, HBM TB/s). Checked in order,
# so more specific names come first. Prefer measured ceilings (`measure_ceilings`) for "% of peak".
PEAKS: list[tuple[str, float, float]] = [
    ("H100 NVL", 835.0, 3.9),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),  # SXM
    ("H200", 989.0, 4.8),
    ("GH200", 989.0, 4.0),
    ("A100-SXM4-80GB", 312.0, 2.04),
    ("A100 80GB PCIe", 312.0, 1.94),
    ("A100", 312.0, 1.55),
    ("L40S", 362.0, 0.864),
    ("A10G", 70.0, 0.6),
    ("RTX 4090", 165.0, 1.0),
    ("RTX 3090", 71.0, 0.936),
]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def device_slug() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", device_name()).strip("-") or "cpu"


def peak(name: str | None = None) -> tuple[float | None, float | None]:
    """(TFLOP/s, TB/s) datasheet peaks for a device name, or (None, None) when unknown."""
    name = name or device_name()
    for key, tf, tb in PEAKS:
        if key in name:
            return tf, tb
    return None, None


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        print(f"{what}: no CUDA device found; kernel benchmarks need a GPU (nothing measured).")
        sys.exit(2)


def bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() on the current CUDA device."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(m) for m in ms)


def measure_ceilings() -> tuple[float, float]:
    """Measured (bf16 matmul TFLOP/s, copy TB/s counting bytes read + written) on this GPU."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _, _ = bench(lambda: a @ b)
    tflops = 2 * n**3 / ms / 1e9
    x = torch.empty(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms, _, _ = bench(lambda: y.copy_(x))
    tbs = 2 * x.numel() * x.element_size() / ms / 1e9
    return tflops, tbs


def cpu_read_bandwidth(nbytes: int, rep: int = 9) -> float:
    """Measured CPU read bandwidth (bytes/s) at torch's current thread count over an fp32 buffer of nbytes.

    Two streaming reads of the whole buffer, a reduction (sum) and a one-row GEMV with the buffer as a
    K-major weight (x @ W, what a decode step runs; on the project's CPU machine it reads faster than
    sum): the faster of the two, each the median of `rep` timings (single best timings swung by 50%
    between runs on a shared machine; medians hold still).
    """
    K = 512
    buf = torch.randn(max(int(nbytes) // 4 // K, 16) * K)
    W, x = buf.view(K, -1), torch.randn(1, K)
    rates = []
    for fn in (buf.sum, lambda: x @ W):
        fn()
        ts = []
        for _ in range(rep):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        rates.append(buf.nbytes / sorted(ts)[rep // 2])
    return max(rates)


def threads_text(n: int) -> str:
    """"1 thread" / "n threads", for titles and console lines."""
    return f"{n} thread{'' if n == 1 else 's'}"


def weight_shape(text: str) -> tuple[int, int]:
    """argparse type of a weight shape "N x K" ("2816x1024": output features x input features)."""
    import argparse

    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N x K (e.g. 2816x1024)") from None
    return n, k


def versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "n/a"
    date = _dt.date.today().isoformat()
    return f"device: {device_name()} | torch {torch.__version__} | triton {tv} | {date}"


def write_results(name: str, rows: list[dict], x: str, y: str, series: str = "provider",
                  panels: str | None = None, title: str = "", **plot) -> Path:
    """Write rows as <name>.csv, <name>.md (markdown table), <name>.plot.json and <name>.png under
    results/<device>/.

    The plot (llm/plotting.py `draw`) draws `y` against `x`, one mark per value of `series`, one panel per
    value of `panels` (e.g. mode fwd/bwd); `plot` holds the other PlotSpec fields: xlabel / ylabel (with the
    unit), legend, kind, zero, logx, logy. <name>.plot.json keeps that spec, so `python -m benchmarks.replot`
    redraws the PNG from the committed CSV without re-running the benchmark. Returns the output folder.
    """
    out = RESULTS / device_slug()
    out.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0].keys()) if rows else []
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title or name}", "", versions(), "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    spec = PlotSpec(x=x, y=y, series=series, panels=panels, title=title or name, **plot)
    (out / f"{name}.plot.json").write_text(spec.to_json())
    draw(out / f"{name}.png", rows, spec)
    print("\n".join(lines))
    print(f"\nwrote {out}/{name}.{{csv,md,plot.json,png}}")
    return out


def short_name(path: str | Path) -> str:
    """A checkpoint or data path as it may appear in committed results: its last part (its last two for a
    ckpt-NNNNNNN folder), never the machine's absolute path ("/work/main/out" -> "out")."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name.startswith("ckpt-") and p.parent.name else p.name or str(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------- memory-bound ops: providers side by side

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_modes(fn, inputs: list[torch.Tensor], upstream: list[torch.Tensor], rep: int, *args) -> dict:
    """(median, p20, p80) ms of fn(*inputs, *args) per mode: fwd, bwd (on a retained graph) and fwd+bwd.

    Gradients are taken with torch.autograd.grad, so nothing accumulates into .grad between runs.
    """

    def fwd():
        return fn(*inputs, *args)

    def as_list(o):
        return list(o) if isinstance(o, tuple) else [o]

    outs = as_list(fwd())

    def bwd():
        return torch.autograd.grad(outs, inputs, upstream, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(as_list(fwd()), inputs, upstream)

    fwd_bwd()  # compile / first allocations outside the measurements
    return {"fwd": bench(fwd, rep=rep), "bwd": bench(bwd, rep=rep), "fwd+bwd": bench(fwd_bwd, rep=rep)}


def max_error(fn, ref, inputs: list[torch.Tensor], *args) -> float:
    """Largest |fn - ref on fp32 inputs| over the outputs: a sanity check printed with the timings.

    fn gets clones (some providers rotate or overwrite their inputs in place)."""
    with torch.no_grad():
        want = ref(*[t.float() for t in inputs], *args)
        got = fn(*[t.detach().clone() for t in inputs], *args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return max((g.float() - w).abs().max().item() for g, w in zip(got, want))


def raise_recompile_limit(n: int = 64) -> None:
    """Benchmarks compile one graph per shape: allow more than dynamo's default of 8 recompiles."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), n))
            return


def copy_bandwidth() -> float:
    """Set up a memory-bound benchmark: allow a compiled graph per shape, then measure and print the
    copy bandwidth (TB/s, bytes read + written) its "% copy" column compares against."""
    raise_recompile_limit()
    _, copy_tbs = measure_ceilings()
    print(f"measured copy bandwidth: {copy_tbs:.2f} TB/s (bytes read + written)")
    return copy_tbs


def bandwidth_rows(providers: dict[str, Callable], reference: Callable, inputs: list[torch.Tensor],
                   upstream: list[torch.Tensor], *, nbytes: dict[str, int], copy_tbs: float, rep: int, label: str,
                   shape: dict, panel: str, args: tuple = ()) -> list[dict]:
    """Time every provider in every mode (`time_modes`) on one problem; one result row per provider and mode.

    nbytes: bytes each mode must move (the same for every provider), giving GB/s and % of copy_tbs
    (the measured copy bandwidth, TB/s). label names the problem in the progress lines (its
    padding after "=" is dropped in the error line); shape holds the problem's columns of a row;
    panel + mode is the row's plot panel. args follow the inputs in every call (e.g. eps).
    A provider that fails (OOM, API drift) is reported in one line and skipped: it must not stop the others.
    """
    rows: list[dict] = []
    for name, fn in providers.items():
        try:
            err = max_error(fn, reference, inputs, *args)
            timings = time_modes(fn, inputs, upstream, rep, *args)
        except Exception as e:
            problem = re.sub(r"=\s+", "=", label)
            print(f"{name} {problem}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
            continue
        for mode, (med, p20, p80) in timings.items():
            gbps = nbytes[mode] / med / 1e6
            rows.append({"provider": name, **shape, "mode": mode, "panel": f"{panel} {mode}", "ms": med,
                         "ms_p20": p20, "ms_p80": p80, "GB/s": gbps, "pct_copy": 100 * gbps / (copy_tbs * 1e3),
                         "max_err": err})
        print(f"{name:>14} {label}: " + "  ".join(
            f"{m} {t[0]:.3f} ms {nbytes[m] / t[0] / 1e6:6.0f} GB/s" for m, t in timings.items())
            + f"  (max err {err:.2g})")
    return rows
