"""The study's outputs beside the paper: a Markdown table laid out like the paper's, and plots.

Table: the paper's columns (Method, #W, #A, #G, then the recipe's metric groups), one line per
row; each cell ``ours / paper (diff)`` with ``diff = ours - paper``; rows that could not run say
why. Plots (matplotlib's object API, PNG; nothing global is touched): perplexity vs bits per
method (log scale; the paper's values as hollow markers), zero-shot average vs bits, and the
accuracy/size frontier over the measured ``bits_per_weight`` and storage bits per weight.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import recipe as rc

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # the GPU machines may lack matplotlib: the table is still written
    Figure = FigureCanvasAgg = None

TITLES = {"wikitext2": "WikiText2", "c4": "C4", "ptb": "PTB", "c4-new": "C4 (new)", "ptb-new": "PTB (new)",
          "piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag", "winogrande": "Wino",
          "zero_shot_avg": "Avg.", "mmlu_humanities": "Hums.", "mmlu_stem": "STEM", "mmlu_social_sciences": "Social",
          "mmlu_other": "Other", "mmlu_avg": "Avg."}

AXIS = {"zero_shot_avg": "zero-shot average", "mmlu_avg": "MMLU average"}


def fmt(x: float | None, paper: bool = False) -> str:
    """Ours: 2 decimals, scientific from 1000 on (``1.9E3``); the paper's: 1 decimal as printed."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:.1E}".replace("E+0", "E").replace("E+", "E")
    return f"{x:.1f}" if paper else f"{x:.2f}"


def fmt_diff(d: float) -> str:
    if abs(d) >= 1000:
        return ("+" if d > 0 else "-") + fmt(abs(d))
    return f"{d:+.2f}"


def cell(ours: float | None, paper: float | None) -> str:
    if ours is None and paper is None:
        return ""
    if ours is None:
        return f"- / {fmt(paper, True)}"
    if paper is None:
        return f"{fmt(ours)} / -"
    return f"{fmt(ours)} / {fmt(paper, True)} ({fmt_diff(ours - paper)})"


def _g(g) -> str:
    return "-" if g is None else str(g)


def _w(w) -> str:
    return str(int(w)) if float(w).is_integer() else f"{w:g}"


