"""Multi-LoRA serving: decode tokens/s with rows of different adapters mixed in one forward vs scheduled apart.

    python -m benchmarks.bench_serve_lora [--preset tiny] [--context 2048] [--rows 8] [--adapters 2] [--rank 8]
                                          [--targets q,k,v,o,gate,up,down] [--prompt-tokens 64] [--steps 16]
                                          [--rounds 8] [--threads N] [--compile] [--forms]

No HTTP: engines (`llm.serve.engine.Engine`, the server's step) over one random model of the preset and
--adapters random LoRA adapters on it (rank --rank on --targets, random non-zero B), side by side in this process:

  mixed     --lora as served: the step's rows of every adapter in one forward (llm/multi_lora.py)
  apart     the same stacked model, one forward per adapter in each step (the schedule before mixing)
  base      no adapters at all (the floor: what the LoRA products and the mask cost on top)
  compiled  (--compile) mixed through the captured decode step (`llm serve --compile --lora`)

Each round: --rows fresh greedy sequences of --prompt-tokens random tokens, row i on adapter i mod --adapters,
prefilled (not timed), then --steps decode steps timed per engine, the engines' order rotating between rounds.
tokens/s = rows x steps / time; a round's ratio pairs mixed with apart in that round; the printed ratio is the
median over rounds, with the range. The tokenizer's end-of-text id is hidden so no row ends early.

--forms: before that, the per-row LoRA product alone (one projection, n_embd -> 3 n_embd, every adapter at
--rank, rows cycling over base and the adapters) in the three forms considered for llm/multi_lora.py: a mask
over all adapters' columns (what it does), a per-row gather of A and B + bmm (Punica's BGMV in torch), and a
loop over the adapters present (index_select + index_add).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from benchmarks.bench_serve import _NoEnd, build_model
from benchmarks.common import device_name, write_results
from llm import checkpoint as ck
from llm import lora
from llm.generate import SamplingParams
from llm.loading import adapter_on_shared_base
from llm.model import Transformer
from llm.serve.engine import Engine, Seq


def make_adapters(model: Transformer, tok, n: int, rank: int, targets: str, folder: Path) -> dict[str, Transformer]:
    """n random LoRA adapters saved under folder and loaded over `model`'s own weights, as `llm serve --lora`."""
    out = {}
    for k in range(n):
        m = copy.deepcopy(model)  # a copy to put the adapter on and save it from
        cfg = lora.LoRAConfig(rank, 2.0 * rank, 0.0, targets)
        lora.apply_lora(m, cfg)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in lora.adapter_tensors(m).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        d = ck.save(folder / f"a{k}", "ckpt-1", m, tok, None, None, None, lora.adapter_tensors(m),
                    weights_file=lora.ADAPTER_FILE, json_files={
                        lora.ADAPTER_CONFIG: lora.adapter_config(cfg, m, None, tok.n_vocab, [])})
        out[f"a{k}"] = adapter_on_shared_base(model, d)
    return out


def forms(C: int, rank: int, n: int, reps: int = 200) -> list[dict]:
    """Per-row LoRA product of one (C -> 3C) projection in three forms (and the base product alone) at T = 8 and 256
    rows -> one row per (rows, form): {rows, C, form, us}."""
    out = []
    for T in (8, 256):
        out += _forms_at(T, C, rank, n, reps)
        print(f"forms, {T} rows, C {C} -> {3 * C}, {n} adapters of rank {rank}: " + ", ".join(
            f"{r['form']} {r['us']:.0f} us" for r in out if r["rows"] == T), flush=True)
    return out


