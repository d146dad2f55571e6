"""`make demo`: train a small sec_str LoRA adapter on the offline default base and the vendored
FLIP data (a few minutes on 2 CPU cores), evaluate it on NEW364, publish it into adapters/."""
from __future__ import annotations

import json
import sys

from training import fit


def main() -> int:
    args = ["--task", "sec_str", "--rank", "16", "--name", "sec_str-r16", "--registry", "adapters",
            "--max-steps", "150", "--batch-size", "8", "--max-length", "256",
            "trainer.limit_val_batches=40", "early_stopping.enabled=false"]
    print("esm-adapters demo: python -m training.fit " + " ".join(args), flush=True)
    code = fit.main(args)
    if code:
        return code
    print("\nPublished adapter bundle; see its manifest.json for the full metrics.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
