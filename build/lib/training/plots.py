"""Loss and validation-metric curves from Lightning's CSV log, as a PNG in the run folder."""
from __future__ import annotations

import csv
from pathlib import Path


def plot_curves(metrics_csv: Path, out: Path, metric: str) -> Path | None:
    if not metrics_csv.exists():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("train/loss", "val/loss", f"val/{metric}"):
                if row.get(key):
                    series.setdefault(key, []).append((int(row["step"]), float(row[key])))
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train/loss", "val/loss"):
        if key in series:
            ax_loss.plot(*zip(*series[key]), label=key, marker="." if key == "val/loss" else None)
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    if f"val/{metric}" in series:
        ax_metric.plot(*zip(*series[f"val/{metric}"]), marker="o", color="tab:green")
    ax_metric.set_xlabel("step"), ax_metric.set_ylabel(f"validation {metric}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
