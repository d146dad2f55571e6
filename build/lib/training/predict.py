"""Run a task model over records and score it (shared by fit and evaluate)."""
from __future__ import annotations

import numpy as np
import torch

from modeling.alphabet import tokenize
from modeling.heads import PER_RESIDUE, REGRESSION
from modeling.model import TaskModel
from training import metrics
from training.data import Record
from training.datamodule import TargetScale
from training.tasks import Task


def scoring_device(accelerator: str = "auto") -> torch.device:
    """Where to run a model for scoring: the GPU when one is there and `accelerator` (Lightning's
    name: auto, gpu, cuda, cpu) allows it."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise ValueError(f"{accelerator!r} asked for, but torch sees no CUDA device here")
    return torch.device("cpu")


@torch.no_grad()
def predict(model: TaskModel, records: list[Record], batch_size: int = 16,
            device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Raw outputs per record, in input order: (L, C) logits, (C,) logits, or a scalar. The model
    must already be on `device`."""
    model.eval()
    order = sorted(range(len(records)), key=lambda i: len(records[i].sequence))
    outputs: list[np.ndarray | None] = [None] * len(records)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tokens = tokenize([records[i].sequence for i in idx]).to(device)
        out, _ = model(tokens)
        out = out.float().cpu().numpy()
        for row, i in enumerate(idx):
            outputs[i] = out[row, :len(records[i].sequence)] if out.ndim == 3 else out[row]
    return outputs


def score(task: Task, records: list[Record], outputs: list[np.ndarray], scale: TargetScale) -> dict:
    if task.kind == PER_RESIDUE:
        index = {label: i for i, label in enumerate(task.labels)}
        preds, trues = [], []
        for r, out in zip(records, outputs):
            keep = np.array([m == "1" for m in r.mask]) if r.mask else np.ones(len(r.sequence), bool)
            preds.append(out.argmax(-1)[keep])
            trues.append(np.array([index.get(c, -1) for c in r.label])[keep])  # -1 only where not kept
        pred, true = np.concatenate(preds), np.concatenate(trues)
        result = metrics.classification(pred, true, task.labels, task.ordered)
        for name, mapping in task.coarse.items():  # e.g. q3 from an 8-state prediction
            to_coarse = np.array([mapping[label] for label in task.labels])
            result[name] = float(np.mean(to_coarse[pred] == to_coarse[true]))
        result["residues"] = int(sum(len(p) for p in preds))
    elif task.kind == REGRESSION:
        pred = np.array([float(o.reshape(-1)[0]) for o in outputs]) * scale.std + scale.mean
        result = metrics.regression(pred, np.array([float(r.label) for r in records]))
    else:
        result = metrics.classification(np.array([int(o.argmax()) for o in outputs]),
                                         np.array([task.labels.index(r.label) for r in records]),
                                         task.labels, task.ordered)
    if task.metric not in result:  # q3, q8, q9: accuracy under the task's name for it
        result[task.metric] = result["accuracy"]
    result["sequences"] = len(records)
    return result
