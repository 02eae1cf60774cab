"""Fine-tuning benchmarks (CPU or CUDA).

  memory   full fine-tuning, LoRA (on an fp32 and an int8 base), prefix tuning and bottleneck adapters (Houlsby,
           Pfeiffer) on a preset (default `small`), the PEFT methods at about LoRA's trainable budget: trainable
           parameters (a prefix: while training, through its MLP, and as saved), frozen base, parameter, gradient
           and AdamW-state bytes, measured on the tensors after one optimizer step
  speed    a LoRA step and a full fine-tuning step at the same batch, side by side (median of --steps)
  pack     examples/s of padded rows (one example each) vs --sft-pack rows (several, document-masked)
  quality  base vs fine-tuned on the held-out split of fine-tuning data: answer loss (the masked loss), and the
           share of greedy answers that end with the end-of-turn token
  compare  LoRA, prefix tuning and adapters fine-tuned from --base at an equal trainable-parameter budget (LoRA's
           at --lora-rank), --seeds seeds each: held-out answer loss and end-of-turn rate, mean and spread
  ttft     time to first token of --base alone and with a prefix of --prefix-tokens rows (interleaved, median), in
           the sampler and through the server's engine, and of the base given P more prompt tokens instead

  python benchmarks/bench_finetune.py memory --preset small --lora-rank 16 --lora-targets q,k,v,o,gate,up,down
  python benchmarks/bench_finetune.py speed --preset small --batch-size 2 --block-size 256
  python benchmarks/bench_finetune.py quality --base out/ --lora out-ft/ --dataset stdlib-qa
  python benchmarks/bench_finetune.py compare --base out/ --lora-rank 8 --steps 100 --seeds 3
  python benchmarks/bench_finetune.py ttft --base out/ --prefix-tokens 16
  python benchmarks/bench_finetune.py pack --preset tiny --block-size 256 --batch-size 8 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, short_name
from llm import bottleneck, lora, peft, prefix
from llm.chat import chat_tokenizer, prompt_ids
from llm.config import DataConfig, ModelConfig, preset
from llm.data import sft
from llm.data.corpus import pystdlib_files
from llm.generate.api import complete
from llm.generate.sampling import SamplingParams
from llm.loading import load_model
from llm.model import Transformer
from llm.quant import dense_numel, make_scheme, quantize_model
from llm.tokenizer import Tokenizer
from llm.train.distributed import fmt_bytes


def _lora(args) -> lora.LoRAConfig:
    return lora.LoRAConfig(args.lora_rank, 2.0 * args.lora_rank, 0.0, lora.parse_targets(args.lora_targets))


def _model(args, use_lora: bool | peft.Config, int8: bool = False) -> Transformer:
    """The preset's model, frozen with LoRA (use_lora True) or another method's config applied."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**(preset(args.preset) | {"block_size": args.block_size, "kernels": "torch"})))
    if int8:  # QLoRA-style: the block weights as int8 codes, frozen
        quantize_model(m, make_scheme("int8"))
    if use_lora:
        peft.apply(m, _lora(args) if use_lora is True else use_lora, vocab=m.cfg.vocab_size)
    return m


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def at_budget(base: Transformer, budget: int, prefix_tokens: int) -> dict[str, peft.Config]:
    """Prefix (its MLP's hidden width) and adapter (bottleneck width) configs whose trainable parameters come
    closest to `budget`: both counts are linear in the width, so two probes fix the line."""
    def count(cfg) -> int:
        return _trainable(peft.apply(copy.deepcopy(base), cfg, vocab=base.cfg.vocab_size))

    out = {}
    for name, make in (("prefix", lambda w: prefix.PrefixConfig(prefix_tokens, w)),
                       ("adapter", lambda w: bottleneck.AdapterConfig(w, "houlsby")),
                       ("adapter-pfeiffer", lambda w: bottleneck.AdapterConfig(w, "pfeiffer"))):
        c1, c2 = count(make(1)), count(make(2))
        out[name] = make(max(1, round(1 + (budget - c1) / (c2 - c1))))
    return out


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
    budget = _trainable(_model(args, True))
    others = at_budget(_model(args, False), budget, args.prefix_tokens)
    runs = [("full", False, False), ("lora", True, False), ("qlora int8", True, True),
            *((n, c, False) for n, c in others.items())]
    for name, use, int8 in runs:
        m = _model(args, use, int8)
        opt = _opt(m)
        _step(m, opt, torch.randint(0, 1000, (1, 8)))
        saved = sum(t.numel() for k, t in peft.saved_tensors(m).items() if not k.startswith(prefix.REPARAM))
        rows[name] = dict(params=dense_numel(m), base_bytes=peft.frozen_bytes(m), saved=saved if use else 0,
                          trainable=sum(p.numel() for p in m.parameters() if p.requires_grad),
                          param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()),
                          grad_bytes=sum(p.grad.numel() * p.grad.element_size() for p in m.parameters()
                                         if p.grad is not None),
                          optim_bytes=sum(v.numel() * v.element_size() for s in opt.state.values()
                                          for v in s.values() if torch.is_tensor(v) and v.dim() > 0))
        del m, opt
    print(f"preset {args.preset}, LoRA r={args.lora_rank} on {args.lora_targets}; at that budget: "
          + ", ".join(f"{n} {_describe(c)}" for n, c in others.items()))
    print("| run | parameters | trainable | saved | frozen base bytes | parameter bytes | gradient bytes | "
          "AdamW bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base = r["base_bytes"] if name != "full" else 0
        print(f"| {name} | {r['params']:,} | {r['trainable']:,} | {r['saved']:,} | {fmt_bytes(base)} | "
              f"{fmt_bytes(r['param_bytes'])} | {fmt_bytes(r['grad_bytes'])} | {fmt_bytes(r['optim_bytes'])} |")
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


def pack(args) -> None:
    """Examples per second of full fine-tuning steps on stdlib-qa: one padded example per row vs --sft-pack rows
    (several examples per block_size row, document-masked), same rows per step, interleaved. Both start from one
    model and see the same kind of examples; the per-example losses of the two layouts are equal (test_sft_pack)."""
    texts = [f.read_text(errors="replace") for f in pystdlib_files()[:40]]
    tok = chat_tokenizer(Tokenizer.train(texts, args.vocab))[0]
    path = sft.prepare(DataConfig(dataset=sft.EMBEDDED, data_dir=args.data_dir), tok, args.block_size, print)
    cfg = ModelConfig(**(preset(args.preset) | {"block_size": args.block_size, "kernels": "torch",
                                                "vocab_size": tok.n_vocab}))
    runs = {}
    for name, packed in (("padded", False), ("packed", True)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        loader = sft.SFTLoader(path, "train", args.batch_size, args.block_size, seed=0, pack=packed)
        runs[name] = dict(model=model, opt=_opt(model), loader=loader, t=0.0, examples=0, tokens=0, losses=[])
    for i in range(args.steps + 1):  # interleaved, step 0 a warm-up
        for r in runs.values():
            b = r["loader"].batch(i)
            kw = {"segments": b.segments} if isinstance(b, sft.PackedBatch) else {}
            t = time.perf_counter()
            loss = r["model"](b[0], b[1], **kw)[1]
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=False)
            if i:
                y = b[1]
                seg = kw.get("segments", torch.arange(len(y))[:, None].expand_as(y))
                r["t"] += time.perf_counter() - t
                r["examples"] += len({(int(a), int(s)) for a, s in (y != -100).nonzero().tolist()
                                      for s in [seg[a, s]]})
                r["tokens"] += int((y != -100).sum())
                r["losses"].append(loss.item())
    print(f"stdlib-qa, preset {args.preset}, {args.batch_size} rows x {args.block_size} tokens, {args.steps} steps "
          f"each, threads {torch.get_num_threads()}, {device_name()}")
    for name, r in runs.items():
        print(f"{name}: {r['examples'] / r['t']:.1f} examples/s, {r['tokens'] / r['t']:.0f} answer tokens/s, "
              f"{r['examples'] / args.steps:.1f} examples/step, mean loss {statistics.mean(r['losses']):.3f}")
    e = {n: r["examples"] / r["t"] for n, r in runs.items()}
    print(f"packed / padded examples per second = {e['packed'] / e['padded']:.2f}x")


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
    path = sft.prepare(dcfg, tok, ft.n_positions, log=lambda *a: None)
    lb, lf = _answer_loss(base, path, ft.n_positions), _answer_loss(ft, path, ft.n_positions)
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


def _describe(cfg: peft.Config) -> str:
    if isinstance(cfg, prefix.PrefixConfig):
        return f"P={cfg.tokens}, MLP hidden {cfg.hidden}"
    if isinstance(cfg, bottleneck.AdapterConfig):
        return f"dim {cfg.dim} ({cfg.placement})"
    return f"r={cfg.rank} on {','.join(cfg.targets)}"


def _flags(cfg: peft.Config) -> list[str]:
    if isinstance(cfg, prefix.PrefixConfig):
        return ["--peft", "prefix", "--prefix-tokens", str(cfg.tokens), "--prefix-hidden", str(cfg.hidden)]
    if isinstance(cfg, bottleneck.AdapterConfig):
        return ["--peft", "adapter", "--adapter-dim", str(cfg.dim), "--adapter-placement", cfg.placement]
    return ["--peft", "lora", "--lora-rank", str(cfg.rank), "--lora-alpha", str(cfg.alpha), "--lora-targets",
            ",".join(cfg.targets)]


def _eot_rate(model, tok, held: list[list[dict]], max_new_tokens: int) -> float:
    comps = complete(model, tok, [sft_prompt(tok, m) for m in held], max_new_tokens, params=SamplingParams(0.0))
    return sum(c.finish_reason == "eos" for c in comps) / len(comps)


def _spread(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}} ({', '.join(f'{x:{fmt}}' for x in xs)})"


