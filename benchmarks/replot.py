"""Redraw benchmark PNGs from the committed results, without re-running any benchmark.

Each result <name>.csv has a <name>.plot.json next to it (written by benchmarks/common.py `write_results`:
the PlotSpec of llm/plotting.py); this draws <name>.png from the two.

    python -m benchmarks.replot                          # every result under benchmarks/results/
    python -m benchmarks.replot benchmarks/results/x86_64/bench_decode.plot.json
    python -m benchmarks.replot --out /tmp/plots          # write the PNGs elsewhere

A PNG under the folders given that has no spec is an error (it could not be redrawn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm.plotting import PlotSpec, draw, read_csv

RESULTS = Path(__file__).resolve().parent / "results"


def specs_under(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(the plot specs given or found under the folders given, the PNGs under those folders with no spec)."""
    specs, orphans = [], []
    for p in paths:
        if p.is_dir():
            specs += sorted(p.rglob("*.plot.json"))
            orphans += [png for png in sorted(p.rglob("*.png"))
                        if not png.with_name(png.stem + ".plot.json").is_file()]
        else:
            specs.append(p)
    return specs, orphans


def replot(spec_path: Path, out: Path | None = None) -> Path:
    """Draw <name>.png from <name>.plot.json and <name>.csv (into `out` when given)."""
    name = spec_path.name.removesuffix(".plot.json")
    rows = read_csv(spec_path.with_name(name + ".csv"))
    return draw((out or spec_path.parent) / f"{name}.png", rows, PlotSpec.from_json(spec_path.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.replot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, default=[RESULTS],
                    help="<name>.plot.json files or folders to search (default: benchmarks/results)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to each CSV)")
    args = ap.parse_args(argv)
    for p in args.paths:
        if not p.exists():
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
        if p.is_file() and not p.name.endswith(".plot.json"):
            print(f"error: {p} is not a <name>.plot.json plot spec", file=sys.stderr)
            return 2
    specs, orphans = specs_under(args.paths)
    if orphans:
        print("error: no <name>.plot.json for " + ", ".join(str(p) for p in orphans) + " (cannot redraw them)",
              file=sys.stderr)
        return 1
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        print(f"drew {replot(spec, args.out)}")
    print(f"{len(specs)} plot(s) redrawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
