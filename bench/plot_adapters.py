"""Throughput against the number of distinct adapters in the traffic, from a GPU check's JSON:
the picture in the README (docs/images/adapters-throughput.png).

  python -m bench.plot_adapters bench/results/gpu_check-NVIDIA-H200-2026-11-27T0213.json docs/images/adapters-throughput.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(results: dict, out: Path, size: str = "650M", dtype: str = "bfloat16") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = results["parts"][f"serving_{size}"][dtype]
    mixed = sorted((int(key.split("_")[1]), value["residues_per_s"]) for key, value in rates.items()
                   if key.startswith(("mixed_", "unmerged_")))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([n for n, _ in mixed], [r / 1000 for _, r in mixed], "o-", label="esm-adapters, mixed-adapter batches")
    ax.axhline(rates["merged_1"]["residues_per_s"] / 1000, color="grey", ls="--", label="one adapter merged into the base")
    if "naive_peft_64" in rates:
        ax.plot([64], [rates["naive_peft_64"]["residues_per_s"] / 1000], "s", color="C3",
                label="fair-esm + peft, set_adapter per group (64)")
    ax.set_xscale("log")
    ax.set_xticks([n for n, _ in mixed], [str(n) for n, _ in mixed])
    ax.set_xlabel("distinct adapters in the traffic")
    ax.set_ylabel("thousand residues / s")
    ax.set_ylim(bottom=0)
    environment = results["parts"].get("environment", {})
    ax.set_title(f"ESM-2 {size}, {dtype}, {environment.get('gpu', 'GPU')}, torch {environment.get('torch', '?')}")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot_adapters", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a gpu_check JSON (bench/results/)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    plot(json.loads(args.results.read_text()), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
