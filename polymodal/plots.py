"""PNG plots for people to look at: loss curves.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so plotting neither needs a
display nor changes the backend of a user's interactive session.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_loss_plot(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | Path,
    title: str = "training loss",
    stages: Mapping[str, int] | None = None,
) -> Path:
    """Save a loss-vs-step curve as a PNG at `path` (written atomically); return the path.

    stages: {name: first step} of the stages of a multi-stage run (the quickstart's align and
    instruct); each gets a marked boundary and a label. With more than 50 points a smoothed curve
    is drawn over the raw one, which stays visible but faint (per-step losses of small batches
    are noisy): a bias-corrected exponential moving average (`smoothed`) that restarts at each
    stage, so it neither lags a whole window behind nor carries one stage's loss into the next.
    """
    if len(steps) != len(losses):
        raise ValueError(f"save_loss_plot: {len(steps)} steps but {len(losses)} losses")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    smooth = len(losses) > 50
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if smooth else 1.0, linewidth=1, label="loss")
    starts = sorted((stages or {}).items(), key=lambda item: item[1])
    if smooth:
        span = max(2, len(losses) // 50)
        cuts = [i for i, step in enumerate(steps) if any(step == first for _, first in starts)]
        ax.plot(steps, smoothed(losses, span, cuts), color="tab:blue", linewidth=2, label=f"EMA (span {span})")
    for name, first in starts:
        if first > steps[0]:
            ax.axvline(first - 0.5, color="gray", linestyle="--", linewidth=1)
        ax.annotate(name, xy=(first, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="gray")
    if smooth:
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def smoothed(values: Sequence[float], span: int, restarts: Sequence[int] = ()) -> list[float]:
    """Bias-corrected EMA of `values` with decay 1 - 2 / (span + 1), restarted at each index in
    `restarts`: out[i] is the weighted mean of the values since the last restart, the weights
    falling geometrically into the past (so early points are not pulled towards zero)."""
    decay = 1.0 - 2.0 / (span + 1)
    out, mean, weight = [], 0.0, 0.0
    restart = set(restarts)
    for i, value in enumerate(values):
        if i in restart:
            mean, weight = 0.0, 0.0
        mean = decay * mean + (1 - decay) * float(value)
        weight = decay * weight + (1 - decay)
        out.append(mean / weight)
    return out
