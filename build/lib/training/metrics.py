"""Task metrics: accuracy (Q3/Q8/Q9), per-class precision/recall/F1, macro F1 and MCC (for rare
classes, where accuracy rewards predicting the majority), within-one accuracy and Spearman for
ordered classes, and Spearman/Pearson/MSE for regression."""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def mcc(confusion: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K; the usual MCC for two)."""
    c = confusion.astype(np.float64)
    total, correct = c.sum(), np.trace(c)
    predicted, actual = c.sum(0), c.sum(1)
    cov_pt = correct * total - predicted @ actual
    cov_pp = total ** 2 - predicted @ predicted
    cov_tt = total ** 2 - actual @ actual
    return float(cov_pt / np.sqrt(cov_pp * cov_tt)) if cov_pp and cov_tt else 0.0


def classification(pred: np.ndarray, true: np.ndarray, labels: tuple[str, ...], ordered: bool = False) -> dict:
    """pred/true are integer class ids."""
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class, f1s = {}, []
    for i, label in enumerate(labels):
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        precision, recall = _ratio(confusion[i, i], predicted), _ratio(confusion[i, i], actual)
        f1 = _ratio(2 * precision * recall, precision + recall) if precision is not None and recall is not None else None
        if actual:  # macro F1 over the classes that occur (a class never seen has no recall)
            f1s.append(f1 or 0.0)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
    total = confusion.sum()
    result = {"accuracy": float(np.trace(confusion) / total) if total else float("nan"),
              "macro_f1": float(np.mean(f1s)) if f1s else float("nan"), "mcc": mcc(confusion),
              "per_class": per_class, "confusion_matrix": confusion.tolist(), "labels": list(labels)}
    if ordered:
        result["within_one"] = float(np.mean(np.abs(pred - true) <= 1)) if total else float("nan")
        result["spearman"] = float(spearmanr(pred, true).statistic) if total > 1 else float("nan")
    return result


def regression(pred: np.ndarray, true: np.ndarray) -> dict:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    rho = spearmanr(pred, true).statistic if len(pred) > 1 else float("nan")
    return {"spearman": float(rho), "mse": float(np.mean((pred - true) ** 2)),
            "pearson": float(np.corrcoef(pred, true)[0, 1]) if len(pred) > 1 else float("nan")}
