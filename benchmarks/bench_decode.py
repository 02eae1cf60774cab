"""End-to-end decoding: time to first token and tokens/s, our sampler vs transformers generate().

    python -m benchmarks.bench_decode [--presets tiny hf-8x512 small hf-16x1024] [--batch 1 16] [--prompt 128 2048]
                                      [--new-tokens 64] [--repeats 3] [--threads N]

Both sides get the same random weights: our model is built from the preset (context stretched to
fit the longest prompt), and the equivalent transformers model is built from our config with the
weights copied through llm.hf's name mapping (fused wqkv rows [q; k; v] split into q/k/v_proj, w1 =
gate, w3 = up, w2 = down; rotate-half RoPE on both). The imported cases (hf-8x512: 8 layers, width
512; hf-16x1024: 16 layers, width 1024; GQA with 64-wide heads, half as many KV heads, untied, vocab
700) go the other way, as a user would: transformers saves a random Llama as a Hugging Face directory
and each side loads it. Greedy decoding, no early stop, so both do the same work; `same` says whether
the generated ids agree (fp32: they should; bf16 may drift).

Providers: ours (eager on CPU, CUDA graph on CUDA), ours+compile (torch.compile'd decode step;
its one-off compile time is reported apart), hf (generate(), default dynamic cache, SDPA), and the
weight-only quantized copies int8, int4 (group 64), int8+emb, int4+emb (head and embedding too), run
like `ours` (llm.quant; on CPU the C GEMVs of kernels/cpu_gemv.py, see llm.ops), each also compiled as
`<name>+compile` (e.g. int4+compile: the GEMVs stay custom ops inside the compiled step), on CPU ours-f16 and
ours-bf16 (+compile): the linears' weights in 16 bits, fp32 compute (llm.weights16), and on CPU with
llama-cpp-python installed (the `llamacpp` extra) llama.cpp:f32, llama.cpp:f16, llama.cpp:q8_0, llama.cpp:q4_0:
the same weights written by llm.interop.gguf and decoded by llama.cpp (batch 1, torch's thread count; its
roofline bytes are the GGUF tensors' but the embedding's).
TTFT: call -> every row's first new token (prefill + one sample). tok/s: B * (N - 1) tokens after
the first, per second of the rest of the call (a compiled step's compiling first step left out), and
ms/step. Roofline: bytes a decode step must read (weights, minus the untouched embedding table, plus
the KV cache at its mean length) times steps/s, over the measured bandwidth: on CUDA the copy
bandwidth (benchmarks.common.measure_ceilings), on CPU the read bandwidth at the run's thread count
over a buffer of that many bytes (benchmarks.common.cpu_read_bandwidth; --threads 1: one core).
Runs on CPU too (end-to-end benchmark); configurations whose prefill exceeds --max-prefill-tflop
are skipped there (say so, and are counted in the output).

Speculative decoding (needs trained weights: with random ones acceptance means nothing):
    python -m benchmarks.bench_decode --checkpoint DIR --prompt-file FILE [--draft-checkpoint DIR]
                                      [--prompt-lookup 3] [--speculate 4] [--new-tokens 64]
runs plain greedy, prompt lookup and (with a draft) draft-model speculation side by side on the
file's first tokens (as many as fit the context with --new-tokens), and reports tok/s, the speedup
over plain, acceptance, tokens per target pass, and whether the ids equal plain greedy's; --speculate takes
several K, --draft-quant int8 / int4 adds the target itself quantized as a draft.
Quantized self-speculation on the presets (random weights; the draft is the target quantized, so acceptance is
the quantized model's agreement with the fp32 one):
    python -m benchmarks.bench_decode --presets hf-16x1024 --prompt 128 --new-tokens 64 --threads 1
                                      --draft-quant int8 --speculate 2 3 4
plain, each draft decoding alone (its step cost) and each (draft, K) side by side, interleaved: tok/s with its
spread over the repeats, ms/token, x vs plain, acceptance, tokens per target pass, verify_steps (a round's time
less its K draft steps, in plain steps: the verify pass plus the round's overhead) and same (ids == plain's).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from functools import partial
from types import SimpleNamespace

import gguf
import torch

from benchmarks.common import cpu_read_bandwidth, device_name, measure_ceilings, short_name, threads_text, write_results
from llm.config import ModelConfig, preset
from llm.generate import Stats, stream_tokens
from llm.generate.api import complete
from llm.generate.sampling import SamplingParams
from llm.generate.speculative import Speculation, check_tokenizers, stream_speculative
from llm.interop.gguf import export_gguf
from llm.loading import load_model
from llm.model import Transformer
from llm.quant import QuantLinear, make_scheme, quantize_model
from llm.tokenizer import Tokenizer
from llm.weights16 import W16Linear, to_w16

# Weight-only quantized copies of the model, eager decode: provider -> (mode, group size, head + embedding too).
QUANT = {"int8": ("int8", None, False), "int4": ("int4", 64, False), "int8+emb": ("int8", None, True),
         "int4+emb": ("int4", 64, True)}
# 16-bit weights, fp32 compute (llm.weights16; CPU only): provider -> format.
W16 = {"ours-f16": "f16", "ours-bf16": "bf16"}


# Imported cases: a Llama saved by transformers (random weights, GQA, untied, a ~700-token vocabulary), read
# back by both sides: ours through llm.interop.hf, transformers through from_pretrained. name -> (layers, width).
IMPORTED = {"hf-8x512": (8, 512), "hf-16x1024": (16, 1024)}


def build(name: str, context: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    kw = preset(name)
    kw["block_size"] = max(kw.get("block_size", 256), context)
    return Transformer(ModelConfig(**kw, kernels="auto")).to(device, dtype).eval()


def build_imported(name: str, context: int, device: torch.device, dtype: torch.dtype):
    """(ours, transformers) for an IMPORTED case: a LlamaForCausalLM with seeded random weights saved as a
    Hugging Face directory, then loaded from it by each side, as a user comparing the two would."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from llm.interop.hf import load_hf

    layers, width = IMPORTED[name]
    conf = LlamaConfig(vocab_size=700, hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=width // 64, num_key_value_heads=width // 128,
                       max_position_embeddings=max(2048, context), tie_word_embeddings=False)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(conf).save_pretrained(d)
        model, _, _ = load_hf(d, device, dtype, tokenizer=False)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return model.eval(), hf.eval()


