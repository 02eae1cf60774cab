"""The command line of sample.py: flags -> sampling parameters -> a loaded model -> printed text."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llm.chat import prompt_ids
from llm.config import HelpFormatter
from llm.generate.api import complete, encode_prompts, prompt_ids_of, stream_text
from llm.generate.decode import CPU_CHUNK, DEFAULT_NEW_TOKENS, fit_prompts, room_for_new
from llm.generate.sampling import SamplingError, SamplingParams
from llm.generate.speculative import Speculation, check_tokenizers
from llm.generate.stats import Stats
from llm.loading import load_model
from llm.quant import GROUP_SIZES, make_scheme
from llm.runtime import pick_device, pick_dtype, set_threads
from llm.weights16 import FORMATS, check_weights, to_w16


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm sample", formatter_class=HelpFormatter,
                                description="Generate text from a checkpoint directory (or a training out dir).")
    g = p.add_argument_group("model and checkpoint")
    g.add_argument("--checkpoint", required=True, help="checkpoint dir, or a training --out-dir (uses its latest)")
    g.add_argument("--peft", "--lora", dest="lora", default=None, metavar="DIR",
                   help="apply the PEFT adapter in DIR (a LoRA, prefix-tuning or bottleneck-adapter run's checkpoint "
                        "or out dir) to --checkpoint, unmerged (a prefix fills the first rows of the KV cache)")
    g.add_argument("--quantize", default=None, metavar="{int8,int4}",
                   help="quantize the weights at load (weight-only; see llm quantize)")
    g.add_argument("--group-size", type=int, default=64,
                   help=f"with --quantize int4: inputs per scale group, one of {', '.join(map(str, GROUP_SIZES))}")
    g.add_argument("--weights", default=None, choices=tuple(FORMATS),
                   help="CPU: keep the linears' weights in 16 bits and compute in fp32; decode reads half of fp32's "
                        "bytes (f16 rounds each weight to 11 significant bits, bf16 to 8; see docs/inference.md)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"), help="override the op backend")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", action="append", default=None,
                   help="text to continue (empty: start from end-of-text); repeat for a batch of prompts")
    g.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one more prompt")
    g.add_argument("--chat", action="store_true",
                   help="chat with the model through its chat template: each --prompt is one user turn; without "
                        "--prompt, an interactive multi-turn session (streamed; an empty line or Ctrl-D ends it)")
    g.add_argument("--system", default=None, help="with --chat: a system message opening the conversation")
    g.add_argument("--truncate-prompt", action="store_true",
                   help="keep only the last prompt tokens that fit the context instead of refusing")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate per row (default: up to {DEFAULT_NEW_TOKENS}, fewer when the context "
                        "leaves less room after the prompt; the timing line says how many)")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature; 0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="divide logits of seen tokens (1 = off)")
    g.add_argument("--num-samples", type=int, default=1, help="samples per prompt (with beams: best beams shown)")
    g.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[],
                   help=r"stop a row at this string (repeatable; \n \t \r \\ are understood)")
    g = p.add_argument_group("beam search")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1 = sampling)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob sum / length^this")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft-checkpoint", default=None,
                   help="speculative decoding: a small model with the same tokenizer drafts, the target verifies")
    g.add_argument("--draft-quant", default=None, choices=("int8", "int4"),
                   help="speculative decoding whose draft is a quantized model (weight-only, as llm quantize): the "
                        "target's own weights (quantized self-speculation: no second checkpoint; an int8 draft agrees "
                        "with the target on most tokens and reads a quarter of fp32's weight bytes), or the "
                        "--draft-checkpoint model; int4 uses --group-size. Greedy output is the target's")
    g.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="speculative decoding without a second model: draft what followed the last <= N tokens "
                        "where they occur earlier in the prompt or output")
    g.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="tokens drafted per target pass (default 4 with a draft model / --prompt-lookup)")
    g.add_argument("--compare-plain", action="store_true",
                   help="with speculative decoding: also run plain decoding and print both speeds")
    g = p.add_argument_group("decoding speed")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"prompt tokens per prefill pass; 0 = one pass (default: one pass on CUDA, {CPU_CHUNK} on CPU)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each decode step as one captured CUDA graph")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (static shapes; seconds to minutes to compile once per "
                        "batch and length, then the fastest CPU path); with a draft model (speculative decoding) "
                        "the draft's passes are compiled and the target's verify pass stays eager")
    g = p.add_argument_group("output")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated (one row)")
    g.add_argument("--quiet", action="store_true", help="print only the generated text (no timing line)")
    return p


def _check_args(args: argparse.Namespace) -> SamplingParams:
    """Sampling parameters from the flags; contradictory flags are refused in one line."""
    if args.num_samples < 1:
        raise SamplingError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_beams < 1:
        raise SamplingError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams > 1:
        given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                ("--top-p", args.top_p), ("--min-p", args.min_p)) if v is not None]
        if given:
            raise SamplingError(f"beam search is deterministic: {', '.join(given)} do not apply with --num-beams > 1")
        if args.num_samples > args.num_beams:
            raise SamplingError(f"--num-samples ({args.num_samples}) shows the best beams: at most --num-beams "
                                f"({args.num_beams})")
        if args.draft_checkpoint is not None or args.prompt_lookup is not None or args.draft_quant is not None:
            raise SamplingError("speculative decoding samples one sequence per row: it does not combine with "
                                "--num-beams > 1")
        return SamplingParams(0.0, repetition_penalty=args.repetition_penalty)
    draft = args.draft_checkpoint is not None or args.draft_quant is not None
    speculative = draft or args.prompt_lookup is not None
    if draft and args.prompt_lookup is not None:
        given = "--draft-checkpoint" if args.draft_checkpoint is not None else "--draft-quant"
        raise SamplingError(f"{given} (a draft model) and --prompt-lookup are two proposers: give one")
    if not speculative and (args.speculate is not None or args.compare_plain):
        raise SamplingError("--speculate / --compare-plain need a proposer: --draft-checkpoint DIR, --draft-quant "
                            "int8|int4 or --prompt-lookup N")
    if args.prompt_lookup is not None and args.compile:
        raise SamplingError("prompt lookup drafts without a model: --compile (which compiles a draft model's step) "
                            "does not apply")
    temperature = 0.8 if args.temperature is None else args.temperature
    return SamplingParams(temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        params = _check_args(args)
        texts = list(args.prompt or []) + [_read(f) for f in args.prompt_file]
        texts = texts or [""]
        if args.stream and (len(texts) * args.num_samples > 1 or args.num_beams > 1):
            raise SamplingError("--stream prints one sequence: use one prompt, --num-samples 1, --num-beams 1")
        if args.max_new_tokens is not None:
            fit_prompts([[0]], args.max_new_tokens, 1 << 62)  # max_new_tokens >= 1, before loading anything
        set_threads(args.threads)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        if args.system is not None and not args.chat:
            raise SamplingError("--system needs --chat")
        scheme = make_scheme(args.quantize, args.group_size) if args.quantize else None
        check_weights(args.weights, device, dtype, args.quantize, args.lora)
        model, tok, _ = load_model(args.checkpoint, device, dtype, quantize=scheme, lora=args.lora, **overrides)
        if args.weights:
            model = to_w16(model, args.weights)
        spec = _speculation(args, model, tok, device, dtype, overrides)
        context = min([model.n_positions] + ([spec.draft.cfg.block_size] if spec and spec.draft else []))
        interactive = args.chat and not (args.prompt or args.prompt_file)
        prompts = [chat_prompt(tok, t, args.system) for t in texts] if args.chat else texts
        n_new, note = args.max_new_tokens, ""
        if n_new is None and not interactive:
            n_new = room_for_new(prompt_ids_of(tok, prompts), context, args.truncate_prompt)
            note = (f"max-new-tokens {n_new}: " + (f"the room the context ({context}) leaves after the prompt"
                                                    if n_new < DEFAULT_NEW_TOKENS else "the default"))
        if not interactive:
            ids = encode_prompts(tok, prompts, n_new, context, args.truncate_prompt)
            if not args.quiet and not args.chat:
                for t, i in zip(texts, ids):
                    if len(i) < len(tok.encode(t, bos=tok.add_bos)):
                        print(f"note: prompt truncated to its last {len(i)} tokens to fit the context",
                              file=sys.stderr)
        mode = "compile" if args.compile else "graph" if device.type == "cuda" and args.cuda_graph else "eager"
        mode = "eager" if spec else mode
        stats = Stats(note=note)
        kw = dict(params=params, stop=[_unescape(s) for s in args.stop], num_samples=args.num_samples,
                  truncate_prompt=args.truncate_prompt, seed=args.seed, prefill_chunk=args.prefill_chunk, stats=stats)
        if spec:
            kw["speculative"] = spec
        if interactive:
            chat_loop(model, tok, args.system, n_new, mode=mode, **kw)
            return 0
        if args.stream:
            if not args.quiet:
                print(texts[0], end="\n" if args.chat else "", flush=True)
            for _, piece in stream_text(model, tok, prompts, n_new, mode=mode, **kw):
                print(piece, end="", flush=True)
            print()
        else:
            comps = complete(model, tok, prompts, n_new, num_beams=args.num_beams, mode=mode,
                             length_penalty=args.length_penalty, **kw)
            per_prompt = len(comps) // len(texts)
            for r, c in enumerate(comps):
                if not args.quiet and len(comps) > 1:
                    print(f"--- prompt {r // per_prompt + 1}, sample {r % per_prompt + 1} ({c.finish_reason}) ---")
                # a chat answer starts on its own line; a plain completion continues its prompt
                print(c.text if args.quiet else texts[r // per_prompt] + ("\n" if args.chat else "") + c.text)
    except (SamplingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(stats.line(), file=sys.stderr)
        if stats.target_passes:
            print(stats.spec_line(), file=sys.stderr)
    if args.compare_plain:
        plain = Stats()
        complete(model, tok, prompts, n_new, mode="compile" if args.compile else None,
                 **(kw | dict(speculative=None, stats=plain)))
        a, b = stats.decode_tok_s, plain.decode_tok_s
        ratio = f" | speculative x{a / b:.2f}" if a and b else ""
        print(f"--- plain decoding: {plain.line()[4:]}{ratio}", file=sys.stderr)
    return 0


def chat_prompt(tok, text: str, system: str | None, history: list[dict] | None = None) -> list[int]:
    """The ids of a conversation (system, history, then `text` as the user turn) up to the assistant's opening."""
    msgs = ([{"role": "system", "content": system}] if system else []) + (history or [])
    return prompt_ids(tok, msgs + [{"role": "user", "content": text}])


