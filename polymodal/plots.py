"""PNG plots for people to look at: loss curves.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so plotting neither needs a
display nor changes the backend of a user's interactive session.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_loss_plot(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | Path,
    title: str = "training loss",
) -> Path:
    """Save a loss-vs-step curve as a PNG at `path` (written atomically); return the path.

    With more than 50 points a moving average (window = 1/20 of the run) is drawn over the raw
    curve, which stays visible but faint, since per-step losses of small batches are noisy.
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
    if smooth:
        window = max(2, len(losses) // 20)
        totals = [0.0, *itertools.accumulate(float(x) for x in losses)]
        starts = [max(0, i - window + 1) for i in range(len(losses))]
        averaged = [(totals[i + 1] - totals[s]) / (i + 1 - s) for i, s in enumerate(starts)]
        ax.plot(steps, averaged, color="tab:blue", linewidth=2, label=f"moving average ({window})")
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
