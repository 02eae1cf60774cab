"""Serving under load, vLLM's `bench serve` figures: request and output-token throughput, TTFT / TPOT / ITL mean,
p50, p99 at 1, 4, 16, 32 concurrent clients, in two scenarios:

  random   prompts of random length (16 to --max-prompt tokens), --max-tokens new tokens each
  shared   every request starts with the same --system-tokens (1,000) system prompt, then a short random
           question; run twice, with the prefix cache and with --no-prefix-cache (so 1,000-token prefills
           keep arriving), side by side in this process

    python -m benchmarks.bench_serve [--preset tiny|hf-8x512] [--scenarios random shared] [--clients 1 4 16 32]
                                     [--requests-per-client 4] [--max-tokens 32] [--max-batch 32]
                                     [--max-step-tokens 256] [--threads N] [--total N]

The server runs in this process (llm.serve.launch.ThreadedServer on 127.0.0.1; random weights of the preset with
the context stretched to 2048, or a random Llama saved and imported through transformers for hf-8x512; a
byte-level tokenizer trained on a small text); the load generator runs in a second process (its own GIL):
C clients each send their requests one after another, streaming, greedy, every request the same
max_tokens. TTFT: request sent -> first token; TPOT: (latency - TTFT) / (tokens - 1) per request; ITL:
between the tokens of a stream (a chunk of k tokens counts as k gaps, its first the time since the last
chunk, the rest 0, as vLLM counts them). --total N adds one run of N requests at the top client count
(the 0-failures check). Prints the goals of issue 30 against the numbers.

    python -m benchmarks.bench_serve --decode-step [--preset tiny] [--context 2048] [--batches 1 8]
                                     [--prompt-tokens 64] [--steps 16] [--rounds 8] [--threads N]

--decode-step: the captured decode step (`llm serve --compile`) against the eager one, side by side in this process,
no HTTP: two engines over the same model (one with compile_batch = max(--batches), its buckets compiled first, the
warm-up time printed), each round B fresh greedy sequences of --prompt-tokens tokens per engine, prefilled (not
timed), then --steps decode-only steps timed per engine (the order alternates between rounds; a round's ratio
pairs the two engines' times in it, the speedup is the median of the rounds' ratios, with their range). "step" is
`Engine.step` as the server runs it (planning, forward, sampling, emitting); "forward" is the model call alone at
a fixed state (the eager ragged forward vs the compiled bucket), a round's time the median of --steps calls. The
tokenizer's end-of-text id is hidden from the engines so no row finishes early (an untrained model may sample it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import time

import torch

from benchmarks.common import device_name, write_results
from llm.config import ModelConfig, preset
from llm.model import Transformer
from llm.serve.launch import ThreadedServer, build
from llm.serve.metrics import percentile
from llm.tokenizer import Tokenizer

TEXT = "def f(x):\n    return x + 1\n# a comment about the code\nclass Point:\n    x: int = 0\n" * 50
CONTEXT = 2048


# ----------------------------------------------------------------------------- the load generator (own process)


async def _one(client, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False}
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    n = len((ch.get("logprobs") or {}).get("tokens") or [])
                    now = time.perf_counter()
                    stamps += [now] * n
    except Exception:  # noqa: BLE001 - a failed request is counted, not raised
        return {"ok": False}
    if not stamps:
        return {"ok": False}
    end = stamps[-1]
    tpot = (end - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {"ok": True, "ttft": stamps[0] - t0, "tpot": tpot, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": len(stamps)}


async def _load(url: str, prompts: list[list[str]], max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(ps):
            return [await _one(client, url, p, max_tokens) for p in ps]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(ps) for ps in prompts)) for r in rs]
        return results, time.perf_counter() - t0


def run_load(url: str, prompts: list[list[str]], max_tokens: int) -> tuple[list[dict], float]:
    """Runs in the load-generator process: every client's requests, (results, wall seconds)."""
    return asyncio.run(_load(url, prompts, max_tokens))


