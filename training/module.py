"""The LightningModule: loss per task kind, validation metric, optimiser with warm-up."""
from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from modeling.heads import PER_RESIDUE, REGRESSION
from modeling.model import TaskModel
from training.datamodule import IGNORE, TargetScale
from training.predict import score
from training.tasks import Task


class AdapterModule(pl.LightningModule):
    def __init__(self, model: TaskModel, task: Task, optim: dict, val_records: list,
                 scale: TargetScale):
        super().__init__()
        self.model, self.task, self.optim = model, task, optim
        self.val_records, self.scale = val_records, scale
        self._val_outputs: dict[int, np.ndarray] = {}  # index in the validation split -> output

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task.kind == PER_RESIDUE:
            return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        if self.task.kind == REGRESSION:
            return F.mse_loss(outputs.squeeze(-1), targets.to(outputs.dtype))
        return F.cross_entropy(outputs, targets)

    def training_step(self, batch, _idx):
        outputs, _ = self.model(batch["tokens"])
        loss = self.loss(outputs, batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["tokens"]))
        return loss

    def on_validation_epoch_start(self):
        self._val_outputs = {}

    def validation_step(self, batch, _idx):
        outputs, _ = self.model(batch["tokens"])
        self.log("val/loss", self.loss(outputs, batch["targets"]), batch_size=len(batch["tokens"]), sync_dist=True)
        lengths = batch["tokens"].ne(1).sum(-1) - 2
        for row, out in enumerate(outputs.float().cpu().numpy()):
            self._val_outputs[int(batch["indices"][row])] = out[:int(lengths[row])] if out.ndim == 2 else out

    def on_validation_epoch_end(self):
        """The watched metric over the whole validation split, the same on every rank: under DDP each
        rank scored a share of it, so the shares are gathered first (a batch repeated to even out
        the ranks counts once). With limit_val_batches only the records seen are scored."""
        outputs = dict(self._val_outputs)
        if self.trainer.world_size > 1:
            shares = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(shares, self._val_outputs)
            for share in shares:
                outputs.update(share)
        if not outputs:
            return
        seen = sorted(outputs)
        result = score(self.task, [self.val_records[i] for i in seen], [outputs[i] for i in seen], self.scale)
        # identical on every rank already; sync_dist says so to Lightning (a mean of equal values)
        self.log(f"val/{self.task.metric}", result[self.task.metric], prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        lr = self.optim["lr"]
        encoder_lr = self.optim.get("encoder_lr") or lr
        head = [p for p in self.model.head.parameters() if p.requires_grad]
        encoder = [p for p in self.model.encoder.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": lr}] + ([{"params": encoder, "lr": encoder_lr}] if encoder else [])
        name = self.optim["name"].lower()
        if name not in ("adamw", "adam"):
            raise ValueError(f"model.optim.name={name!r}: expected adamw or adam")
        optimizer = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(
            groups, weight_decay=self.optim["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.optim["warmup_steps"], total // 10 + 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # Keep checkpoints small: only what training changes (LoRA + head, or all in full mode).
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        trainable |= {n for n in checkpoint["state_dict"] if n.endswith("lora_position")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint):
        state = self.state_dict()
        state.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = state
