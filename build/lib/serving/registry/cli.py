"""The registry folder from the command line.

  python -m serving.registry push BUNDLE_FOLDER [--registry adapters] [--name NAME]
  python -m serving.registry list [--registry adapters] [--base ...] [--r-max N] [--targets ...]
                                  [--serve-config serve_config.yaml] [--json]
  python -m serving.registry remove NAME[@VERSION] [--registry adapters]

`list` checks every version as a server would: the same scan, schema and serve rule, with the
server's limits (its flags, or its Serve config's args; the defaults are the service's own).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modeling import registry as store
from modeling.bundle import BundleError
from serving.registry.watcher import Registry


def limits_from(args: argparse.Namespace) -> store.ServeLimits:
    """The serve limits of `list`: --serve-config's application args, then the flags given."""
    found: dict = {}
    if args.serve_config:
        import yaml
        config = yaml.safe_load(Path(args.serve_config).read_text()) or {}
        apps = config.get("applications") or [{"args": config}]  # a Serve config, or bare service args
        found = {k: v for k, v in (apps[0].get("args") or {}).items() if k in ("r_max", "targets")}
    if args.r_max is not None:
        found["r_max"] = args.r_max
    if args.targets is not None:
        found["targets"] = [t for t in args.targets.split(",") if t]
    defaults = store.ServeLimits()
    return store.ServeLimits(r_max=int(found.get("r_max", defaults.r_max)),
                             targets=tuple(found.get("targets", defaults.targets)))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_push = sub.add_parser("push", help="publish a bundle folder as a new version (numbers are never reused)")
    p_push.add_argument("bundle", help="a bundle folder (manifest.json and the files it lists)")
    p_push.add_argument("--name", help="the adapter's name (default: the name in its manifest)")
    p_list = sub.add_parser("list", help="every version with its status as a server would see it")
    p_list.add_argument("--base", help="the server's base (default: the default base)")
    defaults = store.ServeLimits()
    p_list.add_argument("--r-max", type=int, help=f"the server's r_max (default {defaults.r_max})")
    p_list.add_argument("--targets", help=f"the server's LoRA targets, comma-separated (default "
                        f"{','.join(defaults.targets)})")
    p_list.add_argument("--serve-config", help="take r_max and targets from this Serve config (its first "
                        "application's args)")
    p_list.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    p_rm = sub.add_parser("remove", help="remove NAME (every version) or NAME@VERSION")
    p_rm.add_argument("ref", help="NAME or NAME@VERSION")
    for p in (p_push, p_list, p_rm):
        p.add_argument("--registry", default="adapters", help="the registry folder (default: adapters)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = Path(args.registry)
    try:
        if args.command == "push":
            print(f"published {store.push(Path(args.bundle), root, args.name)}")
        elif args.command == "remove":
            for folder in store.remove(root, args.ref):
                print(f"removed {folder}")
        else:
            list_versions(root, args)
    except (BundleError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def list_versions(root: Path, args: argparse.Namespace) -> None:
    from modeling.base import load_base
    limits = limits_from(args)
    base = load_base(args.base)
    registry = Registry(root, store.ServeRule(base.fingerprint, base.encoder.embed_dim, limits))
    rows = [e.summary() for e in registry.entries()]
    if args.json:
        print(json.dumps({"adapters": rows, "skipped": registry.health.skipped, "problem": registry.problem},
                         indent=2))
        return
    for row in rows:
        metrics = " ".join(f"{s}:{k}={v:.3f}" for s, r in row["metrics"].items()
                           for k, v in r.items() if k in ("q3", "q8", "accuracy", "spearman"))
        print(f"{row['name']}@{row['version']:<4} {row['status']:<8} task={row['task']} "
              f"rank={row['rank']} base={str(row['base_fingerprint'])[:12]} {metrics}"
              + (f"  reason: {row['reason']}" if row["reason"] else ""))
    for line in registry.health.skipped:
        print(f"skipped {line}")
    if registry.problem:
        print(f"problem: {registry.problem}")
