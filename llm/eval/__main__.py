"""`python -m llm.eval --checkpoint DIR --dataset NAME|PATH`: loss and perplexity (see llm.eval.perplexity)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from llm.eval.perplexity import EvalError, check_windows, dataset_stream, evaluate
from llm.loading import load_model
from llm.quant import GROUP_SIZES, make_scheme
from llm.runtime import pick_device, pick_dtype


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Loss and perplexity of a checkpoint over a dataset.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, a training --out-dir, or a HF model dir")
    p.add_argument("--dataset", required=True, help="corpus name (pystdlib) or a text file / folder")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the stream")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"), help="override the op backend")
    p.add_argument("--quantize", default=None, metavar="{int8,int4}", help="quantize the weights at load")
    p.add_argument("--group-size", type=int, default=64,
                   help=f"with --quantize int4: one of {', '.join(map(str, GROUP_SIZES))}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.max_tokens is not None and args.max_tokens < 2:
            raise EvalError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        scheme = make_scheme(args.quantize, args.group_size) if args.quantize else None
        model, tok, _ = load_model(args.checkpoint, device, dtype, quantize=scheme, **overrides)
        check_windows(model, args.context, args.stride)
        ids, n_bytes = dataset_stream(args.dataset, tok, args.max_tokens)
        res = evaluate(model, ids, args.context, args.stride, args.batch_size, n_bytes,
                       progress=not args.json and sys.stderr.isatty())
    except (ValueError, OSError) as e:  # the project's error classes are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": args.dataset, **asdict(res)}))
    else:
        bpb = f" | {res.bits_per_byte:.4f} bits/byte" if res.bits_per_byte is not None else ""
        print(f"{args.dataset}: {res.tokens:,} tokens in {res.windows} window(s) (context {res.context}, "
              f"stride {res.stride}) | loss {res.loss:.4f} nats/token | perplexity {res.perplexity:.3f}{bpb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