def render_table(recipe: rc.Recipe, planned: list, results: list[dict], model: str, protocol: dict) -> str:
    """The Markdown table (and its notes) of one recipe: the paper's layout, ours / paper (diff) per cell."""
    by_name = {r.get("row"): r for r in results}
    metrics = recipe.metrics
    head1 = "| Method | #W | #A | #G | " + " | ".join(TITLES.get(m, m) for m in metrics) + " |"
    groups = " | ".join(f"{g}" + " |" * (len(ms) - 1) for g, ms in recipe.columns)
    lines = [f"### {recipe.title}", "",
             f"Ours: `{model}`; paper: {recipe.paper_model or 'see source'} ({recipe.source}). "
             "Each cell: ours / paper (ours - paper).", "",
             "| | | | | " + groups + " |", "|---|---|---|---|" + "---|" * len(metrics), head1]
    notes, last_label = [], None
    for pl in planned:
        row = pl.row
        label = row.label if row.label != last_label else ""
        last_label = row.label
        res = by_name.get(row.name)
        if pl.status != "run":
            why = "not available in this build" if pl.status == "unavailable" else "config rejected"
            cells = [f"{fmt(row.paper[m], True)} (paper; {why})" if m in row.paper else "" for m in metrics]
            notes.append(f"{row.name}: {why}: {pl.reason}")
        elif res is None:
            cells = [cell(None, row.paper.get(m)) if m in row.paper else "" for m in metrics]
            notes.append(f"{row.name}: not run yet")
        elif res.get("status") != "done":
            cells = [cell(None, row.paper.get(m)) if m in row.paper else "" for m in metrics]
            why = "not applicable to this model" if res.get("status") == "not applicable" else "failed"
            notes.append(f"{row.name}: {why}: {res.get('error')}")
        else:
            ours = res.get("metrics", {})
            cells = [cell(ours.get(m), row.paper.get(m)) for m in metrics]
            for e, why in (res.get("skipped_evaluations") or {}).items():
                notes.append(f"{row.name}: {e} skipped: {why}")
        lines.append(f"| {label} | {_w(row.w)} | {row.a} | {_g(row.g)} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:"]
    lines.append(f"- Protocol `{protocol.get('name')}`: calibration {protocol.get('nsamples')} x {protocol.get('calib_seqlen')} "
                 f"tokens of {protocol.get('calib')} (seed {protocol.get('seed')}); perplexity on {protocol.get('seqlen')}-token "
                 "windows" + (f", the first {protocol['max_eval_windows']} per data set" if protocol.get("max_eval_windows") else
                              ", all of them") +
                 (f"; zero-shot: the first {protocol['zero_shot_limit']} documents per task" if protocol.get("zero_shot_limit") else "")
                 + (f"; MMLU: the first {protocol['mmlu_limit']} question(s) per subject" if protocol.get("mmlu_limit") else "")
                 + ("." if protocol.get("name") == "full" else " -- a quick look, not the paper's protocol (`--full`)."))
    if any(m in rc.HIGHER_IS_BETTER for m in metrics):
        notes_acc = ("- Accuracies in %. A small model sits near chance on these tasks (PIQA 50, ARC-e/ARC-c/HellaSwag/MMLU "
                     "25, WinoGrande 50): the zero-shot and MMLU columns of a tiny model compare methods only weakly.")
        lines.append(notes_acc)
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def relative_table(recipe: rc.Recipe, planned: list, results: list[dict]) -> str:
    """Perplexity relative to each side's own FP row: ours/our FP beside paper/paper FP -- the comparison
    that carries across model sizes."""
    ppl = [m for m in recipe.metrics if m in rc.PPL_METRICS]
    by_name = {r.get("row"): r for r in results if r.get("status") == "done"}
    fp = next((pl for pl in planned if pl.row.is_fp), None)
    if not ppl or fp is None or fp.row.name not in by_name:
        return ""
    ours_fp = by_name[fp.row.name]["metrics"]
    lines = ["| Method | #W | #A | #G | " + " | ".join(f"{TITLES.get(m, m)} x FP" for m in ppl) + " |",
             "|---|---|---|---|" + "---|" * len(ppl)]
    for pl in planned:
        r = by_name.get(pl.row.name)
        if r is None or pl.row.is_fp:
            continue
        cells = []
        for m in ppl:
            o = r["metrics"].get(m)
            o_rel = o / ours_fp[m] if o is not None and ours_fp.get(m) else None
            p_rel = pl.row.paper[m] / fp.row.paper[m] if m in pl.row.paper and m in fp.row.paper else None
            cells.append(f"{fmt(o_rel)} / {fmt(p_rel)}" if o_rel is not None or p_rel is not None else "")
        lines.append(f"| {pl.row.label} | {_w(pl.row.w)} | {pl.row.a} | {_g(pl.row.g)} | " + " | ".join(cells) + " |")
    return ("Perplexity as a multiple of the unquantized model's (ours / paper):\n\n" + "\n".join(lines)
            if len(lines) > 2 else "")


# ---------------------------------------------------------------------------------------------
# Plots


def _series(planned: list, results: list[dict], metric: str):
    """Per (label, #G) series: ours [(bits, value)], paper [(bits, value)]."""
    by_name = {r.get("row"): r for r in results if r.get("status") == "done"}
    out: dict = {}
    for pl in planned:
        row = pl.row
        key = (f"FP: {row.label}" if row.is_fp else f"{row.label}") + ("" if row.is_fp else (f" g{row.g}" if row.g else " per-channel")) + \
            (f" A{row.a}" if row.a != 16 else "")
        s = out.setdefault(key, {"ours": [], "paper": []})
        r = by_name.get(row.name)
        if r is not None and r["metrics"].get(metric) is not None:
            s["ours"].append((row.w, r["metrics"][metric]))
        if metric in row.paper:
            s["paper"].append((row.w, row.paper[metric]))
    return {k: v for k, v in out.items() if v["ours"] or v["paper"]}