# ----------------------------------------------------------------------------- figures


def summarize(results: list[dict], wall: float, clients: int) -> dict:
    ok = [r for r in results if r["ok"]]
    out = {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
           "req_s": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall}
    series = {"ttft": [r["ttft"] for r in ok], "tpot": [r["tpot"] for r in ok if r["tokens"] > 1],
              "itl": [x for r in ok for x in r["itl"]]}
    for k, xs in series.items():
        out[f"{k}_mean_ms"] = 1e3 * sum(xs) / max(1, len(xs))
        out[f"{k}_p50_ms"] = 1e3 * percentile(xs, 0.5)
        out[f"{k}_p99_ms"] = 1e3 * percentile(xs, 0.99)
    return out


def make_prompts(tok: Tokenizer, scenario: str, clients: int, per_client: int, args, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = TEXT.split()

    def text(n_tokens: int, r: random.Random) -> str:
        out = ""
        while len(tok.encode(out)) < n_tokens:
            out += " " + " ".join(r.choices(words, k=max(1, (n_tokens - len(tok.encode(out))) // 2)))
        return out

    if scenario == "random":
        return [[text(rng.randint(16, args.max_prompt), rng) for _ in range(per_client)] for _ in range(clients)]
    system = text(args.system_tokens, random.Random(0))  # the same for every request, every level
    return [[system + "\nQ:" + text(rng.randint(8, 32), rng) for _ in range(per_client)] for _ in range(clients)]


def build_model(name: str, device: torch.device, context: int = CONTEXT) -> tuple[Transformer, Tokenizer]:
    tok = Tokenizer.train([TEXT], 512)
    if name.startswith("hf-"):
        from benchmarks.bench_decode import build_imported

        model, _ = build_imported(name, context, device, torch.float32)
        return model, tok
    torch.manual_seed(0)
    cfg = ModelConfig(**(preset(name) | {"vocab_size": tok.n_vocab, "block_size": context}))
    return Transformer(cfg).to(device).eval(), tok


def run_scenario(pool, model, tok, args, scenario: str, prefix_cache: bool) -> list[dict]:
    longest = (args.system_tokens + 40 if scenario == "shared" else args.max_prompt) + args.max_tokens
    blocks = args.max_batch * -(-longest // 16) + 64
    app, sched = build(model, tok, "bench", max_batch=args.max_batch, max_queue=4 * max(args.clients),
                       num_blocks=blocks, max_step_tokens=args.max_step_tokens, prefix_cache=prefix_cache)
    label = scenario + ("" if scenario == "random" else " +cache" if prefix_cache else " no-cache")
    rows = []
    prof = None
    if args.profile:
        from benchmarks import serve_profile

        prof = serve_profile.StepProfile()
        prof.install(sched.engine, tok)
    with ThreadedServer(app, sched, drain_timeout=5) as srv:
        pool.apply(run_load, (srv.url, make_prompts(tok, scenario, 2, 1, args, 99), 4))  # warm-up (shared: the
        # prefix is then cached, as on a server that has answered before; the no-cache run gets the same requests)
        for c in args.clients:
            prompts = make_prompts(tok, scenario, c, args.requests_per_client, args, seed=c)
            if prof is not None:
                prof.reset()
                names = serve_profile.thread_names()
                cpu0 = serve_profile.thread_cpu(names)
            results, wall = pool.apply(run_load, (srv.url, prompts, args.max_tokens))
            rows.append({"scenario": label} | summarize(results, wall, c))
            print(json.dumps(rows[-1]), flush=True)
            if prof is not None:
                print(f"--- engine thread profile, {label}, {c} clients:")
                serve_profile.report(prof, wall, cpu0, serve_profile.thread_cpu(names),
                                     sum(r["tokens"] for r in results if r["ok"]))
        if args.total and scenario == "random":
            c = max(args.clients)
            prompts = make_prompts(tok, scenario, c, -(-args.total // c), args, seed=7)
            results, wall = pool.apply(run_load, (srv.url, prompts, args.max_tokens))
            total = summarize(results, wall, c)
            print(f"{total['requests']}-request run at {c} clients: failed {total['failed']}, "
                  f"{total['tok_s']:.0f} tok/s", flush=True)
        t0 = time.monotonic()  # the last job retires (frees its blocks) just after its final event went out
        while not (sched.idle() and sched.pool.used == 0) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert sched.pool.used == 0, f"{sched.pool.used} KV blocks still used at idle"
    return rows


def goals(rows: list[dict]) -> None:
    by = {(r["scenario"], r["clients"]): r for r in rows}
    print("\ngoals (issue 30):")
    for scen in sorted({r["scenario"] for r in rows}):
        one, sixteen = by.get((scen, 1)), by.get((scen, 16))
        if one and sixteen:
            print(f"  {scen}: 16 clients {sixteen['tok_s'] / one['tok_s']:.2f}x one client's tok/s (goal >= 6x); "
                  f"p99 ITL at 16 = {sixteen['itl_p99_ms'] / one['itl_p50_ms']:.2f}x one client's p50 ITL "
                  f"(goal <= 3x)")
    for c in sorted({r["clients"] for r in rows}):
        a, b = by.get(("shared +cache", c)), by.get(("shared no-cache", c))
        if a and b:
            print(f"  shared prefix, {c} clients: TTFT mean with cache / without = "
                  f"{a['ttft_mean_ms'] / b['ttft_mean_ms']:.3f} (goal <= 0.2)")


class _NoEnd:
    """The tokenizer as the engine sees it, with no end-of-text id (rows of a random model keep going)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.n_vocab, self.decode_bytes, self.eot_id = tok.n_vocab, tok.decode_bytes, -1


def decode_step(model: Transformer, tok: Tokenizer, args) -> list[dict]:
    """Eager vs captured decode steps at each batch size -> rows of ms per step and their ratio."""
    from statistics import median

    from llm.generate import SamplingParams
    from llm.paged_cache import PagedKVCache
    from llm.serve.engine import Engine, Seq

    top, bs = max(args.batches), 16
    blocks = top * -(-model.cfg.block_size // bs) + 1
    nt = _NoEnd(tok)
    eager = Engine(model, nt, model.new_pool(blocks, bs), max_step_tokens=top * args.prompt_tokens)
    comp = Engine(model, nt, model.new_pool(blocks, bs, scratch=True), max_step_tokens=top * args.prompt_tokens,
                  compile_batch=top, compile_buckets=sorted(set(args.batches)))
    comp.warmup()
    print(comp.captured.describe(), flush=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in args.batches:
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        fwd: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            prompts = torch.randint(0, tok.n_vocab, (B, args.prompt_tokens), generator=g).tolist()
            order = [("eager", eager), ("compiled", comp)][:: 1 if r % 2 == 0 else -1]
            for name, e in order:
                seqs = [Seq(p, SamplingParams(0.0), args.steps + 2, seed=0, emit=lambda ev: None) for p in prompts]
                for s in seqs:
                    e.start(s)
                while any(s.length < len(s.prompt) for s in seqs):  # prefill (and the first token): not timed
                    e.step(seqs)
                steps0 = e.captured.steps if e.captured else 0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    e.step(seqs)
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
                assert all(s.finish is None for s in seqs) and len(seqs) == B
                if e.captured:
                    assert e.captured.steps - steps0 == args.steps, "a timed step did not take the compiled path"
                with torch.inference_mode():  # the forward alone: the last step's again (rewrites the same slots)
                    ids = [s.tokens(s.length - 1, s.length)[0] for s in seqs]
                    tables, lengths = [s.blocks for s in seqs], [s.length - 1 for s in seqs]
                    calls = []
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        if e.captured:
                            e.captured(ids, tables, lengths)
                        else:
                            cache = PagedKVCache.ragged(e.pool, tables, lengths, [1] * B)
                            model(torch.tensor(ids)[:, None], cache=cache, logits_rows=torch.arange(B))
                        calls.append((time.perf_counter() - t0) * 1e3)
                    fwd[name].append(median(calls))
                for s in seqs:
                    e.release(s)
        for what, d in (("step", times), ("forward", fwd)):  # medians over rounds; the ratio paired per round
            a, b = median(d["eager"]), median(d["compiled"])
            ratio = median(x / y for x, y in zip(d["eager"], d["compiled"]))
            lo, hi = min(x / y for x, y in zip(d["eager"], d["compiled"])), max(
                x / y for x, y in zip(d["eager"], d["compiled"]))
            rows.append({"what": what, "batch": B, "eager_ms": a, "compiled_ms": b, "speedup": ratio,
                         "speedup_min": lo, "speedup_max": hi,
                         "provider": f"{what} ({args.preset}, context {model.cfg.block_size}, {device_name()})"})
            print(f"batch {B:3d} {what:8s} eager {a:8.2f} ms  compiled {b:8.2f} ms  speedup {ratio:5.2f}x "
                  f"(rounds {lo:.2f}-{hi:.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="a model preset, or hf-8x512 (a random Llama, imported)")
    ap.add_argument("--scenarios", nargs="+", default=["random", "shared"], choices=("random", "shared"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=400, help="random scenario: longest prompt in tokens")
    ap.add_argument("--system-tokens", type=int, default=1000, help="shared scenario: the system prompt's tokens")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-step-tokens", type=int, default=256)
    ap.add_argument("--total", type=int, default=0, help="one more run of this many requests at the top client count")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="print where the engine thread's time goes at each "
                    "client count (benchmarks/serve_profile.py: model forward vs host work vs waiting for the GIL)")
    ap.add_argument("--decode-step", action="store_true", help="eager vs captured decode step instead (see above)")
    ap.add_argument("--context", type=int, default=CONTEXT, help="the model's context length (tokens)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--decode-step: rows per step")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="--decode-step: each row's prompt")
    ap.add_argument("--steps", type=int, default=16, help="--decode-step: timed steps per round")
    ap.add_argument("--rounds", type=int, default=8, help="--decode-step: rounds (fresh rows each)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = build_model(args.preset, device, args.context)
    if args.decode_step:
        load = os.getloadavg()
        print(f"threads {torch.get_num_threads()}, load average {load[0]:.2f} (1 min) at start", flush=True)
        rows = decode_step(model, tok, args)
        print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end", flush=True)
        name = f"serve_decode_step_{args.preset}_ctx{args.context}"
        write_results(name, rows, x="batch", y="speedup", series="what",
                      title=f"Decode step, eager vs --compile, {args.preset}, context {args.context}, "
                      f"{torch.get_num_threads()} thread(s), load {load[0]:.1f}", xlabel="rows per step",
                      ylabel="eager ms / compiled ms", legend="timed")
        return
    rows = []
    with mp.get_context("spawn").Pool(1) as pool:
        for scen in args.scenarios:
            for cache in ((True,) if scen == "random" else (True, False)):
                rows += run_scenario(pool, model, tok, args, scen, cache)
    for r in rows:
        r["provider"] = f"{r['scenario']} ({args.preset}, {device_name()})"
    goals(rows)
    tag = "" if args.max_step_tokens == 256 else f"_step{args.max_step_tokens}"  # the default keeps its name
    write_results(f"serve_{args.preset}{tag}", rows, x="clients", y="tok_s",
                  title=f"Serving, {args.preset}, greedy, max_tokens {args.max_tokens}, max_batch {args.max_batch}, "
                  f"max_step_tokens {args.max_step_tokens}", xlabel="concurrent clients",
                  ylabel="generated tokens/s (all clients)", legend="scenario")


if __name__ == "__main__":
    main()
