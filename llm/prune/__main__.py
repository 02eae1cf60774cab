"""`python -m llm.prune --checkpoint DIR|HF_DIR --out DIR` (`llm prune`): a pruned copy of a checkpoint.

Structured (the default): a smaller dense model, `--target-params N` or per axis (`--layers`, `--mlp-hidden`,
`--heads` / `--kv-heads` with GQA groups kept whole, `--n-embd`), ranked by activation importance on calibration text
(llm/prune/structured.py). Unstructured: `--sparsity S --method magnitude|wanda` or `--pattern 2:4`: the same shapes,
weights zeroed (llm/prune/unstructured.py; nothing runs faster). The output is a checkpoint directory of ours (written
to a temporary directory, then renamed) with its own config, read by sample.py, llm eval, the server, quantize, HF
export and `train.py --init-from` like any other; recover what pruning lost with
`train.py --init-from OUT --teacher CHECKPOINT` (docs/compression.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from llm import checkpoint as ckpt_io
from llm.config import ConfigError, run_main
from llm.loading import load_model
from llm.prune import calibrate, structured, unstructured

DEFAULT_CALIB = "pystdlib"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm prune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Prune a checkpoint: structured (a smaller dense model; the default) or "
                                            "unstructured / 2:4 (weights zeroed). Recover with train.py --init-from "
                                            "OUT --teacher CHECKPOINT.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, a training --out-dir, or a HF model dir")
    p.add_argument("--out", required=True, help="the pruned checkpoint directory to write (must not exist)")
    s = p.add_argument_group("structured (a smaller dense model; give a target or any of the axes)")
    s.add_argument("--target-params", type=float, default=None,
                   help="total parameters to end at or below (e.g. 2e6): MLP hidden width and model width cut together")
    s.add_argument("--layers", type=int, default=None, help="blocks to keep (the least influential are dropped)")
    s.add_argument("--mlp-hidden", type=int, default=None, help="MLP hidden channels to keep per block")
    s.add_argument("--heads", type=int, default=None, help="query heads to keep (a multiple of n_head / n_kv_head)")
    s.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA groups) to keep")
    s.add_argument("--n-embd", type=int, default=None, help="model width (residual channels) to keep")
    u = p.add_argument_group("unstructured (same shapes, weights zeroed)")
    u.add_argument("--sparsity", type=float, default=None, help="share of every block linear's weights to zero")
    u.add_argument("--method", choices=("wanda", "magnitude"), default="wanda",
                   help="wanda: |W| * ||X|| per output row (calibrated); magnitude: |W| over the matrix")
    u.add_argument("--pattern", default=None, help="N:M semi-structured, e.g. 2:4 (keeps N of every M inputs)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-dataset", default=DEFAULT_CALIB, help="dataset name or path the activations come from")
    c.add_argument("--calib-tokens", type=int, default=32768, help="calibration tokens to read")
    return p


def _pattern(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--pattern {text!r}: give N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise ConfigError(f"--pattern {text}: need 0 < N < M")
    return n, m


def check(args: argparse.Namespace) -> None:
    """One ConfigError for settings that cannot work, before anything is loaded."""
    axes = [args.layers, args.mlp_hidden, args.heads, args.kv_heads, args.n_embd]
    unstructured_mode = args.sparsity is not None or args.pattern is not None
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise ConfigError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.sparsity is not None and args.pattern is not None:
        raise ConfigError("--pattern N:M sets the sparsity (N/M kept); drop --sparsity")
    _pattern(args.pattern)
    if unstructured_mode and (args.target_params is not None or any(a is not None for a in axes)):
        raise ConfigError("give either structured settings (--target-params / an axis) or unstructured ones "
                          "(--sparsity / --pattern), not both")
    if not unstructured_mode and args.target_params is None and all(a is None for a in axes):
        raise ConfigError("nothing to prune: give --target-params N, an axis (--layers, --mlp-hidden, --heads, "
                          "--kv-heads, --n-embd), or --sparsity S / --pattern 2:4")
    if args.target_params is not None and any(a is not None for a in axes):
        raise ConfigError("--target-params picks the axes itself: drop --layers / --mlp-hidden / --heads / "
                          "--kv-heads / --n-embd, or drop --target-params")
    if args.target_params is not None and args.target_params < 1:
        raise ConfigError(f"--target-params must be >= 1, got {args.target_params}")
    if args.calib_tokens < 1:
        raise ConfigError(f"--calib-tokens must be >= 1, got {args.calib_tokens}")
    if Path(args.out).exists():
        raise ConfigError(f"--out {args.out} exists; choose a new directory")


def run(args: argparse.Namespace, say=print) -> Path:
    check(args)
    model, tok, cfg = load_model(args.checkpoint, "cpu", torch.float32)
    if cfg.get("quantization"):
        raise ConfigError(f"{args.checkpoint} is quantized; prune the unquantized checkpoint, then quantize")
    if getattr(model, "prefix", None) is not None or cfg.get("lora"):
        raise ConfigError(f"{args.checkpoint} carries PEFT adapters; merge or export them first")
    mcfg = model.cfg
    if mcfg.n_experts:
        raise ConfigError("pruning a Mixture-of-Experts model is not supported yet (experts by router load); "
                          "prune a dense model")
    before = model.num_params()
    shape = None
    if args.sparsity is None and args.pattern is None:  # settle the target shape before calibrating
        shape = (structured.shape_for_target(mcfg, int(args.target_params)) if args.target_params is not None else
                 structured.check_shape(mcfg, args.layers, args.mlp_hidden, args.heads, args.kv_heads, args.n_embd))
    stats = None
    if shape is not None or args.method == "wanda":
        rows, got = calibrate.calibration_rows(args.calib_dataset, tok, mcfg.block_size, args.calib_tokens)
        if len(rows) == 0:
            raise ConfigError(f"--calib-dataset {args.calib_dataset}: {got} tokens, fewer than one row of "
                              f"{mcfg.block_size}")
        note = "" if got >= args.calib_tokens else f" (asked for {args.calib_tokens:,}: the text has only {got:,})"
        say(f"calibrating on {rows.numel():,} tokens of {args.calib_dataset}{note}")
        t0 = time.perf_counter()
        stats = calibrate.collect(model, rows)
        say(f"calibrated in {time.perf_counter() - t0:.1f}s")
    if shape is not None:
        say(f"structured: {shape.describe(mcfg)}")
        model = structured.prune(model, stats, shape)
        info = {"kind": "structured", "layers": shape.layers, "mlp_hidden": shape.mlp_hidden,
                "kv_heads": shape.kv_heads, "n_embd": shape.n_embd}
    else:
        pattern = _pattern(args.pattern)
        zero = unstructured.prune(model, stats, args.sparsity or 0.5, args.method, pattern)
        say(f"unstructured ({args.pattern or args.sparsity} {args.method if pattern is None or stats else 'magnitude'})"
            f": {100 * zero:.1f}% of the block linears' weights are zero (stored dense: same size, same speed)")
        info = {"kind": "unstructured", "sparsity": zero, "method": args.method, "pattern": args.pattern}
    info |= {"calib_dataset": args.calib_dataset, "calib_tokens": stats.tokens if stats else 0,
             "params_before": before, "params_after": model.num_params()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = ckpt_io.save(out.parent, out.name, model, tok, extra={"pruning": info, "pruned_from": str(args.checkpoint)},
                        pointer=None)
    size = (path / ckpt_io.MODEL_FILE).stat().st_size
    say(f"wrote {path}: {model.num_params():,} parameters ({100 * model.num_params() / before:.1f}% of {before:,}), "
        f"{size / 2**20:.2f} MiB of weights")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # the project's errors are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
