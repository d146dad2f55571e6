"""The LightningModule: loss per task kind, validation metric, the optimiser and its schedule,
input masking while training."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from modeling.alphabet import MASK, TOKEN_ID
from modeling.heads import PER_RESIDUE, REGRESSION
from modeling.model import TaskModel
from training.config import DataConfig, OptimConfig
from training.datamodule import IGNORE, TargetScale
from training.predict import score
from training.tasks import Task


STANDARD = torch.tensor([TOKEN_ID[c] for c in "LAGVSERTIDPKQNFYMHWC"])


@dataclass(frozen=True)
class InputMasking:
    """BioNeMo's modify_percent: while training, that share of residues is modified: mask_percent
    of them become <mask>, perturb_percent a random standard residue, the rest stay (BERT's 80/10/10
    by default). Targets are untouched; validation and scoring never see it."""
    modify: float = 0.0
    mask: float = 0.8
    perturb: float = 0.1

    @classmethod
    def of(cls, data: DataConfig) -> "InputMasking":
        return cls(data.modify_percent, data.mask_percent, data.perturb_percent)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.modify:
            return tokens
        residue = tokens > TOKEN_ID["<unk>"]  # not <cls>, <pad>, <eos>
        draw = torch.rand(tokens.shape, device=tokens.device)
        modified = residue & (draw < self.modify)
        share = draw / self.modify  # uniform in [0, 1) over the modified positions
        out = tokens.clone()
        out[modified & (share < self.mask)] = MASK
        perturb = modified & (share >= self.mask) & (share < self.mask + self.perturb)
        standard = STANDARD.to(tokens.device)
        out[perturb] = standard[torch.randint(len(standard), (int(perturb.sum()),), device=tokens.device)]
        return out


class AdapterModule(pl.LightningModule):
    def __init__(self, model: TaskModel, task: Task, optim: OptimConfig, val_records: list,
                 scale: TargetScale, masking: InputMasking = InputMasking()):
        super().__init__()
        self.model, self.task, self.optim, self.masking = model, task, optim, masking
        self.val_records, self.scale = val_records, scale
        self._val_outputs: dict[int, np.ndarray] = {}  # index in the validation split -> output

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task.kind == PER_RESIDUE:
            return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        if self.task.kind == REGRESSION:
            return F.mse_loss(outputs.squeeze(-1), targets.to(outputs.dtype))
        return F.cross_entropy(outputs, targets)

    def training_step(self, batch, _idx):
        outputs, _ = self.model(self.masking(batch["tokens"]))
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
        o = self.optim
        head = [p for p in self.model.head.parameters() if p.requires_grad]
        encoder = [p for p in self.model.encoder.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": o.lr}] + ([{"params": encoder, "lr": o.encoder_lr or o.lr}] if encoder else [])
        name = o.name.lower()
        if name not in OPTIMIZERS:
            raise ValueError(f"model.finetuning_optim.name={o.name!r}: expected one of {sorted(OPTIMIZERS)}")
        optimizer = OPTIMIZERS[name](groups, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(o, total))
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


# NeMo's adam is torch's Adam (L2 weight decay); its fused_adam (apex FusedAdam, adam_w_mode) is AdamW.
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "fused_adam": torch.optim.AdamW}


def schedule(optim: OptimConfig, total: int):
    """step -> learning-rate factor (of each group's lr) over `total` optimiser steps.
    WarmupCosine (this project's): linear warm-up (at most a tenth of the run), then cosine to 10%.
    NeMo's, as NeMo computes them: warm-up (step+1)/(warmup+1) over warmup_steps, or warmup_ratio x
    total (a ratio above 1 keeps the whole run in warm-up, as NeMo does), then WarmupAnnealing:
    linear to min_lr; CosineAnnealing: cosine to min_lr; constant: 1 throughout."""
    sched, lr = optim.sched, optim.lr
    name = sched.name
    if name == "WarmupCosine":
        warmup = min(sched.warmup_steps or 0, total // 10 + 1)

        def ours(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return ours
    if name == "constant":
        return lambda step: 1.0
    if name not in ("WarmupAnnealing", "CosineAnnealing"):
        raise ValueError(f"model.finetuning_optim.sched.name={name!r}: expected WarmupCosine, WarmupAnnealing, "
                         f"CosineAnnealing or constant")
    if sched.warmup_steps is not None and sched.warmup_ratio is not None:
        raise ValueError("model.finetuning_optim.sched: warmup_steps or warmup_ratio, not both (as in NeMo)")
    warmup = sched.warmup_steps if sched.warmup_steps is not None else int((sched.warmup_ratio or 0) * total)
    floor = sched.min_lr / lr

    def nemo(step: int) -> float:
        if warmup > 0 and step <= warmup:
            return (step + 1) / (warmup + 1)
        if step > total:
            return floor
        progress = (step - warmup) / max(1, total - warmup)
        if name == "WarmupAnnealing":
            return floor + (1 - progress) * (1 - floor)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return nemo
