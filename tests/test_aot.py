"""The ahead-of-time compile check (kernels/aot.py): every kernel configuration compiles for sm_80 and
sm_90 with no spilled register and shared memory within the limit; plus its CPU-side logic.

The check runs in a subprocess without TRITON_INTERPRET (conftest sets it, and the interpreter replaces
@triton.jit functions). It starts from the committed report (benchmarks/results/aot/report.json,
copied to a temporary directory): only configurations whose key (kernel source, triton version,
arch, signature, constexprs, warps, stages) is not in it are compiled, so a changed kernel is always
recompiled and checked; a different triton version recompiles everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import aot
from kernels.attention_tiles import smem_estimate

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "aot" / "report.json"


def test_every_configuration_compiles_without_spills(tmp_path):
    if REPORT.exists():
        shutil.copy(REPORT, tmp_path / "report.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip().splitlines()[-1])  # this triton cannot compile offline
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0, "\n".join(fails[:40]) or proc.stdout[-3000:] + proc.stderr[-3000:]


def test_parse_ptxas_reads_registers_and_spills():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert aot.parse_ptxas(log) == dict(regs=255, spill_stores=24, spill_loads=16)
    with pytest.raises(ValueError, match="no register count"):
        aot.parse_ptxas("garbage")


def _row(**kw):
    row = dict(arch="sm_90", error="", spill_stores=0, spill_loads=0, smem=1024)
    row.update(kw)
    return row


def test_problems_flags_spills_shared_memory_and_errors():
    assert aot.problems(_row()) == []
    assert "spills" in aot.problems(_row(spill_stores=8))[0]
    assert "spills" in aot.problems(_row(spill_loads=4))[0]
    assert aot.problems(_row(smem=227 * 1024)) == []
    assert "shared memory" in aot.problems(_row(smem=227 * 1024 + 1))[0]
    assert "shared memory" in aot.problems(_row(arch="sm_80", smem=164 * 1024))[0]
    assert aot.problems(_row(error="CompilationError: bad dot")) == ["CompilationError: bad dot"]


def test_occupancy_estimate():
    # 128 regs x 256 threads = half the register file: 2 blocks of 8 warps, 16 of 64 warps.
    assert aot.occupancy(128, 1024, 8, 9) == 0.25
    assert aot.occupancy(255, 1024, 4, 9) == 0.125  # rounded up to 256 regs: 2 blocks of 4 warps
    assert aot.occupancy(32, 200 * 1024, 4, 9) == 0.062  # one block fits the shared memory
    assert aot.occupancy(32, 0, 1, 8) == 0.5  # the 32-block limit


def test_report_covers_every_kernel_and_matches_its_summary():
    data = json.loads(REPORT.read_text())
    kernels = {(r["module"], r["kernel"]) for r in data["rows"]}
    for mod in aot.MODULES:
        src = (ROOT / "kernels" / f"{mod}.py").read_text()
        defined = {line.split("(")[0][4:] for line in src.splitlines()
                   if line.startswith("def _") and line.split("(")[0].endswith("_kernel")}
        assert defined, mod
        assert defined <= {k for m, k in kernels if m == mod}, f"{mod}: kernels missing from the report"
    assert {r["arch"] for r in data["rows"]} == {"sm_80", "sm_90"}


def test_attention_smem_estimate_bounds_the_compiled_shared_memory():
    """The launcher prunes tiles by this estimate on GPUs with less shared memory than sm_80/sm_90."""
    rows = [r for r in json.loads(REPORT.read_text())["rows"]
            if r["module"] == "attention" and "BLOCK_N" in r["config"] and not r["error"]]
    assert rows
    kinds = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}
    for r in rows:
        c = dict(x.split("=") for x in r["config"].split() if "=" in x)
        w, s = (int(x[1:]) for x in r["config"].split()[-2:])
        elem = 4 if r["label"].startswith("fp32") else 2
        tile = (int(c["BLOCK_M"]), int(c["BLOCK_N"]), w, s)
        est = smem_estimate(kinds[r["kernel"]], tile, int(c["BLOCK_D"]), elem)
        assert est >= r["smem"], f"{r['kernel']} {r['label']} {r['config']} {r['arch']}: {est} < {r['smem']}"


_KEY_PROBE = """
from kernels import aot, common, rmsnorm
JIT = aot._triton_parts()[4]
case = next(c for c in rmsnorm.aot_cases() if c.kernel is rmsnorm._rms_norm_fwd_kernel)
before, h = aot.case_key(case, 9), aot.source_hash(case.kernel, JIT)
assert aot.case_key(case, 9) == before and aot.case_key(case, 8) != before
common.rne_cast._unsafe_update_src(common.rne_cast.src.replace("0x7FFF", "0x7FFE"))  # a helper it calls
assert aot.source_hash(case.kernel, JIT) != h and aot.case_key(case, 9) != before
print("keys ok")
"""


def test_a_changed_kernel_source_changes_its_cache_key():
    """The committed report is only a cache: a kernel (or a @triton.jit helper it calls) whose source
    changes gets a new key, so the check recompiles it instead of trusting the old row. Runs without
    TRITON_INTERPRET (the interpreter replaces @triton.jit functions), like the check itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _KEY_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if "kernels.aot:" in proc.stderr and "cannot compile offline" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and "keys ok" in proc.stdout, proc.stderr[-3000:]
