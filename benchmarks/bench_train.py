"""End-to-end training step: tokens/s, MFU and peak memory per preset, our kernels vs reference ops.

    python -m benchmarks.bench_train [--presets tiny small 1b] [--providers ...] [--steps 10] [--warmup 3]
                                     [--batch-size B] [--block-size T] [--activation-checkpointing]

One optimizer step = forward + backward + AdamW (fused on CUDA) on random tokens, bf16 autocast on
CUDA and fp32 on CPU, the way llm/train/trainer.py runs it. Providers, side by side in one run:
  triton            the model on our Triton kernels (ModelConfig.kernels="triton"), eager
  triton+compile    the same under torch.compile
  torch             the same model on the PyTorch reference ops (kernels="torch"), eager
  torch+compile     the reference ops under torch.compile
Without CUDA the Triton providers are skipped (they would run in the interpreter) and the default
preset is tiny. MFU = flops_per_token * tokens/s / peak (llm.metrics: 6 N + 12 L H D T per token,
dense bf16 datasheet peak of the detected GPU; unknown on CPU). Peak memory is
torch.cuda.max_memory_allocated() on CUDA and the process's peak RSS on CPU (a high-water mark
over the whole run, so only its growth between providers is meaningful).
The micro-batch defaults to the largest power of two (<= 64; <= 8 on CPU) that the planner in
llm/distributed.py estimates to fit. Results: CSV + PNG + markdown under benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time

import torch

from benchmarks.common import write_results
from llm.config import ModelConfig, preset
from llm.model import Transformer
from llm.train import distributed as dd
from llm.train.metrics import device_name, peak_flops

PROVIDERS = ("triton", "triton+compile", "torch", "torch+compile")


def pick_batch(cfg: ModelConfig, n_params: int, device: torch.device, amp: bool, triton: bool, ckpt: bool) -> int:
    """Largest power of two <= 64 (<= 8 on CPU, to keep the run short) that the planner estimates to fit."""
    budget = dd.memory_budget(device)
    for b in (64, 32, 16, 8, 4, 2, 1) if device.type == "cuda" else (8, 4, 2, 1):
        fixed, act = dd.memory_estimate(cfg, n_params, b, amp=amp, flash=triton, fused_ce=triton, act_ckpt=ckpt)
        if budget is None or fixed + act <= budget:
            return b
    return 1


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(name: str, provider: str, args, device: torch.device) -> dict:
    """Time `args.steps` training steps of preset `name` on `provider`; returns one result row."""
    kw = preset(name)
    kw.setdefault("vocab_size", 4096)
    if args.block_size:
        kw["block_size"] = args.block_size
    triton = provider.startswith("triton")
    cfg = ModelConfig(**kw, kernels="triton" if triton else "torch")
    amp = device.type == "cuda"
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    n_params = model.num_params()
    B = args.batch_size or pick_batch(cfg, n_params, device, amp, triton, args.activation_checkpointing)
    T = cfg.block_size
    dd.wrap(model, dd.Dist(device=device), False, args.activation_checkpointing, False)
    fwd = torch.compile(model) if provider.endswith("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]
    row = {"preset": name, "provider": provider, "params_M": round(n_params / 1e6, 1), "batch": B, "block": T}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            _, loss = fwd(inp, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    t1 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t1) / args.steps
    tok_s = B * T / dt
    peak = peak_flops(device, torch.bfloat16 if amp else torch.float32)
    row.update(ms_per_step=dt * 1e3, tokens_per_s=tok_s, mfu=model.flops_per_token() * tok_s / peak if peak else None,
               peak_mem_mib=peak_mib(device), warmup_s=t1 - t0)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None, help="presets to run (default: small 1b on CUDA, tiny on CPU)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: the planner's pick)")
    p.add_argument("--block-size", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.presets = args.presets or (["small", "1b"] if cuda else ["tiny"])
    args.steps = args.steps or (10 if cuda else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        skipped = [q for q in args.providers if q.startswith("triton")]
        args.providers = [q for q in args.providers if not q.startswith("triton")]
        if skipped:
            print(f"no CUDA: skipping {', '.join(skipped)} (Triton kernels would run in the interpreter); "
                  f"timing the reference ops on {torch.get_num_threads()} CPU thread(s)")
    print(f"device: {device_name(device)}; peak for MFU: "
          f"{peak_flops(device) / 1e12 if peak_flops(device) else 'unknown'} TFLOP/s")
    rows = []
    for name in args.presets:
        for provider in args.providers:
            try:
                row = run(name, provider, args, device)
            except Exception as e:  # one provider failing (compile toolchain, OOM) must not hide the others
                print(f"{name} / {provider} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "unknown"
            print(f"{name:>6} {provider:>15}: {row['tokens_per_s']:>12,.0f} tok/s  {row['ms_per_step']:9.1f} ms/step  "
                  f"MFU {mfu}  peak memory {row['peak_mem_mib']:,.0f} MiB", flush=True)
    if not rows:
        return 1
    for r in rows:  # speed relative to the reference ops under torch.compile, same preset
        same = [b for b in rows if b["preset"] == r["preset"] and b["provider"] == "torch+compile"]
        base = same[0]["tokens_per_s"] if same else None
        r["vs_torch_compile"] = r["tokens_per_s"] / base if base else None
    write_results("bench_train", rows, x="preset", y="tokens_per_s", title="training step throughput",
                  ylabel="training throughput (tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
