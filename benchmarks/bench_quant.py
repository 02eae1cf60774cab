"""Quality and size of weight-only quantization: perplexity, top-1 agreement, checkpoint bytes.

    python -m benchmarks.bench_quant [--checkpoint DIR] [--max-tokens 32768] [--context 128] [--threads 1]

One model (default: the `make train` checkpoint, out/), the same tokens for every variant: the
validation documents of pystdlib (the files the trainer holds out, by the same hash), cut into
non-overlapping windows. Variants: fp32, bf16 (weights and compute), int8, int4 at group 32/64/128,
int8 / int4 g64 with --embeddings (head and embedding quantized too), and w16 f16 / bf16 (`--weights`: the
block linears and the head in 16 bits, fp32 compute; llm.weights16; a tied head is untied, so its bytes count
twice). Per variant: perplexity,
its change vs fp32, top-1 agreement (fraction of positions whose argmax equals fp32's), and the bytes
of the weights as stored (the tensors of model.safetensors: fp16 scales, the rest as the source) over
the fp32 bytes; the same byte ratio for the `small` preset's shapes. Quantized variants run the ops
the model runs on this device (CPU: long inputs take the reference dequantize + fp32 GEMM).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

from benchmarks.common import device_name, short_name, threads_text, write_results
from llm import quant
from llm.checkpoint import model_tensors
from llm.config import DataConfig, ModelConfig, preset
from llm.data.corpus import _in_val, pystdlib_files, read_text
from llm.loading import load_model
from llm.model import Transformer
from llm.weights16 import to_w16

VARIANTS = [("fp32", None), ("bf16", None), ("int8", ("int8", None, False)), ("int4 g32", ("int4", 32, False)),
            ("int4 g64", ("int4", 64, False)), ("int4 g128", ("int4", 128, False)),
            ("int8 +emb", ("int8", None, True)), ("int4 g64 +emb", ("int4", 64, True)),
            ("w16 f16", "f16"), ("w16 bf16", "bf16")]


def val_tokens(tok, max_tokens: int) -> torch.Tensor:
    """[eot] doc [eot] doc ... over pystdlib's validation files (the trainer's split), at most max_tokens."""
    frac = DataConfig().val_fraction
    ids: list[int] = []
    for f in pystdlib_files():
        if _in_val(str(f), frac):
            ids += [tok.eot_id] + tok.encode(read_text(f))
            if len(ids) >= max_tokens:
                break
    return torch.tensor(ids[:max_tokens])


def stored_bytes(model: torch.nn.Module) -> int:
    state = quant.storage_state(model) if getattr(model, "quantization", None) else None
    return sum(t.numel() * t.element_size() for t in model_tensors(model, state).values())


@torch.no_grad()
def score(model: Transformer, windows: torch.Tensor, batch: int = 8) -> tuple[float, torch.Tensor]:
    """(mean next-token NLL, argmax ids (W, T-1)) over windows (W, T)."""
    nll, n, top = 0.0, 0, []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits, _ = model(w[:, :-1])
        lg = logits.float()
        nll += F.cross_entropy(lg.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
        top.append(lg.argmax(-1))
    return nll / n, torch.cat(top)


def variant(src: str, name: str, spec) -> Transformer:
    if isinstance(spec, str):  # 16-bit weights, fp32 compute
        return to_w16(load_model(src, "cpu", torch.float32)[0], spec)
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    scheme = quant.make_scheme(*spec) if spec else None
    model, _, _ = load_model(src, "cpu", dtype, quantize=scheme)
    return model


def small_ratio(spec) -> float:
    """Stored bytes of the `small` preset quantized with spec, over its fp32 bytes (shapes only)."""
    with torch.device("meta"):
        m = Transformer(ModelConfig(**preset("small")))
    fp32 = sum(t.numel() * 4 for t in m.state_dict().values())
    if isinstance(spec, str):  # 16-bit block linears and head, the rest fp32 (a tied head: the state dict holds
        # it under both names, so the head's entry becomes the 16-bit copy and the embedding's stays fp32)
        lin = sum(mod.weight.numel() for n, mod in m.named_modules()
                  if type(mod) is torch.nn.Linear and (n.startswith("blocks.") or n == "lm_head"))
        return (fp32 - 2 * lin) / fp32
    total = 0
    for n, mod in m.named_modules():
        is_block_lin = n.startswith("blocks.") and type(mod) is torch.nn.Linear
        if is_block_lin or (spec[2] and n in ("lm_head", "tok_emb")):
            N, K = mod.weight.shape
            if spec[0] == "int8" or n == "tok_emb":
                total += N * K + 2 * N
            else:
                total += N * ((K + 1) // 2) + 2 * 2 * N * -(-K // spec[1])
            total += 0 if getattr(mod, "bias", None) is None else N * 4
        elif not list(mod.children()):
            total += sum(p.numel() * 4 for p in mod.parameters(recurse=False))
    return total / fp32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="out", help="checkpoint of ours or a HF dir (unquantized)")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=[n for n, _ in VARIANTS],
                   help=f"which to run (fp32 always: the baseline), of {', '.join(n for n, _ in VARIANTS)}")
    p.add_argument("--name", default="bench_quant")
    args = p.parse_args(argv)
    known = [n for n, _ in VARIANTS]
    if any(v not in known for v in args.variants):
        p.error(f"--variants: choose from {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok, _ = load_model(args.checkpoint, "cpu", torch.float32)
    T = (args.context or base.cfg.block_size) + 1
    ids = val_tokens(tok, args.max_tokens)
    windows = ids[: len(ids) // T * T].view(-1, T)
    print(f"quant quality on {device_name()} (CPU, {threads_text(torch.get_num_threads())}): {args.checkpoint}, "
          f"{windows.numel():,} pystdlib validation tokens in {len(windows)} windows of {T - 1}", flush=True)
    ref_nll, ref_top = score(base, windows)
    fp32_bytes = stored_bytes(base)
    rows = []
    for name, spec in VARIANTS:
        if name != "fp32" and name not in args.variants:
            continue
        model = base if name == "fp32" else variant(args.checkpoint, name, spec)
        nll, top = (ref_nll, ref_top) if name == "fp32" else score(model, windows)
        size = stored_bytes(model) if name != "bf16" else fp32_bytes // 2
        row = dict(variant=name, perplexity=math.exp(nll), ppl_change_pct=100 * (math.exp(nll - ref_nll) - 1),
                   top1_agreement=(top == ref_top).float().mean().item(), bytes=size, bytes_vs_fp32=size / fp32_bytes,
                   small_bytes_vs_fp32=small_ratio(spec) if spec else (1.0 if name == "fp32" else 0.5))
        rows.append(row)
        print(f"{name:14s} ppl {row['perplexity']:8.3f} ({row['ppl_change_pct']:+6.2f}%)  top-1 "
              f"{100 * row['top1_agreement']:6.2f}%  bytes x{row['bytes_vs_fp32']:.3f} (small x"
              f"{row['small_bytes_vs_fp32']:.3f})", flush=True)
    write_results(args.name, rows, x="variant", y="ppl_change_pct", series="variant",
                  title=f"weight-only quantization, {short_name(args.checkpoint)} ({asdict(base.cfg)['n_layer']} "
                  "layers)", xlabel="weights", ylabel="perplexity change vs fp32 (%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