def chat_loop(model, tok, system: str | None, max_new_tokens: int | None, **kw) -> None:
    """Interactive chat on stdin/stdout: each line is a user turn, the answer streams back; history is kept.

    max_new_tokens None: each answer gets up to the room the context leaves after the conversation so far."""
    history: list[dict] = []
    limit = (f"answers up to {max_new_tokens} tokens" if max_new_tokens is not None else
             f"answers up to {DEFAULT_NEW_TOKENS} tokens or the room the context ({model.n_positions}) leaves")
    print(f"chat: type a message; an empty line or Ctrl-D ends the session ({limit})", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        ids = chat_prompt(tok, text, system, history)
        block = model.n_positions
        want = max_new_tokens or min(DEFAULT_NEW_TOKENS, block // 4)
        while history and block - len(ids) < want:  # the oldest exchange leaves the window first
            history = history[2:]
            ids = chat_prompt(tok, text, system, history)
            print("note: the oldest exchange left the conversation to fit the context", file=sys.stderr)
        n = max_new_tokens if max_new_tokens is not None else room_for_new([ids], block)
        answer = ""
        for _, piece in stream_text(model, tok, [ids], n, **kw):
            answer += piece
            print(piece, end="", flush=True)
        print()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def _speculation(args: argparse.Namespace, model, tok, device, dtype, overrides: dict) -> Speculation | None:
    """The proposer the flags ask for; a draft checkpoint must share the target's tokenizer."""
    k = 4 if args.speculate is None else args.speculate
    if args.prompt_lookup is not None:
        return Speculation(k, lookup=args.prompt_lookup)
    if args.draft_checkpoint is None and args.draft_quant is None:
        return None
    scheme = make_scheme(args.draft_quant, args.group_size) if args.draft_quant else None
    if args.draft_checkpoint is None:  # quantized self-speculation: the target's checkpoint (and adapter) quantized
        draft, _, _ = load_model(args.checkpoint, device, dtype, quantize=scheme, lora=args.lora, **overrides)
        return Speculation(k, draft=draft, compile_draft=args.compile)
    draft, draft_tok, _ = load_model(args.draft_checkpoint, device, dtype, quantize=scheme, **overrides)
    check_tokenizers(tok, draft_tok)
    return Speculation(k, draft=draft, compile_draft=args.compile)


def _unescape(s: str) -> str:
    r"""'\n' typed in a shell is backslash-n: turn \n \t \r \\ into the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], s)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SamplingError(f"cannot read prompt file {path}: {e.strerror or e}") from None
