"""One way to draw the project's plots: benchmark results (benchmarks/common.py `write_results`,
`python -m benchmarks.replot`) and the trainer's loss.png / health.png.

The rules every figure follows:
  * categories (providers, variants, presets, a single x value) are bars; lines only join real numeric x values;
  * the y axis starts at 0 (ratios, throughputs, times) unless the spec says otherwise (losses), so a 10% gap
    looks like 10%;
  * titles and panel titles wrap to the figure's width, tick labels wrap (and tilt when there are many), so
    nothing collides or is clipped (constrained layout);
  * one legend per figure, outside the axes (it never covers data), titled with what the entries are, holding
    only series that drew a mark;
  * series that coincide stay visible: hollow markers shrinking from one series to the next, distinct markers
    and dash patterns;
  * every axis label is given by the caller and should carry the unit ("decode throughput (tokens/s)").

matplotlib is imported inside the drawing functions (Agg back end), so importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":")
PANEL_W, PANEL_H = 5.0, 3.6  # inches per panel
DENSE = 40  # a series with more points than this is drawn without markers


@dataclass
class PlotSpec:
    """What to draw from result rows: `y` against `x`, one mark per value of `series`, one panel per value of
    `panels`. kind: "auto" (lines when x is numeric with two or more values in a panel, else bars), "bars" or
    "lines". zero: the y axis includes 0 (False for losses). logx: None = automatic (positive numeric x spaced
    geometrically over 16x or more: log2 axis). legend: the legend's title (default: the series column's name).
    panel_label: words before each panel's value in its title ("checkpoint" -> "checkpoint out")."""

    x: str
    y: str
    series: str | None = None
    panels: str | None = None
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    legend: str = ""
    kind: str = "auto"
    zero: bool = True
    logx: bool | None = None
    logy: bool = False
    panel_label: str = ""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v != PlotSpec.default(k)}, indent=1) + "\n"

    @staticmethod
    def default(name: str) -> Any:
        return next(f.default for f in fields(PlotSpec) if f.name == name)

    @classmethod
    def from_json(cls, text: str) -> PlotSpec:
        return cls(**json.loads(text))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def wrap(text: str, width: int) -> str:
    """text broken into lines of at most `width` characters: on spaces where it can; a word longer than a line
    after the joiners of a compound label ("int8+emb+compile", "hf-16x1024/q4_0": after + / , =), and mid-word
    only for a run without joiners longer than a whole line."""
    width = max(width, 8)
    lines: list[str] = []
    cur = ""
    for word in str(text).split():
        pieces = [word] if len(word) <= width else re.split(r"(?<=[+/,=])", word)  # whole words move as one
        for j, piece in enumerate(pieces):
            sep = " " if j == 0 and cur else ""
            if cur and len(cur) + len(sep) + len(piece) > width:
                lines.append(cur)
                cur, sep = "", ""
            cur += sep + piece
            while len(cur) > width:  # one unbreakable run longer than a line
                lines.append(cur[:width])
                cur = cur[width:]
    return "\n".join(lines + [cur] if cur else lines) or str(text)


def style(i: int, n_points: int) -> dict:
    """Line style of the i-th series: distinct marker and dash, hollow markers that shrink with i so a point
    under another still shows as a ring around it; no markers on dense series (a training curve)."""
    s = {"linestyle": DASHES[i % len(DASHES)], "linewidth": 1.6}
    if n_points <= DENSE:
        s.update(marker=MARKERS[i % len(MARKERS)], markersize=max(4.0, 10.0 - 1.5 * i), markerfacecolor="none",
                 markeredgewidth=1.5)
    return s