def to_transformers(model: Transformer):
    """The same network as a transformers model, weights copied (llm.interop.hf mapping)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm.interop.hf import family_of, split_tensor, weight_rules
    from llm.interop.hf_export import hf_config

    cfg = model.cfg
    family = family_of(cfg)
    conf = hf_config(cfg, family, SimpleNamespace(bos_id=None, eot_id=None))
    hf_cfg = AutoConfig.for_model(conf.pop("model_type"), **conf)
    p = model.lm_head.weight
    with torch.device(p.device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=p.dtype, attn_implementation="sdpa")
    sd = model.state_dict()
    tensors = {n: t for r in weight_rules(cfg, family) for n, t in zip(r.hf, split_tensor(r, sd[r.ours]), strict=True)}
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def run_ours(model: Transformer, prompt: torch.Tensor, n: int, mode: str) -> tuple[float, float, torch.Tensor]:
    """(TTFT s, decode tok/s, new ids (B, n))."""
    stats = Stats()
    steps = list(stream_tokens(model, prompt.tolist(), n, SamplingParams(0.0), mode=mode, stats=stats))
    return stats.ttft, stats.decode_tok_s or float("nan"), torch.tensor(steps).T


def run_hf(hf, prompt: torch.Tensor, n: int) -> tuple[float, float, torch.Tensor]:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):  # first call: the prefill's logits exist
        first = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                if scores.is_cuda:
                    torch.cuda.synchronize()
                self.first = time.perf_counter()
            return scores

    clock = Clock()
    B = prompt.shape[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
    t1 = time.perf_counter()
    return clock.first - t0, B * (n - 1) / (t1 - clock.first), out[:, prompt.shape[1]:].cpu()


def llama_cpp_model(model: Transformer, qtype: str, context: int):
    """(llama_cpp.Llama, bytes a step reads) for `model` written as a GGUF file of `qtype` (llm.interop.gguf) and
    loaded by llama.cpp at torch's thread count; the bytes are its tensors' but the token embedding's."""
    import llama_cpp  # optional: the llamacpp extra

    tok = Tokenizer.train(["def f(x):\n    return x + 1\n" * 50], 300)  # GGUF needs one; ids are given directly
    with tempfile.TemporaryDirectory() as d:
        path = export_gguf(model, tok, f"{d}/m.gguf", qtype)
        nbytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name != "token_embd.weight")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=torch.get_num_threads(),
                              n_threads_batch=torch.get_num_threads(), logits_all=True, verbose=False)
    return llm, nbytes