def compare(args) -> None:
    """Each method from --base at LoRA's trainable budget, --seeds seeds, --steps steps, through train.py; every
    model scored on the same held-out examples (prepared at the shortest context: block_size - prefix rows)."""
    import contextlib
    import io

    from llm.train.cli import main as train_main

    base, _, _ = load_model(args.base)
    lcfg = _lora(args)
    budget = _trainable(peft.apply(copy.deepcopy(base), lcfg))
    cfgs = {"lora": lcfg, **at_budget(base, budget, args.prefix_tokens)}
    cfgs = {m: cfgs[m] for m in args.methods.split(",")}
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ft-"))
    block = base.cfg.block_size - args.prefix_tokens
    res: dict[str, list[tuple[float, float, float]]] = {m: [] for m in cfgs}
    path = held = None
    for seed in range(args.seeds):
        for m, cfg in cfgs.items():
            out = work / f"{m}-s{seed}"
            argv = ["--init-from", str(args.base), "--dataset", args.dataset, "--data-dir", str(work / "data"),
                    "--out-dir", str(out), "--max-steps", str(args.steps), "--seed", str(1000 + seed),
                    "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(args.steps // 10),
                    "--eval-interval", str(args.steps), "--save-interval", str(args.steps), "--health-interval", "0",
                    "--log-interval", str(args.steps), "--dropout", "0.0", *_flags(cfg)]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = train_main(argv)
            if rc != 0:
                raise SystemExit(f"error: the {m} run failed (rc {rc}): python train.py {' '.join(argv)}")
            dt = time.perf_counter() - t0
            ft, tok, _ = load_model(out)
            if path is None:
                dcfg = DataConfig(dataset=args.dataset, data_dir=str(work / "eval-data"))
                path = sft.prepare(dcfg, tok, block, log=lambda *a: None)
                held = [msgs for s, _, msgs in sft.examples(dcfg) if s == "val"][: args.n_generate]
            loss, eot = _answer_loss(ft, path, block), _eot_rate(ft, tok, held, args.max_new_tokens)
            res[m].append((loss, eot, dt))
            print(f"{m} seed {seed}: answer loss {loss:.4f}, end-of-turn {100 * eot:.1f}%, {dt:.0f} s", flush=True)
    lora.grow_vocab(base, tok.n_vocab)  # the base scored with the fine-tunes' tokens (mean-initialised rows)
    lb = _answer_loss(base, path, block)
    print(f"base {short_name(args.base)}: held-out answer loss {lb:.4f}; {args.steps} steps x batch "
          f"{args.batch_size}, lr "
          f"{args.lr:g}, {args.seeds} seeds; threads {torch.get_num_threads()}")
    print("| method | config | trainable | saved | answer loss (mean ± sd, per seed) | end-of-turn % | s/run |")
    print("|---|---|---|---|---|---|---|")
    for m, cfg in cfgs.items():
        model = peft.apply(copy.deepcopy(base), cfg, vocab=base.cfg.vocab_size)
        saved = sum(t.numel() for k, t in peft.saved_tensors(model).items() if not k.startswith(prefix.REPARAM))
        r = res[m]
        print(f"| {m} | {_describe(cfg)} | {_trainable(model):,} | {saved:,} | {_spread([x[0] for x in r], '.4f')} | "
              f"{_spread([100 * x[1] for x in r], '.1f')} | {statistics.mean(x[2] for x in r):.0f} |")


