"""Score many sequences with any set of adapters as a Ray Data job.

  python -m serving.batch --adapter sec_str-r16 --adapter scl-frozen --input 'proteome/*.fasta' \\
      --output scores/ [--registry adapters/] [--base ...] [--workers N] [--gpus-per-worker G]

Input: FASTA, CSV/TSV (a `sequence` column; an `id` column if present) or Parquet files, given as
files, folders or globs. Output: a folder of Parquet shards with one row per (sequence, adapter):
id, sequence (or its sha256 with --no-sequence), adapter (NAME@VERSION), kind, and labels /
label + probabilities (in label_names order) / value as the adapter's kind has them, and `error`
for a sequence that could not be scored (invalid, or too long without --crop). `_job.json` beside
the shards records the adapters, the base and the counts.

The same engine, registry checks and bundle checks as the gRPC service, one Engine per Ray Data
worker (a callable class). Every adapter is resolved to a fixed version before any work; an
unknown or refused one fails the job at once. The output appears whole or not at all: it is
written beside and renamed into place. Ray runs with token authentication (modeling/ray_auth.py).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from modeling.alphabet import SequenceError, normalise, within_limit
from modeling.kinds import PER_RESIDUE, REGRESSION
from serving.engine.config import DTYPES, QUANTIZE, check_quantize

log = logging.getLogger("serving.batch")
FORMATS = {".fasta": "fasta", ".fa": "fasta", ".faa": "fasta", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet"}
MARKER = "_job.json"


class BatchError(ValueError):
    pass


# ---- input ---------------------------------------------------------------------------------------
def input_files(patterns: list[str]) -> list[Path]:
    """Files, folders (their supported files) and globs -> a sorted list of supported files."""
    found: set[Path] = set()
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(pattern)] or ([Path(pattern)] if Path(pattern).exists() else [])
        if not matches:
            raise BatchError(f"--input {pattern}: no such file, folder or glob match")
        for path in matches:
            for file in (sorted(path.rglob("*")) if path.is_dir() else [path]):
                if file.is_file() and file.suffix.lower() in FORMATS:
                    found.add(file.resolve())
                elif not path.is_dir():
                    raise BatchError(f"--input {file}: unknown format; expected {sorted(set(FORMATS))}")
    if not found:
        raise BatchError(f"--input {patterns}: no FASTA, CSV, TSV or Parquet file found")
    return sorted(found)


def fasta_rows(row: dict) -> list[dict]:
    """One whole FASTA file (Ray Data's binary reader) -> one row per record."""
    from esm_adapters.fasta import fasta_entries  # the same FASTA reader training and the client use

    text = row["bytes"].decode()
    return [{"id": header.split()[0] if header.split() else "", "sequence": body, "source": row["path"]}
            for header, body in fasta_entries(text)]


def table_rows(batch, column: str):
    """A CSV/TSV/Parquet batch -> id, sequence, source (id: the file's `id` column, else the file
    name and the sequence's hash)."""
    if column not in batch.columns:
        raise BatchError(f"{batch['path'].iloc[0]}: no {column!r} column (found {list(batch.columns)})")
    sequences = batch[column].astype(str)
    if "id" in batch.columns:
        ids = batch["id"].astype(str)
    else:
        ids = [f"{Path(p).name}:{hashlib.sha256(s.encode()).hexdigest()[:16]}" for p, s in zip(batch["path"], sequences)]
    import pandas as pd
    return pd.DataFrame({"id": list(ids), "sequence": list(sequences), "source": list(batch["path"])})


def read_inputs(files: list[Path], column: str):
    """One Ray Data dataset of (id, sequence, source) over every input file."""
    import ray.data

    by_format: dict[str, list[str]] = {}
    for file in files:
        by_format.setdefault(FORMATS[file.suffix.lower()], []).append(str(file))
    tables = []
    if "csv" in by_format:
        tables.append(ray.data.read_csv(by_format["csv"], include_paths=True))
    if "tsv" in by_format:
        from pyarrow import csv
        tables.append(ray.data.read_csv(by_format["tsv"], include_paths=True,
                                        parse_options=csv.ParseOptions(delimiter="\t")))
    if "parquet" in by_format:
        tables.append(ray.data.read_parquet(by_format["parquet"], include_paths=True))
    parts = [table.map_batches(table_rows, fn_args=(column,), batch_format="pandas") for table in tables]
    if "fasta" in by_format:
        parts.append(ray.data.read_binary_files(by_format["fasta"], include_paths=True).flat_map(fasta_rows))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


# ---- scoring -------------------------------------------------------------------------------------
def output_schema(residue_probabilities: bool, embeddings: bool):
    """Every shard has the same columns and types, whatever its rows happen to hold."""
    import pyarrow as pa

    fields = [("id", pa.string()), ("sequence", pa.string()), ("sequence_sha256", pa.string()),
              ("length", pa.int32()), ("adapter", pa.string()), ("kind", pa.string()), ("labels", pa.string()),
              ("label", pa.string()), ("label_names", pa.list_(pa.string())),
              ("probabilities", pa.list_(pa.float64())), ("value", pa.float64()), ("cropped", pa.bool_()),
              ("error", pa.string()), ("source", pa.string())]
    if residue_probabilities:
        fields.append(("residue_probabilities", pa.list_(pa.list_(pa.float32()))))
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


class Scorer:
    """One Engine per Ray Data worker; every batch of sequences is scored by every adapter in one
    engine call (mixed-adapter batches; head-only adapters share each sequence's encoder pass)."""

    def __init__(self, registry: str, base: str | None, refs: list[str], fingerprint: str, engine: dict,
                 crop: bool, keep_sequence: bool, residue_probabilities: bool, embeddings: bool, threads: int):
        import torch

        from modeling.base import load_base
        from serving.engine import Engine, EngineConfig

        torch.set_num_threads(threads)
        loaded = load_base(base)
        if loaded.fingerprint != fingerprint:
            raise BatchError(f"worker loaded base {loaded.fingerprint[:12]}, the job resolved against {fingerprint[:12]}")
        self.engine = Engine(loaded, Path(registry), EngineConfig(**engine))
        self.adapters = {ref: self.engine.load(ref) for ref in refs}  # fixed versions, verified
        self.crop, self.keep_sequence = crop, keep_sequence
        self.residue_probabilities, self.embeddings = residue_probabilities, embeddings
        self.schema = output_schema(residue_probabilities, embeddings)
        self.marker = os.environ.get("ESM_ADAPTERS_BATCH_WORKER_FILE")  # tests: which process, how far
        self._mark("ready")

    def _mark(self, what: str) -> None:
        if self.marker:
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()} {what}\n")

    def __call__(self, batch):
        import pyarrow as pa

        self._mark("batch")
        rows, requests, owners = [], [], []
        valid: list[str] = []
        for rid, raw, source in zip(batch["id"], batch["sequence"], batch["source"]):
            base = {"id": str(rid), "source": str(source),
                    "sequence": str(raw) if self.keep_sequence else None,
                    "sequence_sha256": None if self.keep_sequence else hashlib.sha256(str(raw).encode()).hexdigest()}
            try:
                where = f"{source}: {rid}"
                seq, cropped = within_limit(normalise(str(raw), where), where, self.crop, "--crop crops")
            except SequenceError as exc:
                rows += [{**base, "adapter": ref, "kind": adapter.kind, "error": str(exc)}
                         for ref, adapter in self.adapters.items()]
                continue
            base["length"] = len(seq)
            valid.append(seq)
            for ref, adapter in self.adapters.items():  # the versions loaded at start, whatever happens since
                requests.append((adapter, seq, self.residue_probabilities))
                owners.append({**base, "adapter": ref, "cropped": cropped, "_row": len(valid) - 1})
        for owner, result in zip(owners, self.engine.predict(requests) if requests else []):
            rows.append(self._row(owner, result))
        if self.embeddings and valid:
            means = [rep.mean(0).tolist() for rep in self.engine.embed(valid)]
            for row in rows:
                if "_row" in row:
                    row["embedding"] = means[row["_row"]]
        for row in rows:
            row.pop("_row", None)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _row(self, owner: dict, result) -> dict:
        adapter = self.adapters[owner["adapter"]]
        if isinstance(result, Exception):
            return {**owner, "kind": adapter.kind, "error": str(result)}
        labels = list(adapter.manifest["output"]["labels"])
        row = {**owner, "kind": result.kind}
        if result.kind == PER_RESIDUE:
            row.update(labels=result.labels, label_names=labels)
            if self.residue_probabilities:
                row["residue_probabilities"] = result.residue_probabilities
        elif result.kind == REGRESSION:
            row["value"] = result.value
        else:
            row.update(label=result.label, label_names=labels,
                       probabilities=[result.probabilities[name] for name in labels])
        return row