def run_llama_cpp(llm, prompt: torch.Tensor, n: int) -> tuple[float, float, torch.Tensor]:
    """Greedy decode through llama.cpp one token per eval (batch 1): (TTFT s, decode tok/s, new ids (1, n))."""
    if prompt.shape[0] != 1:
        raise ValueError("the llama.cpp provider runs batch 1")
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt[0].tolist())
    out = [int(llm.scores[llm.n_tokens - 1].argmax())]
    t1 = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([out[-1]])
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
    t2 = time.perf_counter()
    return t1 - t0, (n - 1) / (t2 - t1), torch.tensor([out])


def step_bytes(model: Transformer, B: int, kv_len: float) -> float:
    """Bytes one decode step reads: every weight as stored (a quantized linear's codes, scales and offsets) but
    the embedding table (B rows), plus K and V."""
    c, elt = model.cfg, model.norm_f.weight.element_size()
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    w += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, (QuantLinear, W16Linear))
             for b in m.buffers())
    if not c.tie_embeddings and isinstance(model.tok_emb, torch.nn.Embedding):
        w -= model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()
    return w + B * kv_len * c.n_layer * 2 * c.n_kv_head * c.head_dim * elt


def bench_case(model: Transformer, hf, prompt: torch.Tensor, n: int, providers: list[str], repeats: int,
               bw: float) -> list[dict]:
    """One row per provider: median TTFT and tok/s over `repeats` interleaved runs after a warm-up."""
    cuda = prompt.is_cuda
    runs = {"ours": partial(run_ours, model, prompt, n, "graph" if cuda else "eager"),
            "ours+compile": partial(run_ours, model, prompt, n, "compile"),
            "hf": partial(run_hf, hf, prompt, n)}
    models = {"ours": model, "ours+compile": model, "hf": model}
    for k in providers:
        base, compiled = k.removesuffix("+compile"), k.endswith("+compile")
        if base in QUANT or base in W16:
            qm = (quantize_model(copy.deepcopy(model), make_scheme(*QUANT[base])).to(model.lm_head.weight.dtype)
                  if base in QUANT else to_w16(copy.deepcopy(model), W16[base]))
            models[k] = qm
            runs[k] = partial(run_ours, qm, prompt, n, "compile" if compiled else "graph" if cuda else "eager")
    nbytes = {}
    for k in providers:
        if k.startswith("llama.cpp:") and not cuda:
            llm, nbytes[k] = llama_cpp_model(model, k.split(":", 1)[1], prompt.shape[1] + n)
            runs[k] = partial(run_llama_cpp, llm, prompt, n)
    runs = {k: v for k, v in runs.items() if k in providers}
    first = {}
    for k, fn in runs.items():  # warm-up; the compile happens here
        t = time.perf_counter()
        first[k] = (fn(), time.perf_counter() - t)
    res: dict[str, list] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so load changes hit every provider alike
        for k, fn in runs.items():
            res[k].append(fn())
    ref = first["hf" if "hf" in first else next(iter(first))][0][2]
    base = statistics.median(r[1] for r in res["hf"]) if "hf" in res else None
    B, P = prompt.shape
    rows = []
    for k, rs in res.items():
        tps = statistics.median(r[1] for r in rs)
        row = dict(provider=k, ttft_ms=1e3 * statistics.median(r[0] for r in rs), tok_s=tps,
                   vs_hf=tps / base if base else None, same=bool(torch.equal(first[k][0][2].cpu(), ref.cpu())),
                   compile_s=first[k][1] if k.endswith("+compile") else None)
        kv = step_bytes(model, B, P + n / 2) - step_bytes(model, B, 0)  # the KV cache's bytes (same for all)
        wbytes = nbytes[k] + kv if k in nbytes else step_bytes(models[k], B, P + n / 2)
        row["roofline"] = wbytes * tps / B / bw  # bw: bytes/s
        rows.append(row)
    return rows


