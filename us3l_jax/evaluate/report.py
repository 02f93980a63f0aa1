"""The width-sweep report: ``sweep.json`` (records), ``sweep.md`` (table), ``sweep.png`` (plots).

A record is one (width, protocol) result: ``width``, ``protocol``, ``dataset``, ``step``,
``accuracy`` (top-1 %), ``params``/``macs`` (the sliced backbone at the eval input size),
timings, and ``paper_accuracy`` (%) when a paper row is given. The markdown table has one row
per width and one accuracy column per protocol, then the paper's numbers.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

from us3l_jax import fileio
from us3l_jax.paper import PaperRow

FILES = ("sweep.json", "sweep.md", "sweep.png")
Record = dict[str, Any]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _protocols(records: Sequence[Record]) -> list[str]:
    return list(dict.fromkeys(r["protocol"] for r in records))


def _by_width(records: Sequence[Record]) -> dict[float, dict[str, Record]]:
    rows: dict[float, dict[str, Record]] = {}
    for r in records:
        rows.setdefault(r["width"], {})[r["protocol"]] = r
    return rows


def markdown_table(records: Sequence[Record], paper: PaperRow | None = None) -> str:
    """One row per width (widest first): params, MACs, accuracy (%) per protocol, and the
    paper row's accuracy where given ('-': collapsed, blank: not published)."""
    protocols = _protocols(records)
    head = ["width", "params", "MACs"] + [f"{p} top-1 (%)" for p in protocols]
    if paper is not None:
        head.append(f"paper: {paper.label} (%)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for w, by_protocol in sorted(_by_width(records).items(), reverse=True):
        any_r = next(iter(by_protocol.values()))
        cells = [f"{w}", _count(any_r["params"]), _count(any_r["macs"])]
        cells += [f"{by_protocol[p]['accuracy']:.1f}" if p in by_protocol else ""
                  for p in protocols]
        if paper is not None:
            a = paper.at(w)
            cells.append("" if w not in paper.accuracy else "-" if a is None else f"{a:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(records: Sequence[Record]) -> str:
    """One line naming what was evaluated."""
    r = records[0]
    return (f"{r['model']} step {r['step']}, evaluated on {r['dataset']} "
            f"({', '.join(_protocols(records))}), eval input {r['input_size']}px, BN calibrated "
            f"({r['calibration_mode']})")


def plot_png(records: Sequence[Record], paper: PaperRow | None = None) -> bytes:
    """PNG bytes: accuracy against width (left) and against MACs (right), one line per
    protocol, the paper row dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend change
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_w, ax_m = fig.subplots(1, 2)
    for p in _protocols(records):
        rs = sorted((r for r in records if r["protocol"] == p), key=lambda r: r["width"])
        ax_w.plot([r["width"] for r in rs], [r["accuracy"] for r in rs], "o-", label=f"ours: {p}")
        ax_m.plot([r["macs"] / 1e6 for r in rs], [r["accuracy"] for r in rs], "o-",
                  label=f"ours: {p}")
    if paper is not None:
        pts = sorted((w, a) for w, a in paper.accuracy.items() if a is not None)
        if pts:
            ax_w.plot(*zip(*pts), "s--", color="grey", label=f"paper: {paper.label}")
        macs = {r["width"]: r["macs"] for r in records}
        at_ours = [(macs[w] / 1e6, a) for w, a in pts if w in macs]
        if at_ours:
            ax_m.plot(*zip(*sorted(at_ours)), "s--", color="grey",
                      label=f"paper: {paper.label} (at our MACs)")
    ax_w.set_xlabel("width")
    ax_m.set_xlabel("MACs (M), sliced backbone")
    ax_m.set_xscale("log")  # MACs grow ~ width^2
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax_m.xaxis.set_major_formatter(plain)
    ax_m.xaxis.set_minor_formatter(plain)
    for ax in (ax_w, ax_m):
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, framealpha=0.7)
    fig.suptitle(describe(records), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write(records: Sequence[Record], out: str, paper: PaperRow | None = None) -> list[str]:
    """Writes the three files into ``out`` (each atomically); returns their paths."""
    if not records:
        raise ValueError("no records to report")
    paths = [os.path.join(out, f) for f in FILES]
    fileio.atomic_write_text(paths[0], json.dumps(list(records), indent=2) + "\n")
    md = f"{describe(records)}\n\n{markdown_table(records, paper)}\n"
    fileio.atomic_write_text(paths[1], md)
    fileio.atomic_write_bytes(paths[2], plot_png(records, paper))
    return paths
