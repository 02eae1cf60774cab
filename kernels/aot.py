"""Ahead-of-time compile check: every kernel configuration, for sm_80 and sm_90, without a GPU.

    python -m kernels.aot [--jobs N] [--only SUBSTR] [--force] [--out DIR]

Each kernel file lists what its launchers and autotuners can pick (`aot_cases()`, built from the
same config functions the launchers call). Every case is compiled with Triton's compiler and the
ptxas shipped in the triton wheel for each GPU arch it can run on; ptxas's report gives registers
and spills, the compiled metadata the shared memory. A case fails on a compile error, shared memory
over the arch's per-block limit, or any spilled byte. The table goes to benchmarks/results/aot/
(report.md for people, report.json for the cache): a case whose key (kernel source and the
@triton.jit helpers it calls, triton version, arch, signature, constexprs, warps, stages) is in the
committed report.json is not recompiled, so a fresh clone recompiles only kernels whose source
changed, and everything when the triton version differs.

Needs Triton's internal binder (`create_function_from_signature`, `JITFunction._pack_args`, as in
Triton 3.9); elsewhere it says so in one line and exits with status 2. Must run without
TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MODULES = ("attention", "decode", "paged_decode", "rmsnorm", "rope", "swiglu", "cross_entropy", "moe", "quant_matmul",
           "distill")
# Usable shared memory per block (bytes) and per SM, by arch major.
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}
SMEM_PER_SM = {8: 164 * 1024, 9: 228 * 1024}
ARCH_NAME = {8: "sm_80", 9: "sm_90"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "aot"
_WORD = re.compile(r"[A-Za-z_]\w*")


class Unsupported(RuntimeError):
    """This Triton build lacks the pieces an offline compile needs."""


def _triton_parts():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise Unsupported("kernels.aot: unset TRITON_INTERPRET (the interpreter replaces @triton.jit kernels)")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature
    except ImportError as e:  # no triton, or a release with another layout
        raise Unsupported(f"kernels.aot: this triton cannot compile offline ({e}); needs Triton 3.9's API") from e
    if not hasattr(JITFunction, "_pack_args") or not hasattr(triton, "knobs"):
        raise Unsupported(f"kernels.aot: triton {triton.__version__} lacks JITFunction._pack_args / knobs "
                          "(written against Triton 3.9)")
    return triton, GPUTarget, ASTSource, make_backend, JITFunction, MockTensor, create_function_from_signature


@functools.cache
def _cases(mod: str) -> list:
    return importlib.import_module(f"kernels.{mod}").aot_cases()


@functools.cache
def _backend_binder(fn, major: int):
    GPUTarget, make_backend, make_binder = (_triton_parts()[i] for i in (1, 3, 6))
    target = GPUTarget("cuda", 80 if major == 8 else 90, 32)
    backend = make_backend(target)
    return target, backend, make_binder(fn.signature, fn.params, backend)


def all_cases(only: str | None = None) -> list[tuple[str, int, object]]:
    """(module, index, AotCase) for every case of every kernel file, optionally filtered by a substring
    of "module.kernel label config"."""
    out = []
    for mod in MODULES:
        for i, c in enumerate(_cases(mod)):
            name = f"{mod}.{c.kernel.__name__} {c.label} {c.config_str()}"
            if only is None or only in name:
                out.append((mod, i, c))
    return out


def source_hash(fn, JITFunction) -> str:
    """sha256 over the source of fn and, transitively, of the @triton.jit functions it names."""
    seen, stack, parts = set(), [fn], []
    while stack:
        f = stack.pop()
        if f.__name__ in seen:
            continue
        seen.add(f.__name__)
        parts.append(f.src)
        for w in sorted(set(_WORD.findall(f.src))):
            g = f.fn.__globals__.get(w)
            if isinstance(g, JITFunction) and g.__name__ not in seen:
                stack.append(g)
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]


def _bind(case, major: int):
    """Signature, constexprs, attributes and options exactly as JITFunction.run would build them."""
    triton, _, ASTSource, _, _, MockTensor, _ = _triton_parts()
    fn = case.kernel
    target, backend, binder = _backend_binder(fn, major)
    args = []
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            args.append(case.consts[name])
        elif name.endswith("_ptr"):
            args.append(MockTensor(case.ptrs.get(name, case.dtype)))
        elif name in case.scalars:
            args.append(case.scalars[name])
        else:
            args.append(4096 if name.startswith("stride") else 1000)
    kw = dict(num_warps=case.num_warps, num_stages=case.num_stages)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return triton, ASTSource, target, options, signature, constexprs, attrs


def case_key(case, major: int) -> str:
    triton, _, _, options, signature, constexprs, attrs = _bind(case, major)
    JITFunction = _triton_parts()[4]
    blob = json.dumps([triton.__version__, major, source_hash(case.kernel, JITFunction), signature,
                       sorted((str(k), str(v)) for k, v in constexprs.items()),
                       sorted((str(k), str(v)) for k, v in attrs.items()), case.num_warps, case.num_stages])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def parse_ptxas(log: str) -> dict:
    """Registers and spill bytes from `ptxas -v` (the maximum over the functions it reports)."""
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    if not regs:
        raise ValueError(f"no register count in the ptxas report:\n{log}")
    return dict(regs=max(regs), spill_stores=max(stores or [0]), spill_loads=max(loads or [0]))


def occupancy(regs: int, smem: int, num_warps: int, major: int) -> float:
    """Resident warps per SM / 64 from registers (65536 per SM, 256-register warp granules), shared
    memory (plus 1 KB reserved per block) and the 64-warp / 32-block limits."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * num_warps) if per_warp else 32
    by_smem = SMEM_PER_SM[major] // (smem + 1024)
    blocks = min(by_regs, by_smem, 64 // num_warps, 32)
    return round(blocks * num_warps / 64, 3)


def _job_name(job: tuple[str, int, int]) -> tuple[str, str, str]:
    mod, i, _ = job
    case = _cases(mod)[i]
    return mod, case.kernel.__name__, case.config_str()


def compile_case(job: tuple[str, int, int]) -> dict:
    """Compile one (module, case index, arch major); return its report row (never raises)."""
    mod, i, major = job
    case = _cases(mod)[i]
    row = dict(module=mod, kernel=case.kernel.__name__, label=case.label, config=case.config_str(),
               arch=ARCH_NAME[major], key=case_key(case, major))
    t0 = time.perf_counter()
    try:
        triton, ASTSource, target, options, signature, constexprs, attrs = _bind(case, major)
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a cached binary would skip ptxas and its report
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(case.kernel, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
        row.update(parse_ptxas(buf.getvalue()), smem=int(k.metadata.shared), error="")
        row["occupancy"] = occupancy(row["regs"], row["smem"], case.num_warps, major)
    except Exception as e:  # a failed compile is a result to report, not a crash of the check
        msg = str(e).strip().splitlines()
        row.update(regs=-1, spill_stores=-1, spill_loads=-1, smem=-1, occupancy=0.0,
                   error=f"{type(e).__name__}: {msg[0] if msg else ''}"[:300])
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def problems(row: dict) -> list[str]:
    """Why a row fails the check (empty: it passes)."""
    major = 8 if row["arch"] == "sm_80" else 9
    out = []
    if row["error"]:
        out.append(row["error"])
    else:
        if row["spill_stores"] or row["spill_loads"]:
            out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
        if row["smem"] > SMEM_LIMIT[major]:
            out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[major]} B")
    return out


def load_cache(out_dir: Path) -> dict[str, dict]:
    path = out_dir / "report.json"
    if not path.exists():
        return {}
    try:
        return {r["key"]: r for r in json.loads(path.read_text())["rows"]}
    except (ValueError, KeyError):
        return {}


def run(jobs: int, only: str | None = None, force: bool = False, out_dir: Path = DEFAULT_OUT,
        write: bool = True, log=print) -> list[dict]:
    """Compile what the cache lacks, write the report (unless write=False), return every row."""
    # Fusion of multiply-adds stays on (Triton 3.9 warns that its default will change; the GPU default is on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    triton = _triton_parts()[0]
    cache = {} if force else load_cache(out_dir)
    todo, rows, seen = [], [], set()
    for mod, i, case in all_cases(only):
        for major in case.archs:
            key = case_key(case, major)
            if key in seen:  # two launch paths that pick the same compile: check it once
                continue
            seen.add(key)
            if key in cache:
                rows.append(cache[key])
            else:
                todo.append((mod, i, major))
    # Slowest first (as last measured), so the pool does not end on one long compile.
    cost = {(r["module"], r["kernel"], r["config"]): r.get("compile_s", 0) for r in cache.values()}
    todo.sort(key=lambda j: -cost.get(_job_name(j), 3.0))
    log(f"kernels.aot: triton {triton.__version__}, {len(rows) + len(todo)} compiles, {len(rows)} cached, "
        f"{len(todo)} to run on {jobs} process(es)")
    t0 = time.perf_counter()
    if todo:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for n, row in enumerate(pool.map(compile_case, todo), 1):
                rows.append(row)
                if write and n % 100 == 0:  # keep what is done if the run is interrupted
                    _save_json(out_dir, triton.__version__, list(cache.values()) + rows)
                bad = problems(row)
                if bad or n % 50 == 0:
                    log(f"  [{n}/{len(todo)}] {row['arch']} {row['module']}.{row['kernel']} {row['label']} "
                        f"{row['config']}: {'; '.join(bad) or 'ok'}")
    log(f"kernels.aot: compiled {len(todo)} in {time.perf_counter() - t0:.0f} s")
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["arch"], r["label"], r["config"]))
    if write and only is None:
        write_report(rows, out_dir, triton.__version__)
    elif write:  # a partial run only adds to the cache
        _save_json(out_dir, triton.__version__, list(cache.values()) + rows)
    return rows