def bench_speculative(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    """Plain greedy vs prompt lookup vs a draft model on one prompt of a trained checkpoint."""
    model, tok, _ = load_model(args.checkpoint, device, dtype)
    N, Ks = args.new_tokens, args.speculate
    ids = tok.encode(open(args.prompt_file, encoding="utf-8").read())[: model.cfg.block_size - N - max(Ks)]
    text = tok.decode(ids)
    specs: dict[str, Speculation | None] = {"plain": None}
    specs |= {f"lookup n={args.prompt_lookup} k={K}": Speculation(K, lookup=args.prompt_lookup) for K in Ks}
    if args.draft_checkpoint:
        draft, draft_tok, _ = load_model(args.draft_checkpoint, device, dtype)
        check_tokenizers(tok, draft_tok)
        specs |= {f"draft k={K}": Speculation(K, draft=draft) for K in Ks}
    for q in args.draft_quant or []:  # the target itself, quantized
        qd = quantize_model(copy.deepcopy(model), make_scheme(*QUANT[q])).to(dtype)
        specs |= {f"{q} self-draft k={K}": Speculation(K, draft=qd) for K in Ks}
    where = f"{device_name()} ({device.type}, {threads_text(torch.get_num_threads())}), {args.dtype}"
    print(f"speculative decoding on {where}: {args.checkpoint}, prompt {args.prompt_file} ({len(ids)} tokens), "
          f"{N} new tokens, greedy, median of {args.repeats}", flush=True)

    def once(spec):
        st = Stats()
        c = complete(model, tok, text, N, params=SamplingParams(0.0), speculative=spec, stats=st)[0]
        return st, c.tokens

    for spec in specs.values():  # warm-up
        once(spec)
    res: dict[str, list] = {k: [] for k in specs}
    for _ in range(args.repeats):  # interleaved
        for k, spec in specs.items():
            res[k].append(once(spec))
    base = statistics.median(st.decode_tok_s for st, _ in res["plain"])
    rows = []
    for k, rs in res.items():
        tps, (st, toks) = statistics.median(st.decode_tok_s for st, _ in rs), rs[0]
        row = dict(case=short_name(args.checkpoint), provider=k, prompt=len(ids), new=len(toks), tok_s=tps,
                   vs_plain=tps / base, same=toks == res["plain"][0][1], acceptance=st.acceptance,
                   tokens_per_pass=1 + st.accepted / st.row_passes if st.row_passes else 1.0,
                   target_passes=st.target_passes if st.target_passes else st.new_tokens - 1)
        rows.append(row)
        acc = "" if row["acceptance"] is None else f"  acceptance {100 * row['acceptance']:.0f}%"
        print(f"{k:18s} {tps:8.1f} tok/s  x{row['vs_plain']:.2f} vs plain  {row['tokens_per_pass']:.2f} tok/pass  "
              f"{row['target_passes']} passes{acc}  same={row['same']}", flush=True)
    write_results(args.name, rows, x="provider", y="tok_s", panels="case", title=f"speculative decoding, {where}",
                  xlabel="decoding", ylabel="decode throughput (tokens/s)", panel_label="checkpoint")
    return 0 if all(r["same"] for r in rows) else 1


def run_spec(model: Transformer, prompt: list[int], n: int, spec: Speculation | None,
             mode: str = "eager") -> tuple[Stats, list[int]]:
    """Greedy decode of one row, plain (spec None; `mode` a Decoder mode) or speculative: (its Stats, the new ids)."""
    st = Stats()
    if spec is None:
        ids = [s[0] for s in stream_tokens(model, [prompt], n, SamplingParams(0.0), mode=mode, stats=st)]
    else:
        ids = [i for r in stream_speculative(model, [prompt], n, SamplingParams(0.0), spec, stats=st) for i in r[0]]
    return st, ids


def bench_speculative_presets(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    """Plain greedy vs draft-model speculation with a quantized copy of the target as the draft (quantized
    self-speculation: --draft-quant int8 / int4), per preset and K, on a random prompt, eager, interleaved."""
    where = f"{device_name()} (CPU, {threads_text(torch.get_num_threads())}), {args.dtype}"
    P, N = args.prompt[0], args.new_tokens
    print(f"speculative decoding on {where}: batch 1, prompt {P}, {N} new tokens, greedy, eager, draft = the target "
          f"quantized ({', '.join(args.draft_quant)}), k in {args.speculate}, median of {args.repeats} interleaved",
          flush=True)
    rows = []
    for name in args.presets:
        if name in IMPORTED:
            model, hf = build_imported(name, P + N + max(args.speculate) + 1, device, dtype)
            del hf
        else:
            model = build(name, P + N + max(args.speculate) + 1, device, dtype)
        torch.manual_seed(1)
        prompt = torch.randint(0, model.cfg.vocab_size, (P,)).tolist()
        drafts = {q: quantize_model(copy.deepcopy(model), make_scheme(*QUANT[q])).to(dtype) for q in args.draft_quant}
        # label -> (model, speculation or None, plain decode mode); "+compile": the draft's step compiled (and a
        # compiled plain decoder beside the eager one, the baseline a --compile user has)
        runs: dict[str, tuple[Transformer, Speculation | None, str]] = {"plain": (model, None, "eager")}
        if args.compile_draft:
            runs["plain+compile"] = (model, None, "compile")
        for c in [False] + [True] * args.compile_draft:
            tag = "+compile" if c else ""
            runs |= {f"{q} draft{tag} alone": (d, None, "compile" if c else "eager") for q, d in drafts.items()}
            runs |= {f"{q} draft{tag} k={k}": (model, Speculation(k, draft=d, compile_draft=c), "eager")
                     for q, d in drafts.items() for k in args.speculate}
        for m, spec, mode in runs.values():  # warm-up (and the compiles)
            run_spec(m, prompt, N, spec, mode)
        res: dict[str, list] = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
            for k, (m, spec, mode) in runs.items():
                res[k].append(run_spec(m, prompt, N, spec, mode))
        ms = {k: 1e3 / statistics.median(st.decode_tok_s for st, _ in rs) for k, rs in res.items()}
        for k, rs in res.items():
            st, ids = rs[0]
            tps = [s.decode_tok_s for s, _ in rs]
            tpp = 1 + st.accepted / st.row_passes if st.row_passes else 1.0
            spec = runs[k][1]
            alone = k.rsplit(" k=", 1)[0] + " alone"
            # per target pass: tokens_per_pass tokens at ms[k] each = K draft steps + the verify pass (+ overhead)
            verify = (ms[k] * tpp - spec.k * ms[alone]) / ms["plain"] if spec else None
            row = dict(case=name, provider=k, prompt=P, new=len(ids), tok_s=statistics.median(tps),
                       ms_token=ms[k], spread=f"{min(tps):.1f}-{max(tps):.1f}", vs_plain=ms["plain"] / ms[k],
                       step_vs_plain=ms[k] / ms["plain"] if k.endswith("alone") else None,
                       same=ids == res["plain"][0][1] if not k.endswith("alone") else None,
                       acceptance=st.acceptance, tokens_per_pass=tpp if spec else None,
                       verify_steps=verify)
            rows.append(row)
            extra = (f"  acceptance {100 * st.acceptance:.0f}%  {tpp:.2f} tok/pass  verify+rest {verify:.2f} steps"
                     f"  same={row['same']}" if spec else "")
            print(f"{name:10s} {k:26s} {row['tok_s']:7.1f} tok/s ({row['spread']})  {ms[k]:7.2f} ms/token  "
                  f"x{row['vs_plain']:.2f} vs plain{extra}", flush=True)
        del model, drafts
    write_results(args.name, rows, x="provider", y="tok_s", panels="case", title=f"speculative decoding, {where}",
                  xlabel="decoding", ylabel="decode throughput (tokens/s)", panel_label="preset")
    return 0 if all(r["same"] is not False for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+",
                   default=["tiny", "hf-8x512", "small", "hf-16x1024"] + (["1b"] if cuda else []),
                   help=f"model presets (llm.config), or imported Hugging Face Llamas: {', '.join(IMPORTED)}")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", nargs="+", type=int, default=[128, 2048])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per provider (after one warm-up), median")
    p.add_argument("--providers", nargs="+", default=["ours", "ours+compile", "hf"])
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-prefill-tflop", type=float, default=float("inf") if cuda else 2.0,
                   help="skip configurations whose prefill needs more (2 * params * batch * prompt)")
    p.add_argument("--name", default="bench_decode", help="result file name under benchmarks/results/<device>/")
    p.add_argument("--checkpoint", default=None, help="speculative decoding benchmark: the trained target")
    p.add_argument("--draft-checkpoint", default=None, help="speculative: a trained draft (same tokenizer)")
    p.add_argument("--prompt-file", default=None, help="speculative: the prompt (its first tokens that fit)")
    p.add_argument("--prompt-lookup", type=int, default=3, help="speculative: n-gram size of prompt lookup")
    p.add_argument("--speculate", type=int, nargs="+", default=[4],
                   help="speculative: tokens drafted per target pass (several: one case each)")
    p.add_argument("--compile-draft", action="store_true",
                   help="speculative, --draft-quant on the presets: also the draft's step compiled (llm sample "
                        "--draft-quant ... --compile) and compiled plain decoding beside eager")
    p.add_argument("--draft-quant", nargs="+", default=None, choices=("int8", "int4"),
                   help="speculative: the draft is the target quantized (quantized self-speculation); without "
                        "--checkpoint, on the presets (random weights: --presets hf-16x1024 ...)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.draft_quant and not args.checkpoint:
        if args.name == "bench_decode":
            args.name = "bench_speculative_quant"
        return bench_speculative_presets(args, device, dtype)
    if args.checkpoint:
        if not args.prompt_file:
            p.error("--checkpoint (the speculative benchmark) needs --prompt-file")
        if args.name == "bench_decode":
            args.name = "bench_speculative"
        return bench_speculative(args, device, dtype)
    bw = measure_ceilings()[1] * 1e12 if cuda else None  # bytes/s, read + written
    N = args.new_tokens
    where = f"{device_name()} ({'CUDA' if cuda else f'CPU, {threads_text(torch.get_num_threads())}'}), {args.dtype}"
    print(f"decode benchmark on {where}; {N} new tokens, greedy, median of {args.repeats}"
          + (f"; measured copy bandwidth {bw / 1e12:.2f} TB/s" if bw else ""), flush=True)
    rows, skipped = [], 0
    for name in args.presets:
        if name in IMPORTED:
            model, hf = build_imported(name, max(args.prompt) + N, device, dtype)
        else:
            model = build(name, max(args.prompt) + N, device, dtype)
            hf = to_transformers(model) if "hf" in args.providers else None
        n_params = model.num_params()
        if not cuda:  # the CPU roofline: what one step reads (weights + the mean KV cache) at the measured read rate
            nbytes = step_bytes(model, max(args.batch), max(args.prompt) + N / 2)
            bw = cpu_read_bandwidth(nbytes)
            print(f"{name}: {n_params / 1e6:.1f}M parameters; CPU read bandwidth {bw / 1e9:.1f} GB/s "
                  f"({threads_text(torch.get_num_threads())}, the faster median of sum and a K-major GEMV over "
                  f"{nbytes / 1e6:.0f} MB)", flush=True)
        for B in args.batch:
            for P in args.prompt:
                if 2 * n_params * B * P / 1e12 > args.max_prefill_tflop:
                    print(f"skip {name} batch {B} prompt {P}: prefill > {args.max_prefill_tflop} TFLOP "
                          "(--max-prefill-tflop)", flush=True)
                    skipped += 1
                    continue
                torch.manual_seed(1)
                prompt = torch.randint(0, model.cfg.vocab_size, (B, P), device=device)
                for row in bench_case(model, hf, prompt, N, args.providers, args.repeats, bw):
                    rows.append(dict(case=f"{name} b{B}", preset=name, batch=B, prompt=P) | row)
                    print(f"{name:10s} b{B:<3d} p{P:<5d} {row['provider']:13s} TTFT {row['ttft_ms']:9.1f} ms  "
                          f"{row['tok_s']:9.1f} tok/s {1e3 * B / row['tok_s']:7.2f} ms/step"
                          + (f"  x{row['vs_hf']:.2f} vs hf" if row["vs_hf"] else "")
                          + f"  same={row['same']}" + f"  {100 * row['roofline']:.0f}% of roofline",
                          flush=True)
        del model, hf
    if rows:
        write_results(args.name, rows, x="prompt", y="tok_s", panels="case",
                      title=f"decode tok/s, {where}" + (f", {skipped} config(s) skipped" if skipped else ""),
                      xlabel="prompt (tokens)", ylabel="decode throughput (tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