# ---- the job -------------------------------------------------------------------------------------
def resolve_adapters(registry: Path, base, refs: list[str], engine: dict) -> list[str]:
    """NAME[@VERSION] -> fixed NAME@VERSION, each loaded and verified as a worker will (checksums,
    base fingerprint, shapes): an unknown or refused adapter fails the job before any work."""
    from serving.engine import Engine, EngineConfig

    if not refs:
        raise BatchError("give at least one --adapter")
    try:  # what the workers will run, refused here where the platform cannot (int8 on a GPU)
        check_quantize(engine.get("quantize", "none"), engine["device"], engine["dtype"])
    except ValueError as exc:
        raise BatchError(str(exc)) from exc
    engine = Engine(base, registry, EngineConfig(**dict(engine, device="cpu", dtype="float32", quantize="none")))
    resolved = []
    for ref in refs:
        try:
            resolved.append(engine.load(ref).ref)
        except Exception as exc:
            raise BatchError(f"--adapter {ref}: {exc}") from exc
    if len(set(resolved)) != len(resolved):
        raise BatchError(f"--adapter names one version twice: {resolved}")
    return resolved


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Refuse an existing output unless --overwrite (and then only a folder this tool wrote)."""
    if output.exists():
        if not overwrite:
            raise BatchError(f"--output {output} exists; pass --overwrite to replace it")
        if output.is_dir() and any(output.iterdir()) and not (output / MARKER).exists():
            raise BatchError(f"--output {output}: will not replace a folder serving.batch did not write (no {MARKER})")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"


def run(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq
    import ray

    from modeling.base import load_base
    from modeling import ray_auth

    started = time.time()
    files = input_files(args.input)
    output = Path(args.output)
    base = load_base(args.base)
    engine = {"r_max": args.r_max, "max_batch_residues": args.batch_residues, "dtype": args.dtype, "quantize": args.quantize,
              "device": "cuda" if args.gpus_per_worker else "cpu", "max_device_adapters": max(8, len(args.adapter))}
    refs = resolve_adapters(Path(args.registry), base, args.adapter, engine)
    staging = prepare_output(output, args.overwrite)
    # A local Ray gets a CPU beyond what the workers take: with every CPU held by scoring workers,
    # Ray Data could not schedule the readers that feed them, and the job would wait forever.
    local_cpus = args.ray_cpus or max(os.cpu_count(), math.ceil(args.workers * args.cpus_per_worker) + 1)
    token = ray_auth.init_ray(args.address, args.ray_token_file, include_dashboard=False, logging_level=logging.WARNING,
                              **({} if args.address else {"num_cpus": local_cpus}))
    ray_ready = time.time()
    try:
        dataset = read_inputs(files, args.sequence_column).map_batches(
            Scorer, batch_format="pandas", batch_size=args.batch_sequences, concurrency=args.workers,
            num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker or None,
            fn_constructor_kwargs=dict(
                registry=str(Path(args.registry).resolve()), base=args.base, refs=refs, fingerprint=base.fingerprint,
                engine=engine, crop=args.crop, keep_sequence=not args.no_sequence,
                residue_probabilities=args.residue_probabilities, embeddings=args.embeddings,
                threads=max(1, int(args.cpus_per_worker))),
            max_restarts=-1, max_task_retries=-1)  # a worker that dies is replaced, its batches retried
        dataset.write_parquet(str(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        ray.shutdown()
        token.close()
    table = pq.read_table(staging, columns=["error", "length"])
    seconds = time.time() - started
    residues = int(table.column("length").drop_null().to_numpy().sum()) if table.num_rows else 0
    summary = {"output": str(output), "rows": table.num_rows, "adapters": refs,
               "failed_rows": table.num_rows - table.column("error").null_count,
               "residues": residues, "residues_per_s": round(residues / seconds, 1),
               "input_files": [str(f) for f in files], "base": base.describe(),
               "seconds": round(seconds, 1), "setup_seconds": round(ray_ready - started, 1)}  # inputs, base, adapters, Ray
    (staging / MARKER).write_text(json.dumps(summary, indent=2))
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", default=[], help="NAME[@VERSION]; repeat for several")
    p.add_argument("--input", action="append", required=True, help="a file, folder or glob; repeatable")
    p.add_argument("--output", required=True, help="a folder of Parquet shards (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an --output this tool wrote before")
    p.add_argument("--registry", default="adapters", help="the registry folder (default adapters)")
    p.add_argument("--base", help="the base the adapters were trained on (default: the offline default)")
    p.add_argument("--sequence-column", default="sequence", help="CSV/TSV/Parquet: where the sequences are (default sequence)")
    p.add_argument("--address", help="join a running Ray cluster (auto, or ray://...) instead of starting one")
    p.add_argument("--ray-token-file", help="Ray's token (default for a local start: one made for this job)")
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: every core, at least one more "
                   "than the workers take)")
    p.add_argument("--workers", type=int, default=1, help="Ray Data workers, one Engine each (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0)")
    p.add_argument("--batch-sequences", type=int, default=64, help="sequences per Ray Data batch (default 64)")
    p.add_argument("--batch-residues", type=int, help="padded residues per forward pass (engine default)")
    p.add_argument("--r-max", type=int, default=16, help="the largest LoRA rank accepted (default 16)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations (default float32)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE, help="int8: W8A8 base on CPU workers (default none)")
    p.add_argument("--crop", action="store_true", help="crop sequences over 1022 residues instead of failing them")
    p.add_argument("--no-sequence", action="store_true", help="write the sequence's sha256 instead of the sequence")
    p.add_argument("--residue-probabilities", action="store_true", help="per-residue tasks: per-residue probabilities")
    p.add_argument("--embeddings", action="store_true", help="also the base's mean embedding of each sequence")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except (BatchError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: {summary['rows']} rows ({len(summary['adapters'])} adapters), {summary['failed_rows']} failed, "
          f"{summary['residues_per_s']} residues/s over {summary['seconds']} s -> {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
