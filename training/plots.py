"""Training curves: loss, lr, target_var and pred_var from metrics.jsonl, as one PNG beside it (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = ("loss", "lr", "target_var", "pred_var")
PLOT_NAME = "curves.png"


def read_metrics(path: str | Path) -> list[dict]:
    """The per-update lines of a metrics.jsonl (event lines and torn lines left out)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "event" not in row and "step" in row:
            rows.append(row)
    return rows


def plot_training_curves(metrics_path: str | Path, png_path: str | Path | None = None) -> Path | None:
    """Write the curves PNG (default: curves.png beside metrics.jsonl); None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    png = Path(png_path) if png_path is not None else Path(metrics_path).with_name(PLOT_NAME)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.2 * len(CURVES), 2.6))
    for ax, key in zip(axes, CURVES, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("update", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "loss":
            ax.set_yscale("log")
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=72)
    plt.close(fig)
    tmp.replace(png)
    return png
