"""Records -> tensors: length-bucketed batches, padded targets, a LightningDataModule."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from modeling.alphabet import tokenize
from modeling.heads import PER_RESIDUE, REGRESSION
from training.data import Record, crop
from training.tasks import Task

IGNORE = -100  # per-residue positions that are not scored (unresolved or padding)


@dataclass
class TargetScale:
    """Regression targets are standardised for training; the manifest keeps mean/std to undo it."""
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, records: list[Record]) -> "TargetScale":
        values = np.array([float(r.label) for r in records])
        return cls(float(values.mean()), float(values.std()) or 1.0)


def collate(indexed: list[tuple[int, Record]], task: Task, scale: TargetScale) -> dict[str, torch.Tensor]:
    """(index in the split, record) pairs -> tokens, targets and the indices (to gather a split
    scored in shards by several ranks)."""
    indices = torch.tensor([i for i, _ in indexed])
    records = [r for _, r in indexed]
    tokens = tokenize([r.sequence for r in records])
    if task.kind == PER_RESIDUE:
        index = {label: i for i, label in enumerate(task.labels)}
        width = max(len(r.sequence) for r in records)
        targets = torch.full((len(records), width), IGNORE, dtype=torch.long)
        for row, r in enumerate(records):  # labels outside the set occur only where the mask says 0
            ids = torch.tensor([index.get(c, IGNORE) for c in r.label])
            if r.mask is not None:
                ids[torch.tensor([c == "0" for c in r.mask])] = IGNORE
            targets[row, :len(ids)] = ids
    elif task.kind == REGRESSION:
        targets = torch.tensor([(float(r.label) - scale.mean) / scale.std for r in records])
    else:
        targets = torch.tensor([task.labels.index(r.label) for r in records])
    return {"tokens": tokens, "targets": targets, "indices": indices}


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffle, then sort chunks of `bucket_batches` batches by length, so each batch holds
    sequences of similar length (little padding) while batch order stays random.
    Under DDP each rank takes every world_size-th batch (equal counts on every rank)."""

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0,
                 bucket_batches: int = 50, rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.seed, self.bucket, self.rank, self.world = seed, bucket_batches, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        chunk = self.batch_size * self.bucket if self.shuffle else len(order)
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: self.lengths[i])
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        per_rank = -(-len(batches) // self.world)
        batches += batches[:per_rank * self.world - len(batches)]  # pad so every rank gets as many
        return batches[self.rank::self.world]

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return -(-(-(-len(self.lengths) // self.batch_size)) // self.world)


class FlipDataModule(pl.LightningDataModule):
    def __init__(self, splits: dict[str, list[Record]], task: Task, batch_size: int,
                 max_length: int, seed: int, bucket_batches: int = 50, num_workers: int = 0):
        super().__init__()
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.bucket_batches, self.num_workers = bucket_batches, num_workers
        self.splits = dict(splits, train=crop(splits["train"], max_length)[0])
        self.scale = TargetScale.fit(self.splits["train"]) if task.kind == REGRESSION else TargetScale()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Under DDP every rank takes its share of the batches, validation too (the module gathers
        the validation outputs of every rank before scoring)."""
        records = self.splits[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = BucketBatchSampler([len(r.sequence) for r in records], self.batch_size, shuffle,
                                     self.seed, self.bucket_batches, rank, world)
        return DataLoader(list(enumerate(records)), batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,  # started once, not every epoch
                          collate_fn=lambda pairs: collate(pairs, self.task, self.scale))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