@torch.no_grad()
def ttft(args) -> None:
    """Time to first token of one prompt (prefill + the first token), every variant interleaved in each round so
    machine load hits them alike, medians and p20/p80 over --repeats rounds:
      sample base          the base through `complete`'s path (new_cache, prefill, first token)
      sample prefix        the base with a prefix of P rows, pre-filled in its cache (sample.py --peft)
      sample base +P       the base with P more prompt tokens: what spending the prefix as prompt would cost
      serve base / prefix  one request through the server's engine (paged pool, prefix cache off), the prefix in
                           its shared blocks
    The load average (os.getloadavg) is printed before and after."""
    import os

    from llm.serve.engine import Engine, Seq

    base, tok, _ = load_model(args.base)
    pre = peft.apply(copy.deepcopy(base), prefix.PrefixConfig(args.prefix_tokens, 0), vocab=tok.n_vocab, train=False)
    P = args.prefix_tokens
    text = tok.encode("def read_config(path):\n    \"\"\"Read the settings file and return a dict.\"\"\"\n" * 8)
    ids = text[: args.prompt_tokens]
    longer = text[: args.prompt_tokens + P]
    if len(longer) < args.prompt_tokens + P or args.prompt_tokens + P > base.cfg.block_size:
        raise SystemExit(f"error: --prompt-tokens {args.prompt_tokens} + --prefix-tokens {P} must fit the context "
                         f"{base.cfg.block_size}")

    def sampler(m, x):
        def run():
            t = torch.tensor([x])
            cache = m.new_cache(1, len(x) + 1)
            logits, _ = m(t, cache=cache, logits_at=torch.tensor([len(x) - 1]))
            m(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
        return run

    def server(m):
        eng = Engine(m, tok, m.new_pool(2 * base.cfg.block_size // 16 + 2, 16), max_step_tokens=256,
                     prefix_cache=False)

        def run():
            s = Seq(prompt=list(ids), params=SamplingParams(0.0), max_tokens=2, seed=0, emit=lambda ev: None)
            eng.start(s)
            while not s.out and s.finish is None:  # the first token
                eng.step([s])
            eng.release(s)
        return run

    cases = {"sample base": sampler(base, ids), "sample prefix": sampler(pre, ids),
             "sample base +P": sampler(base, longer), "serve base": server(base), "serve prefix": server(pre)}
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {n: [] for n in cases}
    for i in range(args.repeats + 1):
        for name, run in cases.items():
            t = time.perf_counter()
            run()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    load1 = os.getloadavg()
    q = {n: statistics.quantiles(t, n=10) for n, t in times.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{short_name(args.base)}: prompt {len(ids)} tokens, prefix {P} rows, {args.repeats} interleaved repeats, "
          f"threads "
          f"{torch.get_num_threads()}, {device_name()}; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.1f}' for x in load0)}, after {'/'.join(f'{x:.1f}' for x in load1)}")
    print("| case | TTFT median ms | p20 | p80 | / base (same path) |")
    print("|---|---|---|---|---|")
    for n in times:
        ref = med["serve base" if n.startswith("serve") else "sample base"]
        print(f"| {n} | {med[n] * 1e3:.2f} | {q[n][1] * 1e3:.2f} | {q[n][7] * 1e3:.2f} | {med[n] / ref:.3f} |")
    # paired per round: the ratio of each round's times, so slow spells of the machine cancel out
    for a, b in (("sample prefix", "sample base"), ("serve prefix", "serve base"), ("sample base +P", "sample base")):
        r = sorted(x / y for x, y in zip(times[a], times[b]))
        rq = statistics.quantiles(r, n=10)
        print(f"{a} / {b}, paired per round: median {statistics.median(r):.3f} (p20 {rq[1]:.3f}, p80 {rq[7]:.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("memory", "speed", "quality", "compare", "ttft", "pack"))
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
    p.add_argument("--vocab", type=int, default=1024, help="pack: BPE vocabulary trained for the benchmark")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prefix-tokens", type=int, default=16, help="memory, compare, ttft: the prefix's rows")
    p.add_argument("--methods", default="lora,prefix,adapter",
                   help="compare: from lora, prefix, adapter (Houlsby), adapter-pfeiffer")
    p.add_argument("--seeds", type=int, default=3, help="compare: runs per method")
    p.add_argument("--lr", type=float, default=3e-3, help="compare: peak learning rate of every run")
    p.add_argument("--work", default=None, help="compare: where the runs go (default: a temp dir)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="ttft: prompt length")
    p.add_argument("--repeats", type=int, default=30, help="ttft: timed runs each")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"memory": memory, "speed": speed, "quality": quality, "compare": compare, "ttft": ttft,
     "pack": pack}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