def _new_figure(ncols: int, nrows: int = 1):
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_vs_bits(fig, ax, series: dict, metric: str, log: bool) -> None:
    colors = [f"C{i}" for i in range(10)]
    for i, (name, s) in enumerate(sorted(series.items())):
        c = colors[i % 10]
        if name.startswith("FP: "):  # the unquantized model: horizontal lines, so the x axis stays on the low bits
            for (_, y), ls, who in [(v, "-", "ours") for v in s["ours"]] + [(v, ":", "paper") for v in s["paper"]]:
                ax.axhline(y, color="0.4", linestyle=ls, linewidth=1, label=f"{name[4:]} 16-bit ({who})")
            continue
        style = "--" if "per-channel" in name else "-"
        if s["ours"]:
            xs, ys = zip(*sorted(s["ours"]))
            ax.plot(xs, ys, style, marker="o", color=c, label=f"{name} (ours)")
        if s["paper"]:
            xs, ys = zip(*sorted(s["paper"]))
            ax.plot(xs, ys, ":", marker="o", markerfacecolor="none", color=c, alpha=0.8, label=f"{name} (paper)")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (#W)")
    ax.set_ylabel(AXIS.get(metric, TITLES.get(metric, metric)) + (" perplexity (log)" if log else " (%)"))
    ax.grid(True, alpha=0.3)


def make_plots(recipe: rc.Recipe, planned: list, results: list[dict], dest: Path) -> list[Path]:
    """Write the PNGs; returns their paths (none without matplotlib, logged by the caller)."""
    if Figure is None:
        return []
    dest = Path(dest)
    written = []
    ppl = [m for m in recipe.metrics if m in rc.PPL_METRICS]
    if ppl:
        fig = _new_figure(len(ppl))
        axes = [fig.add_subplot(1, len(ppl), i + 1) for i in range(len(ppl))]
        for ax, m in zip(axes, ppl):
            _plot_vs_bits(fig, ax, _series(planned, results, m), m, log=True)
            ax.set_title(f"{TITLES.get(m, m)}: filled = ours, hollow = paper")
        if axes[-1].get_legend_handles_labels()[0]:
            axes[-1].legend(fontsize=6, loc="upper right")
        written.append(_save(fig, dest / "ppl_vs_bits.png"))
    acc = "zero_shot_avg" if "zero_shot_avg" in recipe.metrics else ("mmlu_avg" if "mmlu_avg" in recipe.metrics else None)
    if acc:
        fig = _new_figure(1)
        ax = fig.add_subplot(1, 1, 1)
        _plot_vs_bits(fig, ax, _series(planned, results, acc), acc, log=False)
        ax.set_title(f"{'zero-shot average' if acc == 'zero_shot_avg' else 'MMLU average'}: filled = ours, hollow = paper")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        written.append(_save(fig, dest / ("zero_shot_vs_bits.png" if acc == "zero_shot_avg" else "mmlu_vs_bits.png")))
    # frontier: measured bits (paper convention and everything stored) vs quality
    done = [r for r in results if r.get("status") == "done"]
    ys = [m for m in (ppl[:1] + ([acc] if acc else [])) if any(r["metrics"].get(m) is not None for r in done)]
    if ys:
        fig = _new_figure(2, len(ys))
        for j, m in enumerate(ys):
            for k, (xkey, xlabel) in enumerate((("bits_per_weight", "bits_per_weight (paper convention)"),
                                                ("storage_bits_per_weight", "storage bits per weight (all stored)"))):
                ax = fig.add_subplot(len(ys), 2, 2 * j + k + 1)
                pts = []
                for r in done:
                    x = (r.get("bits") or {}).get(xkey, 16.0 if r.get("method") == "fp" else None)
                    y = r["metrics"].get(m)
                    if x is not None and y is not None:
                        pts.append((x, y, r["row"]))
                for x, y, name in pts:
                    ax.plot([x], [y], "o", color="C0")
                    ax.annotate(name, (x, y), fontsize=5, alpha=0.7)
                front = _pareto(pts, lower_better=m not in rc.HIGHER_IS_BETTER)
                if front:
                    fx, fy = zip(*front)
                    ax.step(fx, fy, where="post", color="C3", label="frontier")
                    ax.legend(fontsize=6)
                if m not in rc.HIGHER_IS_BETTER:
                    ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(AXIS.get(m, TITLES.get(m, m)) + (" perplexity" if m in rc.PPL_METRICS else " (%)"))
                ax.grid(True, alpha=0.3)
        written.append(_save(fig, dest / "frontier.png"))
    return written


def _pareto(pts, lower_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or equal) bits."""
    best, front = None, []
    for x, y, _ in sorted(pts, key=lambda p: (p[0], p[1] if lower_better else -p[1])):
        if best is None or (y < best if lower_better else y > best):
            best = y
            front.append((x, y))
    return front


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path
