"""`python -m llm.eval --checkpoint DIR --dataset NAME|PATH`: loss and perplexity (see llm.eval.perplexity)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from llm.config import DataConfig, run_main
from llm.eval.perplexity import EvalError, check_windows, dataset_stream, evaluate
from llm.loading import load_model
from llm.quant import GROUP_SIZES, make_scheme
from llm.runtime import pick_device, pick_dtype


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Loss and perplexity of a checkpoint over a dataset (--dataset), or "
                                            "lm-evaluation-harness task scores (--tasks; needs the eval extra).")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, a training --out-dir, or a HF model dir")
    p.add_argument("--dataset", default=None, help="perplexity over a corpus name (pystdlib) or a text file / folder")
    p.add_argument("--split", default="val", choices=("val", "train", "all"),
                   help="with --dataset: val = the documents the trainer holds out and validates on (by "
                        "--val-fraction, the trainer's rule); train = the others; all = the whole corpus in order")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                   help="with --dataset: the share of documents held out, as given to the trainer")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names or task YAML paths")
    p.add_argument("--limit", type=float, default=None, help="with --tasks: documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples per prompt")
    p.add_argument("--include-path", default=None, help="with --tasks: a folder of extra task YAMLs")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the stream")
    p.add_argument("--batch-size", type=int, default=None, help="windows (perplexity, default 1) or requests "
                                                                 "(tasks, default 16) per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--kernels", default=None, choices=("auto", "triton", "torch"), help="override the op backend")
    p.add_argument("--quantize", default=None, metavar="{int8,int4}", help="quantize the weights at load")
    p.add_argument("--group-size", type=int, default=64,
                   help=f"with --quantize int4: one of {', '.join(map(str, GROUP_SIZES))}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run_tasks(args: argparse.Namespace) -> int:
    """--tasks: lm-eval scores through our backend (llm.eval.harness), a table or --json."""
    try:
        from llm.eval import harness  # optional extra: imported only when asked for

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        harness.resolve_tasks(tasks, args.include_path)  # bad names fail before the model loads
        lm = harness.LLMEvalLM(args.checkpoint, args.device, args.dtype, args.batch_size or 16,
                               kernels=args.kernels)
        limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
        out = harness.run_tasks(lm, tasks, limit, args.num_fewshot, args.include_path)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "results": out["results"]}, default=float))
    else:
        print(harness.lm_utils.make_table(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (args.dataset is None) == (args.tasks is None):
        print("error: give --dataset NAME|PATH (perplexity) or --tasks NAMES (lm-eval), one of them", file=sys.stderr)
        return 2
    if args.tasks is not None:
        return run_tasks(args)
    try:
        if args.max_tokens is not None and args.max_tokens < 2:
            raise EvalError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        overrides = {"kernels": args.kernels} if args.kernels else {}
        scheme = make_scheme(args.quantize, args.group_size) if args.quantize else None
        model, tok, _ = load_model(args.checkpoint, device, dtype, quantize=scheme, **overrides)
        check_windows(model, args.context, args.stride)
        ids, n_bytes = dataset_stream(args.dataset, tok, args.max_tokens, args.split, args.val_fraction)
        res = evaluate(model, ids, args.context, args.stride, args.batch_size or 1, n_bytes,
                       progress=not args.json and sys.stderr.isatty())
    except (ValueError, OSError) as e:  # the project's error classes are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split,
                          **asdict(res)}))
    else:
        bpb = f" | {res.bits_per_byte:.4f} bits/byte" if res.bits_per_byte is not None else ""
        print(f"{args.dataset} ({_split_name(args)}): {res.tokens:,} tokens in {res.windows} window(s) "
              f"(context {res.context}, stride {res.stride}) | loss {res.loss:.4f} nats/token | "
              f"perplexity {res.perplexity:.3f}{bpb}")
    return 0


def _split_name(args: argparse.Namespace) -> str:
    return {"val": f"val split: the {args.val_fraction:g} held out, as the trainer validates",
            "train": "train split", "all": "every document"}[args.split]


if __name__ == "__main__":
    run_main(main)
