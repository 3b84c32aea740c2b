"""The Pareto plot of a `pick` result: TPOT against served-perplexity increase, with the SLO and the choice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.pick import PickResult


def pareto_plot(result: PickResult, path: Path) -> Path:
    """Write the PNG: TPOT (x) vs perplexity increase (y), points labelled, Pareto front, SLO lines, the choice."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = result.slo.tpot_percentile
    points = [c for c in result.candidates if c.ppl_increase is not None]
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for c in points:
        color = "tab:green" if c.meets_slo else "tab:gray"
        ax.scatter(c.tpot(pct), c.ppl_increase * 100, s=48, color=color, zorder=3,
                   marker="s" if c.role == "base" else "o", edgecolors="tab:blue" if c.pareto else color,
                   linewidths=1.8)  # fmt: skip
        ax.annotate(c.label, (c.tpot(pct), c.ppl_increase * 100), textcoords="offset points", xytext=(6, 5),
                    fontsize=8)  # fmt: skip
    front = sorted((c for c in points if c.pareto), key=lambda c: c.tpot(pct))
    if front:
        ax.step([c.tpot(pct) for c in front], [c.ppl_increase * 100 for c in front], where="post",
                color="tab:blue", linewidth=1.2, label="Pareto front (blue rims)", zorder=2)  # fmt: skip
    if result.slo.max_tpot_ms is not None:
        ax.axvline(result.slo.max_tpot_ms, color="tab:red", linestyle="--", linewidth=1,
                   label=f"max TPOT {result.slo.max_tpot_ms:g} ms")  # fmt: skip
    if result.slo.max_ppl_increase is not None:
        ax.axhline(result.slo.max_ppl_increase * 100, color="tab:orange", linestyle="--", linewidth=1,
                   label=f"max perplexity increase {result.slo.max_ppl_increase:.1%}")  # fmt: skip
    if result.choice is not None and result.choice.ppl_increase is not None:
        ax.scatter(result.choice.tpot(pct), result.choice.ppl_increase * 100, s=220, facecolors="none",
                   edgecolors="tab:green", linewidths=2, zorder=4, label=f"choice: {result.choice.label}")  # fmt: skip
    tpots = [c.tpot(pct) for c in points if c.tpot(pct) > 0]
    if tpots and max(tpots) > 10 * min(tpots):  # e.g. emulated FP8 next to native kernels
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"TPOT p{pct} (ms), vllm bench serve, {result.traffic}")
    ax.set_ylabel(f"served perplexity increase vs base (%)\n{result.quality_text}")
    ax.set_title(f"{result.hardware}\nvLLM {result.vllm_version}, {result.dtype}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