def _forms_at(T: int, C: int, rank: int, n: int, reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(T, 1, C, generator=g), torch.randn(3 * C, C, generator=g)
    idx = torch.arange(T) % (n + 1)  # 0: the base
    A3, B3 = torch.randn(n + 1, rank, C, generator=g), torch.randn(n + 1, 3 * C, rank, generator=g)
    A3[0], B3[0] = 0, 0
    Ad = A3[1:].reshape(n * rank, C).t().contiguous()
    Bd = B3[1:].permute(0, 2, 1).reshape(n * rank, 3 * C).contiguous()
    sc = torch.arange(n + 1, dtype=torch.float32)
    mask = (idx[:, None] == torch.arange(1, n + 1))[:, :, None]

    def base():
        return x @ W.t()

    def masked():  # llm/multi_lora.py
        h = (x.view(T, C) @ Ad).view(T, n, rank) * mask
        return base() + ((h.view(T, n * rank) @ Bd) * sc[idx][:, None]).view(T, 1, -1)

    def gather():  # BGMV: every row's own A and B gathered, then batched products
        h = torch.bmm(x, A3[idx].transpose(1, 2))
        return base() + torch.bmm(h, B3[idx].transpose(1, 2)) * sc[idx][:, None, None]

    def segments():  # the rows of each adapter present, index_select + index_add
        y = base().view(T, -1)
        for a in idx.unique().tolist():
            if a:
                r = (idx == a).nonzero()[:, 0]
                y.index_add_(0, r, (x.view(T, C)[r] @ A3[a].t() @ B3[a].t()) * sc[a])
        return y.view(T, 1, -1)

    want = gather()
    rows = []
    for name, f in (("base", base), ("masked", masked), ("gather_bmm", gather), ("segments", segments)):
        if name != "base":
            torch.testing.assert_close(f(), want, rtol=1e-4, atol=1e-3)
        for _ in range(10):
            f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        rows.append({"rows": T, "C": C, "form": name, "us": (time.perf_counter() - t0) / reps * 1e6})
    return rows


def run(model: Transformer, tok, adapters: dict[str, Transformer], args) -> list[dict]:
    bs, nt = 16, _NoEnd(tok)
    blocks = args.rows * -(-model.cfg.block_size // bs) + 1
    budget = args.rows * args.prompt_tokens
    engines = {"mixed": Engine(model, nt, model.new_pool(blocks, bs), budget, adapters=adapters),
               "apart": Engine(model, nt, model.new_pool(blocks, bs), budget, adapters=adapters, mix_adapters=False),
               "base": Engine(model, nt, model.new_pool(blocks, bs), budget)}
    if args.compile:
        engines["compiled"] = Engine(model, nt, model.new_pool(blocks, bs, scratch=True), budget, adapters=adapters,
                                     compile_batch=args.rows, compile_buckets=[args.rows])
        engines["compiled"].warmup()
        print(engines["compiled"].captured.describe(), flush=True)
    names = list(adapters)
    g = torch.Generator().manual_seed(0)
    tps: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.rounds):
        prompts = torch.randint(0, tok.n_vocab, (args.rows, args.prompt_tokens), generator=g).tolist()
        order = list(engines)
        order = order[r % len(order):] + order[: r % len(order)]
        for name in order:
            e = engines[name]
            seqs = [Seq(p, SamplingParams(0.0), args.steps + 2, seed=0, emit=lambda ev: None,
                        adapter=None if name == "base" else names[i % len(names)]) for i, p in enumerate(prompts)]
            for s in seqs:
                e.start(s)
            while any(s.length < len(s.prompt) for s in seqs):  # prefill (and the first token): not timed
                e.step(seqs)
            f0, c0 = e.forwards, e.captured.steps if e.captured else 0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                e.step(seqs)
            tps[name].append(args.rows * args.steps / (time.perf_counter() - t0))
            assert all(s.finish is None for s in seqs)
            want = args.steps * (len(names) if name == "apart" else 1)
            assert e.forwards - f0 == want, f"{name}: {e.forwards - f0} forwards for {args.steps} steps"
            if e.captured:
                assert e.captured.steps - c0 == args.steps, "a timed step did not take the compiled path"
            for s in seqs:
                e.release(s)
    ratios = [m / a for m, a in zip(tps["mixed"], tps["apart"])]
    rows = []
    for name, v in tps.items():
        rows.append({"engine": name, "rows": args.rows, "adapters": args.adapters, "tok_s": median(v),
                     "vs_apart": median(x / a for x, a in zip(v, tps["apart"])),
                     "provider": f"{args.preset}, context {model.cfg.block_size}, {device_name()}"})
    print(f"{args.rows} rows over {args.adapters} adapters (rank {args.rank}, {args.targets}), {args.steps} decode "
          "steps x {} rounds: ".format(args.rounds)
          + ", ".join(f"{r['engine']} {r['tok_s']:.1f} tok/s" for r in rows)
          + f"; mixed / apart {median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="a model preset, or hf-8x512 (a random Llama, imported)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8, help="concurrent sequences (decode rows per step)")
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per round and engine")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="add the mixed engine through --compile's captured step")
    ap.add_argument("--forms", action="store_true", help="first time the three forms of the per-row product")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = build_model(args.preset, torch.device("cpu"), args.context)
    load = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, load average {load[0]:.2f} (1 min) at start", flush=True)
    if args.forms:
        write_results("serve_lora_forms", forms(model.cfg.n_embd, args.rank, args.adapters), x="rows", y="us",
                      series="form", kind="bars",
                      title=f"Per-row LoRA product of one C -> 3C projection (C = {model.cfg.n_embd}), "
                            f"{args.adapters} adapters of rank {args.rank}",
                      xlabel="decode rows in the step", ylabel="time per call (us)", legend="form")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model, tok, args.adapters, args.rank, args.targets, Path(tmp))
        rows = run(model, tok, adapters, args)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end", flush=True)
    write_results(f"serve_lora_{args.preset}", rows, x="engine", y="tok_s", series="provider",
                  title=f"{args.rows} decode rows over {args.adapters} LoRA adapters (rank {args.rank}), "
                  f"{args.preset}, {torch.get_num_threads()} thread(s), load {load[0]:.1f}", xlabel="engine",
                  ylabel="generated tokens/s", legend="model", kind="bar")


if __name__ == "__main__":
    main()
