"""Checkpoint saves under torchrun (gloo on CPU, NCCL on GPUs): how long the training loop is blocked per save,
the bytes each rank writes and each rank's peak memory during the save, for three writers side by side in
the same processes, on an FSDP2-sharded model with AdamW state (one step taken):

  full-gather     today's single file: get_model/optimizer_state_dict(full_state_dict=True, cpu_offload=True)
                  gathers everything onto rank 0, which writes model.safetensors + optimizer.safetensors
  sharded-sync    llm/train/dcp.py's ShardedWriter: every rank writes its own shards (dcp.save), then the commit
  sharded-async   the same with dcp.async_save: blocked = until async_save returns (staging copy + planning);
                  the background write is timed apart, up to its commit

    python -m benchmarks.bench_checkpoint [--preset small] [--ranks 2 4] [--repeats 3]

Peak memory is the rise of the process's resident set (VmRSS, sampled every 2 ms in a thread) over its level
before the save; `state MiB/rank` is this rank's share of model + optimizer state (what the 1/world goal is
measured against). Results: CSV + PNG + markdown under benchmarks/results/<device>/bench_checkpoint.*.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from benchmarks.common import write_results
from llm import checkpoint as ckpt_io
from llm.config import ModelConfig, preset
from llm.model import Transformer
from llm.tokenizer import Tokenizer
from llm.train import dcp as dcp_io
from llm.train import distributed as dd
from llm.train.metrics import device_name

MODES = ("full-gather", "sharded-sync", "sharded-async")


class PeakRSS:
    """The highest VmRSS of this process while the context is open, minus its value at entry (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def rise(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _setup(name: str, d: dd.Dist) -> tuple[Transformer, torch.optim.Optimizer, int]:
    """An FSDP2-sharded `name` model with AdamW state after one step on a (1, 64) batch; (model, opt, state bytes)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**(preset(name) | {"kernels": "torch"}))
    model = Transformer(cfg).to(d.device)
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (1, 64), device=d.device)
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    local += [v.to_local() if hasattr(v, "to_local") else v for st in opt.state.values() for v in st.values()
              if torch.is_tensor(v)]
    return model, opt, sum(t.numel() * t.element_size() for t in local)


def _save(mode: str, root: Path, name: str, model, opt, tok: Tokenizer, d: dd.Dist,
          writer: dcp_io.ShardedWriter) -> tuple[float, float, int]:
    """One save: (seconds the caller was blocked, seconds until it was complete, bytes this rank wrote)."""
    t0 = time.perf_counter()
    if mode == "full-gather":
        msd, osd = dd.full_state(model, opt, fsdp=True)
        if d.main:
            ckpt_io.save(root, name, model, tok, {}, osd, {"step": 1}, msd)
        dd.barrier(d)
        t = time.perf_counter() - t0
        files = [root / name / ckpt_io.MODEL_FILE, root / name / ckpt_io.OPTIM_FILE] if d.main else []
        return t, t, sum(f.stat().st_size for f in files)
    writer.asynchronous = mode == "sharded-async"
    writer.save(name, model, opt, tok, {}, {"step": 1}, {"rank": d.rank}, False, 0)
    blocked = time.perf_counter() - t0
    writer.commit()
    done = time.perf_counter() - t0
    mine = (root / name / ckpt_io.SHARD_DIR).glob(f"shard-{d.rank + 1:05d}-*")
    return blocked, done, sum(f.stat().st_size for f in mine)


def worker(args: argparse.Namespace) -> None:
    """One rank: every mode `repeats` times; rank 0 writes the rows (the max over ranks) as JSON."""
    torch.set_num_threads(1)
    d = dd.setup("cpu" if not torch.cuda.is_available() else "cuda")
    model, opt, state_bytes = _setup(args.preset, d)
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    root = Path(args.dir)
    writer = dcp_io.ShardedWriter(root, d, asynchronous=True)  # its gloo group serves the async mode
    rows = []
    for rep in range(args.repeats):
        for mode in MODES:
            gc.collect()
            with PeakRSS() as mem:
                blocked, done, nbytes = _save(mode, root, f"ckpt-{rep}-{mode}", model, opt, tok, d, writer)
            per_rank = dd.all_gather_objects((blocked, done, nbytes, mem.rise), d)
            if d.main:
                rows.append({"preset": args.preset, "ranks": d.world, "mode": mode, "repeat": rep,
                             "blocked_s": max(r[0] for r in per_rank), "complete_s": max(r[1] for r in per_rank),
                             "MiB_written_max_rank": max(r[2] for r in per_rank) / 2**20,
                             "MiB_written_total": sum(r[2] for r in per_rank) / 2**20,
                             "state_MiB_per_rank": state_bytes / 2**20,
                             "peak_rss_rise_MiB_max_rank": max(r[3] for r in per_rank) / 2**20,
                             "peak_rss_rise_MiB_rank0": per_rank[0][3] / 2**20})
                shutil.rmtree(root / f"ckpt-{rep}-{mode}", ignore_errors=True)
            dd.barrier(d)
    writer.close()
    if d.main:
        Path(args.json).write_text(json.dumps(rows))
    dd.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model preset (llm/config.py PRESETS)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes, one torchrun launch each")
    p.add_argument("--repeats", type=int, default=3,
                   help="saves per mode and world size: the median is reported, and the first save's blocked time "
                        "apart (an async writer allocates its host buffers then)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows: list[dict] = []
    root = Path(__file__).resolve().parents[1]
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   "-m", "benchmarks.bench_checkpoint", "--worker", "--preset", args.preset, "--repeats",
                   str(args.repeats), "--dir", str(Path(tmp) / "ckpts"), "--json", str(out)]
            print(f"{world} ranks: {' '.join(cmd[2:])}", flush=True)
            r = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if r.returncode:
                print(f"error: the {world}-rank launch failed (exit {r.returncode})", file=sys.stderr)
                return 1
            rows += json.loads(out.read_text())
    summary = []
    for world in args.ranks:
        sync = None
        for mode in MODES:
            rs = sorted((r for r in rows if r["ranks"] == world and r["mode"] == mode), key=lambda r: r["blocked_s"])
            med = rs[len(rs) // 2]
            sync = med["complete_s"] if mode == "sharded-sync" else sync
            first = next(r for r in rows if r["ranks"] == world and r["mode"] == mode and r["repeat"] == 0)
            summary.append({**{k: v for k, v in med.items() if k != "repeat"}, "repeats": len(rs),
                            "first_blocked_s": first["blocked_s"]})
        for s in summary[-3:]:
            s["blocked_vs_sharded_sync"] = s["blocked_s"] / sync
    print(f"device: {device_name(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))}, "
          f"{os.cpu_count()} CPU cores")
    write_results("bench_checkpoint", summary, x="ranks", y="blocked_s", series="mode",
                  title=f"checkpoint save, {args.preset}: seconds the loop is blocked per save", kind="bars",
                  xlabel="ranks (processes)", ylabel="training loop blocked per save (s)", legend="checkpoint mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
