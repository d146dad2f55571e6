"""Output kinds and a head's spec (light: no torch); the heads themselves are in modeling/heads.py."""
from __future__ import annotations

from dataclasses import asdict, dataclass

PER_RESIDUE = "per_residue"
SEQUENCE_CLASS = "sequence_class"
REGRESSION = "regression"
KINDS = (PER_RESIDUE, SEQUENCE_CLASS, REGRESSION)


@dataclass(frozen=True)
class HeadSpec:
    kind: str
    num_outputs: int
    embed_dim: int
    hidden: int = 32
    dropout: float = 0.25
    kernel: int = 7  # per-residue conv width (the NetSurfP/BioNeMo ConvNet head)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"head kind {self.kind!r}: expected one of {KINDS}")

    def as_dict(self) -> dict:
        return asdict(self)