def _save_json(out_dir: Path, version: str, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    uniq = {r["key"]: r for r in rows}
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps({"triton": version, "rows": list(uniq.values())}, indent=0) + "\n")
    tmp.replace(out_dir / "report.json")


def write_report(rows: list[dict], out_dir: Path, version: str) -> None:
    _save_json(out_dir, version, rows)
    lines = [f"# Ahead-of-time compile report (triton {version})", "",
             "Written by `python -m kernels.aot`; every configuration the launchers and autotuners can pick.",
             "smem in bytes (limit: sm_80 166912, sm_90 232448 per block); spills in bytes (stores/loads);",
             "occupancy: resident warps per SM / 64 (registers, shared memory, warp and block limits).", "",
             "| kernel | case | config | arch | regs | smem | spills | occupancy | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "; ".join(problems(r)) or "ok"
        lines.append(f"| {r['module']}.{r['kernel']} | {r['label']} | {r['config']} | {r['arch']} | {r['regs']} | "
                     f"{r['smem']} | {r['spill_stores']}/{r['spill_loads']} | {r['occupancy']} | {status} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def summary(rows: list[dict]) -> str:
    """Per kernel and arch: compiles, failures, max registers, max shared memory."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((f"{r['module']}.{r['kernel']}", r["arch"]), []).append(r)
    lines = [f"{'kernel':42} {'arch':6} {'configs':>7} {'failing':>7} {'max regs':>8} {'max smem':>9}"]
    for (k, arch), rs in sorted(groups.items()):
        bad = sum(bool(problems(r)) for r in rs)
        lines.append(f"{k:42} {arch:6} {len(rs):7} {bad:7} {max(r['regs'] for r in rs):8} "
                     f"{max(r['smem'] for r in rs):9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--only", help="compile only cases whose 'module.kernel label config' contains this")
    ap.add_argument("--force", action="store_true", help="ignore the cached report, recompile everything")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    ap.add_argument("--no-write", action="store_true", help="check only, leave the report as it is")
    a = ap.parse_args(argv)
    try:
        rows = run(a.jobs, a.only, a.force, a.out, write=not a.no_write)
    except Unsupported as e:
        print(e, file=sys.stderr)
        return 2
    print(summary(rows))
    bad = [r for r in rows if problems(r)]
    for r in bad:
        print(f"FAIL {r['arch']} {r['module']}.{r['kernel']} {r['label']} {r['config']}: {'; '.join(problems(r))}")
    print(f"kernels.aot: {len(rows) - len(bad)}/{len(rows)} configurations compile, fit shared memory, spill nothing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
