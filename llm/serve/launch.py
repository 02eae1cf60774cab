"""Build and run the server: flags -> a loaded model -> engine, scheduler, app -> uvicorn.

`build` wires a model into an app (tests and the benchmark use it with a model in memory);
`ThreadedServer` runs one on 127.0.0.1 in a background thread; `main` is `python -m llm.serve`.
SIGTERM (or Ctrl-C): admission stops at once (new requests get 503), running and queued requests
finish for up to --drain-timeout seconds, the rest are cancelled, then the process exits.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import sys
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from llm.checkpoint import BEST, LATEST
from llm.loading import adapter_on_shared_base, load_model
from llm.model import Transformer
from llm.runtime import first_line, pick_device, pick_dtype, set_threads
from llm.serve.app import create_app
from llm.serve.captured import batch_buckets
from llm.serve.engine import Engine
from llm.serve.scheduler import Scheduler
from llm.serve.templates import ChatFormat, read_template
from llm.weights16 import FORMATS, check_weights, to_w16


def build(model: Transformer, tok, model_name: str = "llm", max_batch: int = 16, max_queue: int = 64,
          block_size: int = 16, num_blocks: int | None = None, max_step_tokens: int = 256,
          api_key: str | None = None, drain_timeout: float = 30.0,
          chat: ChatFormat | None = None, prefix_cache: bool = True, ui: bool = True,
          adapters: dict[str, Transformer] | None = None, compile: bool = False,
          compile_buckets: list[int] | None = None) -> tuple[FastAPI, Scheduler]:
    """(app, scheduler) over a block pool of num_blocks (default: every row of a full batch at full context);
    chat: how chat requests are rendered (default: the tokenizer's template, else the plain one). A prefix-tuned
    model's prefix takes ceil(P / block_size) blocks of the pool (the default adds them) and P of its positions.
    compile: decode-only steps run through the captured step (`llm.serve.captured`), compiled or captured for
    every batch bucket (compile_buckets, default 1, 2, 4, ... max_batch) here, before the app exists
    (`sched.engine.captured.describe()` says how long it took)."""
    ctx = model.n_positions  # the context less a prefix's rows
    P = model.cfg.block_size - ctx
    n_blocks = num_blocks or max_batch * -(-model.cfg.block_size // block_size) + -(-P // block_size)
    if max_step_tokens < max_batch:
        raise ValueError(f"--max-step-tokens ({max_step_tokens}) must be >= --max-batch ({max_batch}): every "
                         "running decode takes one token of a step's budget")
    pool = model.new_pool(n_blocks, block_size, scratch=compile)
    engine = Engine(model, tok, pool, max_step_tokens, prefix_cache, adapters, compile_batch=max_batch * compile,
                    compile_buckets=compile_buckets)
    engine.warmup()
    sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
    app = create_app(sched, tok, model_name, ctx, api_key=api_key, drain_timeout=drain_timeout, chat=chat, ui=ui)
    return app, sched


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM / Ctrl-C drains before uvicorn stops listening.

    The signal stops admission at once; the socket stays open, so a new request gets 503 (not a refused
    connection) while the running and queued requests finish for up to drain_timeout s (the rest are
    cancelled); then uvicorn shuts down as usual. A second signal exits without waiting.
    """

    def __init__(self, config: uvicorn.Config, sched: Scheduler, drain_timeout: float = 30.0) -> None:
        super().__init__(config)
        self.sched, self.drain_timeout = sched, drain_timeout
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._draining is not None:  # a second signal: stop now
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.sched.stop_admission()

        def drain() -> None:
            self.sched.shutdown(self.drain_timeout)
            super(DrainingServer, self).handle_exit(sig, frame)

        self._draining = threading.Thread(target=drain, name="llm-serve-drain", daemon=True)
        self._draining.start()


class ThreadedServer:
    """The app on 127.0.0.1:port in a daemon thread (tests, benchmarks); `stop()` drains and joins."""

    def __init__(self, app: FastAPI, sched: Scheduler, port: int | None = None, drain_timeout: float = 5.0) -> None:
        self.sched, self.port, self.drain_timeout = sched, port or free_port(), drain_timeout
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                             timeout_graceful_shutdown=int(drain_timeout))
        self.server = DrainingServer(cfg, sched, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, name="llm-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.sched.start()
        self.thread.start()
        for _ in range(400):  # up to 20 s for the socket
            if self.server.started:
                return self
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            threading.Event().wait(0.05)
        raise RuntimeError("the server did not start within 20 s")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.sched.stop_admission()
        self.server.should_exit = True
        self.thread.join(timeout=self.drain_timeout + 10)
        self.sched.shutdown(self.drain_timeout)


def model_id(checkpoint: str | Path) -> str:
    """The id clients send as `model`: the run's name for a training out-dir, its `latest`/`best` pointer or one
    of its ckpt-NNNNNNN dirs (`out/latest` -> `out`), else the directory's own name (a Hugging Face model dir)."""
    p = Path(checkpoint).resolve()
    if p.name in (LATEST, BEST) and p.is_file():
        return p.parent.name
    if re.fullmatch(r"ckpt-\d+", p.name) and ((p.parent / LATEST).is_file() or (p.parent / BEST).is_file()):
        return p.parent.name
    return p.name


def parse_loras(pairs: list[str]) -> dict[str, str]:
    """--lora NAME=DIR flags -> {name: dir}; a malformed or repeated one is a ValueError (one line)."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--lora {pair!r}: give NAME=DIR")
        if name in out:
            raise ValueError(f"--lora {name}: given twice")
        if not Path(directory).exists():
            raise ValueError(f"--lora {name}={directory}: no such directory")
        out[name] = directory
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="An OpenAI-compatible server (completions, chat) with continuous batching.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, training out-dir, or Hugging Face model dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: the run's name, "
                   "e.g. `out` for --checkpoint out/latest, or the directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; beyond it 429")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health "
                   "and the chat page at / (which asks for the key)")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (default: max-batch rows at "
                   "full context)")
    p.add_argument("--max-step-tokens", type=int, default=256,
                   help="tokens one step feeds the model (vLLM's max_num_batched_tokens): every running decode "
                   "first, then prefill chunks in what is left; >= --max-batch")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja2 chat template for /v1/chat/completions (default: the model's own; a model without "
                   "one gets a plain 'System:/User:/Assistant:' text)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (a LoRA run's checkpoint or out-dir) over the base as model NAME "
                   "(repeatable); requests pick it with \"model\": NAME; it shares the base's weights, and rows of "
                   "different adapters and of the base run in one forward (each row with its own adapter)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at GET /")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off automatic prefix caching (reusing the KV blocks of prompts that start alike)")
    p.add_argument("--compile", action="store_true",
                   help="capture the decode step: steps of decode rows only run at batch buckets 1, 2, 4, ... "
                   "--max-batch (rows padded to the bucket) through torch.compile on the CPU, CUDA graphs on CUDA; "
                   "every bucket is compiled at start (seconds to tens of seconds each on a CPU), never per request. "
                   "With --lora each row's adapter is one more input of the compiled step. Not with a "
                   "mixture-of-experts model")
    p.add_argument("--compile-buckets", type=int, nargs="+", default=None, metavar="N",
                   help="with --compile: the batch sizes to compile (default 1 2 4 ... --max-batch); a decode step "
                   "is padded to the smallest that holds it, one with more rows than the largest runs eagerly")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get after SIGTERM")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"))
    p.add_argument("--weights", default=None, choices=tuple(FORMATS),
                   help="CPU: keep the linears' weights in 16 bits and compute in fp32 (decode reads half the "
                        "bytes; llm.weights16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.max_batch < 1 or args.max_queue < 0 or args.kv_block_size < 1 or args.max_step_tokens < 1:
            raise ValueError("--max-batch, --kv-block-size and --max-step-tokens must be >= 1, --max-queue >= 0")
        if args.max_step_tokens < args.max_batch:
            raise ValueError(f"--max-step-tokens ({args.max_step_tokens}) must be >= --max-batch ({args.max_batch})")
        template = read_template(args.chat_template) if args.chat_template else None  # checked before loading
        loras = parse_loras(args.lora)
        if args.compile_buckets and not args.compile:
            raise ValueError("--compile-buckets needs --compile")
        if args.compile_buckets and (min(args.compile_buckets) < 1 or max(args.compile_buckets) > args.max_batch):
            raise ValueError(f"--compile-buckets: give batch sizes from 1 to --max-batch ({args.max_batch})")
        set_threads(args.threads)
        device = pick_device(args.device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        dtype = pick_dtype(args.dtype, device)
        check_weights(args.weights, device, dtype, lora=loras or None)
        model, tok, _ = load_model(args.checkpoint, device, dtype, **overrides)
        if args.weights:
            model = to_w16(model, args.weights)
        if model.prefix is not None and loras:
            raise ValueError(f"{args.checkpoint} is prefix-tuned: --lora adapters are served over a plain base only "
                             "(the server holds one prefix, the checkpoint's)")
        if args.compile and model.cfg.n_experts:
            raise ValueError("--compile: a mixture-of-experts model routes tokens with data-dependent shapes; its "
                             "decode step is not compiled or captured (serve it without --compile)")
        chat = ChatFormat(tok, template, f"the chat template from {args.chat_template}" if template else "")
        adapters = {n: adapter_on_shared_base(model, d) for n, d in loras.items()}
    except (ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    name = args.model_name or model_id(args.checkpoint)
    if name in adapters:
        print(f"error: --lora {name}=...: the name is the base model's id; pick another", file=sys.stderr)
        return 2
    if args.compile:
        what = "capturing CUDA graphs of" if device.type == "cuda" else "compiling"
        buckets = sorted(set(args.compile_buckets)) if args.compile_buckets else batch_buckets(args.max_batch)
        print(f"{what} the decode step for batch buckets {', '.join(map(str, buckets))} ...",
              file=sys.stderr, flush=True)
    try:
        app, sched = build(model, tok, name, args.max_batch, args.max_queue, args.kv_block_size, args.num_blocks,
                           args.max_step_tokens, args.api_key, args.drain_timeout, chat, not args.no_prefix_cache,
                           not args.no_ui, adapters, compile=args.compile, compile_buckets=args.compile_buckets)
    except ValueError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    cfg = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                         timeout_graceful_shutdown=int(args.drain_timeout))
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it caught once it has stopped:
        signal.signal(sig, lambda *_: None)  # let that be a no-op, so the drain below runs and we exit 0
    sched.start()
    ui = "" if args.no_ui else f", chat page http://{args.host}:{args.port}/"
    print(f"serving model id '{name}' on http://{args.host}:{args.port}/v1{ui} (max batch {args.max_batch}, "
          f"{sched.pool.n_blocks} KV blocks of {args.kv_block_size}, prefix cache "
          f"{'off' if args.no_prefix_cache else 'on'})\n{chat.describe()}"
          + "".join(f"\nLoRA adapter '{n}' from {d}" for n, d in loras.items())
          + (f"\nprefix-tuned: {sched.engine.prefix_rows} prefix rows in {len(sched.engine.head)} KV block(s) "
             f"every request starts with; context {model.n_positions} tokens" if sched.engine.prefix_rows else "")
          + (f"\n{sched.engine.captured.describe()}" if sched.engine.captured is not None else ""),
          file=sys.stderr, flush=True)
    DrainingServer(cfg, sched, args.drain_timeout).run()
    sched.shutdown(args.drain_timeout)
    return 0
