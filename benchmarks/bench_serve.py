"""Serving under load: an async load generator against the OpenAI-compatible server at 1/4/16/32 clients.

    python -m benchmarks.bench_serve [--preset tiny] [--clients 1 4 16 32] [--requests-per-client 4]
                                     [--max-tokens 32] [--max-batch 32] [--threads N] [--total N]

The server runs in this process (llm.serve.launch.ThreadedServer on 127.0.0.1, random weights of the
preset; a byte-level tokenizer trained on a small text), the clients are httpx streams in an asyncio
loop: each of C clients sends its requests one after another (streaming, greedy, prompts of 8-40 words
tokens, max_tokens fixed so every request does the same work). Per level: aggregate output tokens/s
(all tokens / wall time), TTFT p50/p99 (request sent -> first text chunk), inter-token latency
p50/p99 (between chunks of a stream), requests completed and failed. --total N adds one run of N
requests at the largest client count (the 0-failures check). Client and server share the CPU and
the GIL, so this measures the whole stack as one machine sees it, not the engine alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, tokens = [], 0
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
                    if n:
                        stamps.append(time.perf_counter())
                        tokens += n
    except Exception:  # noqa: BLE001 - a failed request is counted, not raised
        return {"ok": False}
    if not stamps:
        return {"ok": False}
    return {"ok": True, "ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


async def load(url: str, clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    words = TEXT.split()
    prompts = [[" ".join(rng.choices(words, k=rng.randint(8, 40))) for _ in range(per_client)] for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker(ps):
            return [await one_request(client, url, p, max_tokens) for p in ps]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(ps) for ps in prompts)) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
            "tok_s": toks / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
            "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--total", type=int, default=0, help="one more run of this many requests at the top client count")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.train([TEXT], 512)
    torch.manual_seed(0)
    cfg = ModelConfig(**(preset(args.preset) | {"vocab_size": tok.n_vocab}))
    model = Transformer(cfg).to(device).eval()
    app, sched = build(model, tok, "bench", max_batch=args.max_batch, max_queue=max(64, 2 * max(args.clients)))
    rows = []
    with ThreadedServer(app, sched, drain_timeout=5) as srv:
        asyncio.run(load(srv.url, 2, 1, 4, seed=99))  # warm-up
        for c in args.clients:
            rows.append(asyncio.run(load(srv.url, c, args.requests_per_client, args.max_tokens, seed=c)))
            print(rows[-1], flush=True)
        if args.total:
            c = max(args.clients)
            total = asyncio.run(load(srv.url, c, -(-args.total // c), args.max_tokens, seed=7))
            print("total run:", total, flush=True)
        assert sched.pool.used == 0, f"{sched.pool.used} KV blocks still used at idle"
    base_tps, base_itl = rows[0]["tok_s"], rows[0]["itl_p50_ms"]
    for r in rows:
        r["speedup"] = r["tok_s"] / base_tps
        r["itl_p99_over_1client_p50"] = r["itl_p99_ms"] / base_itl if base_itl else float("nan")
        r["provider"] = f"ours ({args.preset}, {device_name()})"
    if args.total:
        print(f"{total['requests']}-request run at {max(args.clients)} clients: completed {total['completed']}, "
              f"failed {total['failed']}, {total['tok_s']:.0f} tok/s")
    write_results("serve", rows, x="clients", y="tok_s", title=f"Serving, {args.preset} preset, greedy, "
                  f"max_tokens {args.max_tokens}, max_batch {args.max_batch}")


if __name__ == "__main__":
    main()
