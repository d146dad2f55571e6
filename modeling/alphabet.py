"""ESM-2 tokenisation and sequence validation (one alphabet for every ESM-2 size)."""
from __future__ import annotations

import torch

# The ESM-1b/ESM-2 vocabulary, in token-id order (identical in fair-esm and Hugging Face).
TOKENS = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y",
    "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)
TOKEN_ID = {tok: i for i, tok in enumerate(TOKENS)}
CLS, PAD, EOS, MASK = TOKEN_ID["<cls>"], TOKEN_ID["<pad>"], TOKEN_ID["<eos>"], TOKEN_ID["<mask>"]
# Residue letters a request may contain: the 20 standard amino acids plus X, B, U, Z, O.
RESIDUES = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")
MAX_RESIDUES = 1022  # 1024 positions minus <cls> and <eos>


class SequenceError(ValueError):
    """A sequence that cannot be tokenised; `index` and `char` name the culprit."""

    def __init__(self, message: str, index: int | None = None, char: str | None = None):
        super().__init__(message)
        self.index = index
        self.char = char


def normalise(sequence: str, where: str = "sequence") -> str:
    """Upper-case `sequence` and check every letter is an ESM residue; `where` names it in errors."""
    seq = sequence.strip().upper()
    if not seq:
        raise SequenceError(f"{where}: empty sequence")
    for pos, ch in enumerate(seq):
        if ch not in RESIDUES:
            raise SequenceError(
                f"{where}: invalid residue {ch!r} at position {pos + 1} "
                f"(valid: {''.join(sorted(RESIDUES))})", char=ch)
    return seq


def within_limit(seq: str, where: str, crop: bool = False, hint: str | None = None) -> tuple[str, bool]:
    """(seq cut to MAX_RESIDUES, whether it was cut); a longer sequence without `crop` is an error,
    `hint` saying how to ask for cropping."""
    if len(seq) <= MAX_RESIDUES:
        return seq, False
    if not crop:
        raise SequenceError(f"{where}: {len(seq)} residues; the model takes at most {MAX_RESIDUES}"
                            + (f" ({hint})" if hint else ""))
    return seq[:MAX_RESIDUES], True


def tokenize(sequences: list[str], pad_to: int | None = None) -> torch.Tensor:
    """<cls> seq <eos> <pad>...; sequences must already be normalised."""
    width = max(len(s) for s in sequences) + 2
    if pad_to is not None:
        width = max(width, pad_to)
    tokens = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, 0] = CLS
        tokens[row, 1:len(seq) + 1] = torch.tensor([TOKEN_ID[c] for c in seq], dtype=torch.long)
        tokens[row, len(seq) + 1] = EOS
    return tokens
