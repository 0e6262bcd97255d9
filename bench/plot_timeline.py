"""Draw an FXOFFLOAD_TRACE file (Chrome-trace JSON) as a timeline: one row per track
(the benchmark's model calls, the parent, the receiver thread, each worker), spans as
bars, instant events (swaps, fallbacks, the benchmark's marks) as ticks.

    python bench/plot_timeline.py TRACE.json [OUT.png|OUT.svg] [--title TEXT]

(``-o OUT`` works too.) Writes a PNG with matplotlib when it is installed; otherwise (or
for an .svg output) an SVG drawn by hand, with no dependencies, next to the PNG asked for
(``OUT.svg``; a note on stderr says so). Time 0 is the earliest event in the file. Bars
are labelled with their graph's Dynamo compile id (the events' ``compile_id`` arg).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

# Span colours by the first word(s) of the event name.
COLOURS = (
    ("first", "#9467bd"), ("eager", "#ff7f0e"), ("compiled", "#2ca02c"),
    ("steady", "#98df8a"), ("queue", "#c7c7c7"), ("compile", "#1f77b4"),
    ("decode", "#17becf"), ("serialize", "#bcbd22"), ("wait", "#dbdb8d"),
    ("deserialize", "#8c564b"),
)
OTHER = "#7f7f7f"


def colour(name: str) -> str:
    for prefix, c in COLOURS:
        if name.startswith(prefix):
            return c
    return OTHER


def load(path: Path) -> tuple[list[tuple[tuple[int, int], str]], list[dict[str, Any]],
                             list[dict[str, Any]]]:
    """(rows in display order, spans, instants), times in seconds from the first event."""
    events = json.loads(path.read_text())["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M"}
    timed = [e for e in events if e.get("ph") in ("X", "i")]
    if not timed:
        raise ValueError(f"{path}: no spans or instants")
    t0 = min(e["ts"] for e in timed)
    spans, instants = [], []
    for e in timed:
        key = (e["pid"], e["tid"])
        names.setdefault(key, f"track {e['tid']}")
        item = {"row": key, "name": e["name"], "start": (e["ts"] - t0) / 1e6,
                "args": e.get("args") or {}}
        if e["ph"] == "X":
            item["end"] = item["start"] + e.get("dur", 0) / 1e6
            spans.append(item)
        else:
            instants.append(item)

    def order(key: tuple[int, int]) -> tuple[int, str]:
        name = names[key]
        for i, first in enumerate(("model calls", "parent", "receiver")):
            if name == first:
                return (i, name)
        return (3, name)  # workers last, by name

    rows = sorted(((k, names[k]) for k in names if any(
        s["row"] == k for s in spans + instants)), key=lambda kv: order(kv[0]))
    return rows, spans, instants


def lanes(rows: list[Any], spans: list[dict[str, Any]]) -> dict[tuple[int, int], int]:
    """Give overlapping spans of one row their own lane (``span["lane"]``); returns the
    number of lanes per row."""
    count: dict[tuple[int, int], int] = {k: 1 for k, _ in rows}
    ends: dict[tuple[int, int], list[float]] = {k: [] for k, _ in rows}
    for s in sorted(spans, key=lambda s: (s["start"], s["end"])):
        free = ends[s["row"]]
        for lane, end in enumerate(free):
            if end <= s["start"] + 1e-9:
                free[lane] = s["end"]
                s["lane"] = lane
                break
        else:
            s["lane"] = len(free)
            free.append(s["end"])
        count[s["row"]] = max(count[s["row"]], len(free))
    return count


def _label(name: str, args: dict[str, Any] | None = None) -> str:
    """Short bar label: the graph's compile id ('0/0', '0/0 bw', '0/0 s1' for stage 1)
    from the event's args; else from its name ('eager call x36' -> 'eager x36')."""
    args = args or {}
    if args.get("compile_id"):
        label = str(args["compile_id"])
        if args.get("part") == "backward":
            label += " bw"
        if args.get("stage"):
            label += f" s{args['stage']}"
        return label
    words = name.split()
    if "graph" in words:
        i = words.index("graph")
        if i + 1 < len(words):
            return "g" + words[i + 1]
    return f"{words[0]} {words[-1]}" if words[-1].startswith("x") else words[0]


def plot(trace: Path, out: Path, title: str | None = None) -> Path:
    rows, spans, instants = load(trace)
    if out.suffix.lower() != ".svg":
        try:
            import matplotlib

            matplotlib.use("Agg")
            return _plot_matplotlib(rows, spans, instants, out, title)
        except ImportError:
            out = out.with_suffix(".svg")
            print(f"matplotlib is not installed: writing an SVG instead ({out})",
                  file=sys.stderr)
    return _plot_svg(rows, spans, instants, out, title)


