"""Fine-tuning benchmarks (CPU or CUDA).

  memory   LoRA (on an fp32 and an int8 base) vs full fine-tuning on a preset (default `small`): frozen base,
           parameter, gradient and AdamW-state bytes, measured on the tensors after one optimizer step
  speed    a LoRA step and a full fine-tuning step at the same batch, side by side (median of --steps)
  quality  base vs fine-tuned on the held-out split of fine-tuning data: answer loss (the masked loss), and the
           share of greedy answers that end with the end-of-turn token

  python benchmarks/bench_finetune.py memory --preset small --lora-rank 16 --lora-targets q,k,v,o,gate,up,down
  python benchmarks/bench_finetune.py speed --preset small --batch-size 2 --block-size 256
  python benchmarks/bench_finetune.py quality --base out/ --lora out-ft/ --dataset stdlib-qa
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from llm import lora
from llm.chat import prompt_ids
from llm.config import DataConfig, ModelConfig, preset
from llm.data import sft
from llm.generate.api import complete
from llm.generate.sampling import SamplingParams
from llm.loading import load_model
from llm.model import Transformer
from llm.quant import dense_numel, make_scheme, quantize_model
from llm.train.distributed import fmt_bytes


def _model(args, use_lora: bool, int8: bool = False) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**(preset(args.preset) | {"block_size": args.block_size, "kernels": "torch"})))
    if int8:  # QLoRA-style: the block weights as int8 codes, frozen
        quantize_model(m, make_scheme("int8"))
    if use_lora:
        lora.apply_lora(m, lora.LoRAConfig(args.lora_rank, 2.0 * args.lora_rank, 0.0, lora.parse_targets(
            args.lora_targets)))
    return m


def _step(model: Transformer, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return time.perf_counter() - t


def _opt(model: Transformer) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def memory(args) -> None:
    rows = {}
    for name, use, int8 in (("full", False, False), ("lora", True, False), ("qlora int8", True, True)):
        m = _model(args, use, int8)
        opt = _opt(m)
        _step(m, opt, torch.randint(0, 1000, (1, 8)))
        rows[name] = dict(params=dense_numel(m), base_bytes=lora.frozen_bytes(m),
                          trainable=sum(p.numel() for p in m.parameters() if p.requires_grad),
                          param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()),
                          grad_bytes=sum(p.grad.numel() * p.grad.element_size() for p in m.parameters()
                                         if p.grad is not None),
                          optim_bytes=sum(v.numel() * v.element_size() for s in opt.state.values()
                                          for v in s.values() if torch.is_tensor(v) and v.dim() > 0))
        del m, opt
    print(f"preset {args.preset}, LoRA r={args.lora_rank} on {args.lora_targets}")
    print("| run | parameters | trainable | frozen base bytes | parameter bytes | gradient bytes | AdamW bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base = r["base_bytes"] if name != "full" else 0
        print(f"| {name} | {r['params']:,} | {r['trainable']:,} | {fmt_bytes(base)} | {fmt_bytes(r['param_bytes'])} | "
              f"{fmt_bytes(r['grad_bytes'])} | {fmt_bytes(r['optim_bytes'])} |")
    f, lo = rows["full"], rows["lora"]
    print(f"LoRA trainable share {100 * lo['trainable'] / lo['params']:.2f}%; gradient + optimizer bytes "
          f"{100 * (lo['grad_bytes'] + lo['optim_bytes']) / (f['grad_bytes'] + f['optim_bytes']):.2f}% of full")
    q = rows["qlora int8"]
    print(f"frozen base: int8 {fmt_bytes(q['base_bytes'])} vs fp32 {fmt_bytes(lo['base_bytes'])} "
          f"({100 * q['base_bytes'] / lo['base_bytes']:.1f}%)")


def speed(args) -> None:
    x = torch.randint(0, 1000, (args.batch_size, args.block_size))
    models = {name: _model(args, use) for name, use in (("full", False), ("lora", True))}
    opts = {n: _opt(m) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for n in models:
        _step(models[n], opts[n], x)  # warm-up
    for _ in range(args.steps):  # interleaved, so load on a shared machine hits both alike
        for n in models:
            times[n].append(_step(models[n], opts[n], x))
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"preset {args.preset}, batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps each, "
          f"threads {torch.get_num_threads()}")
    for n, t in med.items():
        print(f"{n}: median step {t * 1e3:.0f} ms (min {min(times[n]) * 1e3:.0f}, max {max(times[n]) * 1e3:.0f})")
    print(f"LoRA step / full step = {med['lora'] / med['full']:.3f}")


@torch.no_grad()
def _answer_loss(model, path, block_size: int) -> float:
    loader = sft.SFTLoader(path, "val", 1, block_size)
    total, n = 0.0, 0
    for i in range(loader.n):
        a, b = int(loader.offsets[i]), int(loader.offsets[i + 1])
        ids = torch.from_numpy(loader.ids[a:b].astype("int64"))[None]
        keep = torch.from_numpy(loader.mask[a + 1: b].astype(bool))
        y = torch.where(keep, ids[0, 1:], -100)[None]
        k = int(keep.sum())
        total += model(ids[:, :-1], y)[1].item() * k
        n += k
    return total / n


def quality(args) -> None:
    ft, tok, _ = load_model(args.checkpoint or args.base, lora=args.lora)
    base, _, _ = load_model(args.base)
    lora.grow_vocab(base, tok.n_vocab)  # the base scored with the fine-tune's tokens (mean-initialised rows)
    dcfg = DataConfig(dataset=args.dataset, data_dir=args.data_dir)
    path = sft.prepare(dcfg, tok, ft.cfg.block_size, log=lambda *a: None)
    lb, lf = _answer_loss(base, path, ft.cfg.block_size), _answer_loss(ft, path, ft.cfg.block_size)
    held = [m for s, _, m in sft.examples(dcfg) if s == "val"][: args.n_generate]
    prompts = [sft_prompt(tok, m) for m in held]
    comps = complete(ft, tok, prompts, args.max_new_tokens, params=SamplingParams(0.0))  # greedy
    ended = sum(c.finish_reason == "eos" for c in comps)
    print(f"held-out answer loss: base {lb:.4f}, fine-tuned {lf:.4f} ({100 * (1 - lf / lb):.1f}% lower)")
    print(f"greedy answers ending with the end-of-turn token: {ended}/{len(comps)} ({100 * ended / len(comps):.1f}%)")
    for m, c in list(zip(held, comps))[:5]:
        print(f"Q: {m[0]['content']}\nA: {c.text}\n   (reference: {m[1]['content']})")


def sft_prompt(tok, msgs: list[dict]) -> list[int]:
    return prompt_ids(tok, msgs[:-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("memory", "speed", "quality"))
    p.add_argument("--preset", default="small")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--base", help="quality: the base checkpoint")
    p.add_argument("--lora", help="quality: the adapter (LoRA run) to score")
    p.add_argument("--checkpoint", help="quality: a fully fine-tuned checkpoint instead of --lora")
    p.add_argument("--dataset", default=sft.EMBEDDED)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--n-generate", type=int, default=65)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"memory": memory, "speed": speed, "quality": quality}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
