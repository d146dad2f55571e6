"""`esm-adapters COMMAND ...`: one console command for every tool, each the same as its
`python -m` form (which keeps working). Commands are imported only when run, so `--help` and the
client's commands never load torch, Ray or Lightning.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> (module with main(argv), what it does)
    "fit": ("training.fit", "train an adapter and publish it (python -m training.fit)"),
    "evaluate": ("training.evaluate", "score an adapter on a data file (python -m training.evaluate)"),
    "tune": ("training.tune", "search a recipe on Ray Tune, publish the best (python -m training.tune)"),
    "serve": ("serving.serve.launch", "serve every adapter over gRPC and HTTP (python -m serving.serve)"),
    "batch": ("serving.batch.scoring", "score files with adapters on Ray Data (python -m serving.batch)"),
    "registry": ("serving.registry.cli", "push, list, remove adapter versions (python -m serving.registry)"),
    "predict": ("esm_adapters.client", "call a service: one adapter or several (python -m serving.client)"),
    "list": ("esm_adapters.client", "the service's adapters and their status"),
    "embed": ("esm_adapters.client", "embeddings from the service's base"),
    "health": ("esm_adapters.client", "the service's grpc.health.v1 status"),
}
CLIENT = {"predict", "list", "embed", "health"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: esm-adapters COMMAND [--help] ...\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"esm-adapters: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    # the client's commands are its own subcommands
    return module.main([command, *rest] if command in CLIENT else rest) or 0


if __name__ == "__main__":
    sys.exit(main())
