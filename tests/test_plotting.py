"""The plotting rules (llm/plotting.py) on small tables, and the committed benchmark results: every PNG redraws
from its CSV + plot spec (`python -m benchmarks.replot`), and no committed result names a machine path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from benchmarks import replot  # noqa: E402
from llm.plotting import PlotSpec, add_legend, render, wrap  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def bars(ax) -> list:
    return [b for c in ax.containers if isinstance(c, BarContainer) for b in c]


def test_one_numeric_x_value_is_bars_of_the_series_and_real_x_values_are_lines():
    one = [{"case": "tiny", "prompt": 128, "provider": p, "tok_s": v} for p, v in (("ours", 5.0), ("hf", 4.0))]
    fig, (ax,) = render(one, PlotSpec(x="prompt", y="tok_s", series="provider", panels="case",
                                      xlabel="prompt (tokens)", ylabel="tokens/s"))
    assert [b.get_height() for b in bars(ax)] == [5.0, 4.0] and not ax.lines
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ours", "hf"]
    assert ax.get_title() == "tiny, prompt 128 tokens" and ax.get_ylim()[0] == 0
    plt.close(fig)

    sweep = [{"N": n, "provider": p, "ms": n * k} for n in (1024, 2048, 4096, 8192, 16384)
             for p, k in (("triton", 1.0), ("torch", 1.0))]  # two series on the same points
    fig, (ax,) = render(sweep, PlotSpec(x="N", y="ms", series="provider", xlabel="rows N", ylabel="time (ms)"))
    assert len(ax.lines) == 2 and not bars(ax) and ax.get_xscale() == "log"
    a, b = ax.lines
    assert a.get_marker() != b.get_marker() and a.get_markersize() > b.get_markersize()  # the lower one shows
    assert a.get_markerfacecolor() == "none"
    assert ax.get_ylim()[0] == 0  # a time from 0, not from its smallest value
    plt.close(fig)


def test_categories_are_bars_even_when_numeric_and_losses_may_leave_zero():
    seeds = [{"seed": s, "gap": g} for s, g in ((1337, -0.01), (1338, 0.02))]
    fig, (ax,) = render(seeds, PlotSpec(x="seed", y="gap", series="seed", kind="bars"))
    assert len(bars(ax)) == 2 and [list(line.get_ydata()) for line in ax.lines] == [[0, 0]]  # the y=0 rule only
    plt.close(fig)
    uneven = [{"n": 1, "what": "a", "v": 1.0}, {"n": 1, "what": "b", "v": 2.0}, {"n": 2, "what": "c", "v": 3.0}]
    fig, (ax,) = render(uneven, PlotSpec(x="n", y="v", series="what", kind="bars"))
    lone = [b for b in bars(ax) if b.get_height() == 3.0][0]
    assert abs(lone.get_x() + lone.get_width() / 2 - 1) < 1e-9  # centred on its tick: no slots for a, b
    plt.close(fig)
    steps = [{"step": s, "loss": 7.0 - s / 300, "split": "train"} for s in range(10, 610, 10)]
    fig, (ax,) = render(steps, PlotSpec(x="step", y="loss", series="split", zero=False))
    assert ax.get_xscale() == "linear" and ax.get_ylim()[0] > 4  # steps are not geometric; a loss need not show 0
    assert ax.lines[0].get_marker() in ("None", None, "")  # a dense curve has no markers
    plt.close(fig)


def test_long_titles_wrap_and_the_legend_lists_only_drawn_series_under_its_name():
    rows = [{"x": x, "run": r, "y": (None if r == "empty" else x)} for x in (1, 2, 3) for r in ("a", "b", "empty")]
    title = "a long title that would run into the next panel's title if it did not wrap " * 3
    fig, axes = render(rows, PlotSpec(x="x", y="y", series="run", title=title, legend="run name"))
    assert "\n" in fig.get_suptitle()
    add_legend(fig, axes, "run name")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"] and legend.get_title().get_text() == "run name"
    plt.close(fig)


def test_every_committed_png_redraws_from_its_csv_and_spec(tmp_path):
    pngs = sorted(RESULTS.rglob("*.png"))
    assert pngs, "no committed result PNGs"
    assert replot.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in pngs)


def test_replot_refuses_a_png_without_a_spec(tmp_path, capsys):
    (tmp_path / "lonely.png").write_bytes(b"")
    assert replot.main([str(tmp_path)]) == 1
    assert "error: no <name>.plot.json for" in capsys.readouterr().err


def test_no_committed_result_names_a_machine_path():
    tracked = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    paths = [ROOT / p for p in tracked] or sorted(RESULTS.rglob("*"))
    found = []
    for p in paths:
        if p.suffix in (".csv", ".md", ".json", ".txt") and p.is_file():
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if re.search(r"(?<![\w.])/(work|tmp|home|root)/", line):
                    found.append(f"{p.relative_to(ROOT)}:{i}: {line[:120]}")
    assert not found, "machine paths in committed results (keep a short name):\n" + "\n".join(found)



def test_write_results_keeps_the_spec_that_replot_redraws_from(tmp_path, monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [{"provider": p, "tok_s": v, "same": True} for p, v in (("ours", 2.5), ("hf", 2.0))]
    out = common.write_results("demo", rows, x="provider", y="tok_s", title="demo", ylabel="tokens/s")
    assert {p.name for p in out.iterdir()} == {"demo.csv", "demo.md", "demo.plot.json", "demo.png"}
    spec = PlotSpec.from_json((out / "demo.plot.json").read_text())
    assert (spec.x, spec.y, spec.ylabel, spec.series) == ("provider", "tok_s", "tokens/s", "provider")
    assert replot.main([str(out / "demo.plot.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "demo.png").stat().st_size > 0


@pytest.mark.parametrize("text,width,want", [
    ("int8+emb+compile", 10, "int8+emb+\ncompile"),  # after a joiner, not "int8+emb+c\nompile"
    ("a long title that would run into", 20, "a long title that\nwould run into"),
    ("q4_0/llama.cpp ours", 11, "q4_0/\nllama.cpp\nours"),
    ("max_batch 32, max_step_tokens 256", 24, "max_batch 32,\nmax_step_tokens 256"),  # identifiers stay whole
    ("minus distilled (nats/token)", 20, "minus distilled\n(nats/token)"),  # a word that fits moves whole
    ("x" * 20, 8, "xxxxxxxx\nxxxxxxxx\nxxxx"),  # a run longer than a line still fits the width
])
def test_wrap_breaks_compound_labels_after_their_joiners(text, width, want):
    out = wrap(text, width)
    assert out == want and all(len(line) <= width for line in out.split("\n"))
