"""Task metrics: Q3/Q8 and per-class scores, accuracy, Spearman and MSE."""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def classification(pred: np.ndarray, true: np.ndarray, labels: tuple[str, ...]) -> dict:
    """pred/true are integer class ids; returns accuracy, per-class precision/recall, confusion."""
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class = {}
    for i, label in enumerate(labels):
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        per_class[label] = {
            "precision": float(confusion[i, i] / predicted) if predicted else None,
            "recall": float(confusion[i, i] / actual) if actual else None,
            "support": int(actual)}
    total = confusion.sum()
    return {"accuracy": float(np.trace(confusion) / total) if total else float("nan"),
            "per_class": per_class, "confusion_matrix": confusion.tolist(), "labels": list(labels)}


def regression(pred: np.ndarray, true: np.ndarray) -> dict:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    rho = spearmanr(pred, true).statistic if len(pred) > 1 else float("nan")
    return {"spearman": float(rho), "mse": float(np.mean((pred - true) ** 2)),
            "pearson": float(np.corrcoef(pred, true)[0, 1]) if len(pred) > 1 else float("nan")}