def _plot_matplotlib(rows: list[Any], spans: list[dict[str, Any]],
                     instants: list[dict[str, Any]], out: Path, title: str | None) -> Path:
    import matplotlib.pyplot as plt

    count = lanes(rows, spans)
    base: dict[tuple[int, int], float] = {}
    y = 0.0
    for k, _ in rows:
        base[k] = y
        y += count[k] + 0.5
    end = max([s["end"] for s in spans] + [i["start"] for i in instants])
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * y))
    for s in spans:
        yy = base[s["row"]] + s["lane"]
        w = max(s["end"] - s["start"], end * 0.001)
        ax.barh(yy, w, left=s["start"], height=0.7, color=colour(s["name"]),
                edgecolor="black", linewidth=0.3)
        if w > end * 0.04:
            ax.text(s["start"] + w / 2, yy, _label(s["name"], s["args"]), ha="center",
                    va="center", fontsize=7)
    for k, it in enumerate(instants):
        y0 = base[it["row"]] - 0.4
        y1 = base[it["row"]] + count[it["row"]] - 0.6
        ax.plot([it["start"]] * 2, [y0, y1], color="red", linewidth=1)
        ax.text(it["start"], y0 - 0.05 + 0.3 * (k % 3), it["name"], fontsize=6,
                color="red", ha="left", va="bottom")
    ax.set_yticks([base[k] + (count[k] - 1) / 2 for k, _ in rows],
                  [name for _, name in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(0, end * 1.02)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_svg(rows: list[Any], spans: list[dict[str, Any]],
              instants: list[dict[str, Any]], out: Path, title: str | None) -> Path:
    left, right, top, lane_h, bar_h, gap = 150, 30, 40 if title else 20, 26, 20, 20
    width = 1200
    plot_w = width - left - right
    end = max([s["end"] for s in spans] + [i["start"] for i in instants]) or 1.0
    count = lanes(rows, spans)
    # Instant labels go into a band above the rows, in as many levels as keep them apart.
    level_end: list[float] = []
    for it in sorted(instants, key=lambda i: i["start"]):
        xi = left + plot_w * it["start"] / (end * 1.02)
        w = 4.6 * len(it["name"]) + 6
        # Near the right edge the label goes to the left of its line.
        it["anchor_end"] = xi + w > width - 4
        x0, x1 = (xi - w, xi) if it["anchor_end"] else (xi, xi + w)
        lv = next((i for i, e in enumerate(level_end) if e < x0), len(level_end))
        if lv == len(level_end):
            level_end.append(0.0)
        level_end[lv] = x1
        it["level"] = lv
    band = 11 * len(level_end) + 6
    top += band
    base: dict[tuple[int, int], float] = {}
    y = float(top)
    for k, _ in rows:
        base[k] = y
        y += lane_h * count[k] + gap
    axis_y = y
    height = axis_y + 60

    def x(t: float) -> float:
        return left + plot_w * t / (end * 1.02)

    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        parts.append(f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">'
                     f'{esc(title)}</text>')
    # grid and axis
    step = _nice_step(end)
    t = 0.0
    while t <= end * 1.02:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{axis_y}" '
                     'stroke="#e0e0e0"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{axis_y + 14}" text-anchor="middle">'
                     f'{t:g}</text>')
        t += step
    parts.append(f'<text x="{left + plot_w / 2}" y="{axis_y + 32}" text-anchor="middle">'
                 'seconds</text>')
    for k, name in rows:
        yc = base[k] + lane_h * count[k] / 2
        parts.append(f'<text x="{left - 8}" y="{yc + 4:.1f}" text-anchor="end">'
                     f'{esc(name)}</text>')
    for s in spans:
        y = base[s["row"]] + lane_h * s["lane"] + (lane_h - bar_h) / 2
        x0, x1 = x(s["start"]), x(s["end"])
        w = max(x1 - x0, 1.0)
        parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h}" '
                     f'fill="{colour(s["name"])}" stroke="black" stroke-width="0.4">'
                     f'<title>{esc(s["name"])}: {s["start"]:.3f}-{s["end"]:.3f} s '
                     f'({s["end"] - s["start"]:.3f} s)</title></rect>')
        label = _label(s["name"], s["args"])
        if w > 7 * len(label) + 4:
            parts.append(f'<text x="{x0 + w / 2:.1f}" y="{y + bar_h / 2 + 4:.1f}" '
                         f'text-anchor="middle" font-size="10">{esc(label)}</text>')
    for it in instants:
        y = base[it["row"]]
        xi = x(it["start"])
        y2 = y + lane_h * count[it["row"]] + 6
        parts.append(f'<line x1="{xi:.1f}" y1="{y - 6}" x2="{xi:.1f}" y2="{y2:.1f}" '
                     f'stroke="red" stroke-width="1.2"><title>{esc(it["name"])} at '
                     f'{it["start"]:.3f} s</title></line>')
        ty = top - band + 11 * it["level"] + 8
        parts.append(f'<line x1="{xi:.1f}" y1="{ty + 2:.1f}" x2="{xi:.1f}" y2="{y - 6}" '
                     'stroke="red" stroke-width="0.5" stroke-dasharray="2,2"/>')
        tx, anchor = (xi - 2, "end") if it["anchor_end"] else (xi + 2, "start")
        parts.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="8" text-anchor="{anchor}" '
                     f'fill="red">{esc(it["name"])}</text>')
    # legend
    ly = height - 8
    lx = left
    for prefix, c in COLOURS:
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{lx + 13}" y="{ly}">{prefix}</text>')
        lx += 13 + 7 * len(prefix) + 14
    parts.append("</svg>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n")
    return out


def _nice_step(end: float) -> float:
    raw = end / 10
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300):
        if step >= raw:
            return float(step)
    return float(round(raw, -2) or 600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("out", type=Path, nargs="?", default=None,
                   help="output file (default: TRACE with .png; .svg without matplotlib)")
    p.add_argument("-o", "--out", type=Path, default=None, dest="out_option",
                   help="the output file, as an option")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if args.out and args.out_option and args.out != args.out_option:
        p.error("give the output file once (OUT or -o OUT)")
    out = args.out or args.out_option or args.trace.with_suffix(".png")
    written = plot(args.trace, out, args.title or args.trace.stem)
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