def figure(n_panels: int, title: str, max_cols: int = 3, panel_w: float = PANEL_W):
    """(fig, axes): a grid of n_panels axes (at most max_cols per row, panel_w inches wide each) under a
    wrapped figure title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if n_panels == 4 else min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols + 0.6, PANEL_H * rows + 0.9), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(wrap(title, int(12 * panel_w * cols)), fontsize=11)
    return fig, flat[:n_panels]


def panel_title(ax, text: str) -> None:
    width = ax.get_figure().get_figwidth() / len(ax.get_gridspec().get_grid_positions(ax.get_figure())[2])
    ax.set_title(wrap(text, int(12 * width)), fontsize=9.5)


def finish(fig, axes: list, path: Path, legend: str) -> Path:
    """The figure's legend (`add_legend`), then the PNG at path; the figure is closed."""
    import matplotlib.pyplot as plt

    add_legend(fig, axes, legend)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_legend(fig, axes: list, title: str) -> None:
    """One legend for the figure, below the panels, titled `title`: an entry per labelled artist that drew
    something (each name once); none when nothing is labelled."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_"):
                handles.setdefault(label, h)
    if handles:  # as many columns as fit the figure's width (8.5 pt: ~12 characters an inch, plus the mark)
        per_entry = max(len(label) for label in handles) + 6
        ncols = max(1, min(len(handles), int(12 * fig.get_figwidth()) // per_entry))
        fig.legend(list(handles.values()), list(handles), title=title or None, loc="outside lower center",
                   ncols=ncols, fontsize=8.5, title_fontsize=9)


def _number_label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _value_with_unit(label: str, v: Any) -> str:
    """An axis label and one value of it as words: ("prompt (tokens)", 128) -> "prompt 128 tokens"."""
    name, _, unit = label.partition(" (")
    v = _number_label(v) if is_number(v) else v
    return f"{name} {v} {unit.removesuffix(')')}" if unit else f"{label} {v}"


def _distinct(values) -> list:
    """Values in order of first appearance, each once."""
    return list(dict.fromkeys(values))


def _bars(ax, rows: list[dict], spec: PlotSpec, cats_key: str, groups_key: str | None) -> None:
    """Grouped bars of spec.y: one group per value of cats_key, one bar per value of groups_key (one colour
    and legend entry each; None: one bar per group, no legend entry)."""
    cats = _distinct(r[cats_key] for r in rows)
    groups = _distinct(r[groups_key] for r in rows) if groups_key else [None]

    def value(c, g):
        vals = [r[spec.y] for r in rows if r[cats_key] == c and (g is None or r[groups_key] == g)
                and is_number(r[spec.y])]
        return vals[0] if vals else None

    # each category's bars side by side, only for the groups it has (no empty slots), centred on its tick
    present = {c: [g for g in groups if value(c, g) is not None] for c in cats}
    width = 0.8 / max([len(p) for p in present.values()] + [1])
    drawn = []
    for gi, g in enumerate(groups):
        xs, ys = [], []
        for ci, c in enumerate(cats):
            if g in present[c]:
                k, n = present[c].index(g), len(present[c])
                xs.append(ci + (k - (n - 1) / 2) * width)
                ys.append(value(c, g))
        if not xs:
            continue
        color = f"C{gi % 10}" if g is not None else "C0"
        bars = ax.bar(xs, ys, width=width * 0.95, color=color, label=str(g) if g is not None else "_",
                      edgecolor="black", linewidth=0.5)
        drawn.append(bars)
    n_bars = sum(len(b) for b in drawn)
    if n_bars <= 16:  # few enough bars to print each value on top
        for bars in drawn:
            ax.bar_label(bars, labels=[_number_label(b.get_height()) for b in bars], fontsize=7, padding=2)
    # horizontal tick labels, each wrapped to its category's share of the panel (8 pt: ~13 characters an inch)
    share = ax.get_figure().get_figwidth() / ax.get_gridspec().ncols / len(cats)
    ax.set_xticks(range(len(cats)), [wrap(c, int(13 * share)) for c in cats], fontsize=8)
    if any(b.get_height() < 0 for bars in drawn for b in bars):
        ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if n_bars <= 16:
        ax.margins(y=0.12)  # room for the value labels


def _lines(ax, rows: list[dict], spec: PlotSpec) -> None:
    groups = _distinct(r[spec.series] for r in rows) if spec.series else [None]
    xs_all = sorted({r[spec.x] for r in rows if is_number(r[spec.x])})
    for i, g in enumerate(groups):
        pts = sorted((r[spec.x], r[spec.y]) for r in rows if (g is None or r[spec.series] == g)
                     and is_number(r[spec.x]) and is_number(r[spec.y]))
        if pts:
            ax.plot(*zip(*pts), label=str(g) if g is not None else "_", color=f"C{i % 10}", **style(i, len(pts)))
    logx = spec.logx
    if logx is None:  # positive x values spaced geometrically (sizes 1, 2, 4, ...; learning rates) over 16x or more
        logx = len(xs_all) >= 2 and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 16 and all(
            b / a >= 1.9 for a, b in zip(xs_all, xs_all[1:]))
    if logx:
        ax.set_xscale("log", base=2)
    if logx or len(xs_all) <= 8:  # ticks at the measured x values, at most 8 of them (no overlapping labels)
        ticks = xs_all[:: math.ceil(len(xs_all) / 8)]
        ax.set_xticks(ticks, [_number_label(v) for v in ticks], fontsize=8)
        ax.minorticks_off()
    ax.grid(alpha=0.3)


def _zero(ax, spec: PlotSpec) -> None:
    if spec.zero and not spec.logy:
        lo, hi = min(*ax.get_ylim(), 0.0), max(*ax.get_ylim(), 0.0)
        ax.set_ylim(lo, hi if hi > 0 else 0.05 * (hi - lo))  # all negative: a little room above the 0 line


@dataclass
class _Panel:
    """How one panel draws: lines, or bars with one group per value of `cats` and one bar per value of `groups`;
    `note` joins the panel title (the x value when there is only one)."""

    rows: list[dict]
    title: str
    kind: str
    cats: str = ""
    groups: str | None = None
    note: str = ""


def _panel(rows: list[dict], title: str, spec: PlotSpec) -> _Panel:
    xs = _distinct(r[spec.x] for r in rows)
    numeric = all(is_number(v) for v in xs)
    kind = spec.kind if spec.kind != "auto" else ("lines" if numeric and len(xs) >= 2 else "bars")
    if kind == "lines":
        return _Panel(rows, title, "lines")
    if spec.series and spec.series != spec.x and len(xs) == 1:  # one x value: the series are the categories
        return _Panel(rows, title, "bars", spec.series, None, _value_with_unit(spec.xlabel or spec.x, xs[0]))
    return _Panel(rows, title, "bars", spec.x, spec.series if spec.series not in (None, spec.x) else None)


def draw(path: Path, rows: list[dict], spec: PlotSpec) -> Path:
    """Draw rows (dicts of column -> value) as spec says into the PNG at path."""
    fig, axes = render(rows, spec)
    return finish(fig, axes, path, spec.legend or (spec.series or ""))


def render(rows: list[dict], spec: PlotSpec):
    """(fig, axes): the panels of `draw`, before the legend and saving."""
    panel_vals = _distinct(r[spec.panels] for r in rows) if spec.panels else [None]
    panels = [_panel([r for r in rows if spec.panels is None or r[spec.panels] == pv],
                     "" if pv is None else f"{spec.panel_label} {pv}".strip(), spec) for pv in panel_vals]
    # a bar panel gets at least 1.1 inch per category, so its tick labels fit side by side
    n_cats = max([len(_distinct(r[p.cats] for r in p.rows)) for p in panels if p.kind == "bars"] or [0])
    fig, axes = figure(len(panels), spec.title, panel_w=max(PANEL_W, 1.1 * n_cats))
    for ax, p in zip(axes, panels):
        if p.kind == "lines":
            _lines(ax, p.rows, spec)
        else:
            _bars(ax, p.rows, spec, p.cats, p.groups)
        if spec.logy:
            ax.set_yscale("log")
        _zero(ax, spec)
        xlabel = spec.xlabel or spec.x
        if p.kind == "bars" and p.cats != spec.x:
            xlabel = spec.legend or p.cats
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(wrap(spec.ylabel or spec.y, int(PANEL_H * 11)), fontsize=9)
        ax.tick_params(labelsize=8)
        title = ", ".join(t for t in (p.title, p.note) if t)
        if title:
            panel_title(ax, title)
    return fig, axes


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV with numbers parsed back (int, then float); empty cells are None."""
    import csv

    def value(s: str) -> Any:
        if s == "":
            return None
        for t in (int, float):
            try:
                return t(s)
            except ValueError:
                pass
        return s

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]
