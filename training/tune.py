"""Search a recipe for a task on Ray Tune, then publish the best trial as an ordinary bundle.

  python -m training.tune --task my-task --task-file my_task.yaml --data-dir data/ \\
      --search model.finetuning_optim.lr=loguniform:1e-4,3e-3 \\
      --search model.peft.lora_tuning.adapter_dim=choice:4,8,16 --trials 8 [--space space.yaml]

Every `training.fit` flag, key and BioNeMo key works here and sets what every trial shares; the
search space comes from `--search KEY=KIND:VALUES` (choice, grid, uniform, loguniform, randint) or a
yaml file of `KEY: {KIND: [VALUES]}`; any config key can be searched. Each trial is a whole
`training.fit` run (validated as it trains, scored on the test split, its bundle in the trial's own
folder); ASHA stops poor trials early on the task's validation metric. Trials run on a local,
token-authenticated Ray or on a cluster (`--ray-address`, `--gpus-per-trial`); the experiment folder
(`--experiment-dir`) can be resumed (`--resume`). The best trial's bundle is published into the
registry, its manifest recording the search (space, trials, chosen values, best validation score)
and `search.json`, the full trial table, beside its weights under the manifest's checksums. If
every trial fails, nothing is published and the errors are said.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from modeling.bundle import BundleError
from training import fit
from training.config import VALID_KEYS, ConfigError, load_config, nearest
from training.data import DataError

log = logging.getLogger("training.tune")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCH_FILE = "search.json"


# ---- the search space ------------------------------------------------------------------------------
def space_of(flags: list[str], path: str | None) -> dict[str, tuple[str, list]]:
    """{config key: (kind, values)} from --search flags and a --space yaml; checked here, before any
    trial runs: every key a FitConfig key, every kind known, bounds two numbers."""
    space: dict[str, tuple[str, list]] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--space {path}: expected a mapping of key: {{kind: [values]}}")
        for key, spec in data.items():
            if not isinstance(spec, dict) or len(spec) != 1:
                raise ConfigError(f"--space {path}: {key}: expected {{kind: [values]}}, e.g. {{choice: [4, 8]}}")
            (kind, values), = spec.items()
            space[str(key)] = (kind, list(values) if isinstance(values, (list, tuple)) else [values])
    for text in flags:
        key, sep, rest = text.partition("=")
        kind, colon, values = rest.partition(":")
        if not sep or not colon:
            raise ConfigError(f"--search {text!r}: expected KEY=KIND:VALUES, e.g. model.finetuning_optim.lr="
                              f"loguniform:1e-4,3e-3")
        space[key] = (kind, [value_of(v) for v in split_values(values)])
    for key, (kind, values) in space.items():
        key = fit_key(key)
        if key not in VALID_KEYS:
            raise ConfigError(f"search key {key!r} is not a config key{nearest(key)}")
        if kind not in KINDS:
            raise ConfigError(f"search {key}: kind {kind!r} is not one of {KINDS}")
        if not values:
            raise ConfigError(f"search {key}: no values")
        if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or values[0] >= values[1]):
            raise ConfigError(f"search {key}: {kind} takes two numbers, low < high (got {values})")
    return {fit_key(key): spec for key, spec in space.items()}


def fit_key(key: str) -> str:
    """This project's earlier name for the fine-tuning optimizer is accepted here too."""
    return "model.finetuning_optim" + key[len("model.optim"):] if key.startswith("model.optim.") else key


def value_of(text: str):
    """A value as YAML reads it, and 1e-3 as a number (YAML 1.1 wants 1.0e-3)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def split_values(text: str) -> list[str]:
    """'4,8,16' -> ['4', '8', '16']; brackets keep a list whole: '[a,b],[a,b,c]' -> two lists."""
    out, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    return out + ([current] if current else [])


def tune_space(space: dict[str, tuple[str, list]]) -> dict:
    from ray import tune
    makers = {"choice": lambda v: tune.choice(v), "grid": lambda v: tune.grid_search(v),
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(int(v[0]), int(v[1]) + 1)}
    return {key: makers[kind](values) for key, (kind, values) in space.items()}


def overrides_of(params: dict) -> list[str]:
    """A trial's values as key=value overrides (JSON values: Hydra's grammar reads them)."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


# ---- one trial -----------------------------------------------------------------------------------
def trial(params: dict, setup: dict) -> None:
    """One whole training.fit run inside a Ray Tune trial: its bundle goes into the trial's own
    folder; every validation reports the watched metric to Tune (ASHA decides from those)."""
    import pytorch_lightning as pl
    import ray.tune

    from training.run import run

    folder = Path(ray.tune.get_context().get_trial_dir())
    own = {"name": "trial", "registry": str(folder / "registry"), "run_dir": str(folder / "runs"), "publish": True}
    config = load_config(setup["config"], [*setup["overrides"], *overrides_of(params), *overrides_of(own)],
                         setup["config_path"], setup["config_name"])
    monitor = f"val/{setup['metric']}"

    class Report(pl.Callback):
        def on_validation_end(self, trainer, module):
            value = trainer.callback_metrics.get(monitor)
            if value is not None and not trainer.sanity_checking:
                ray.tune.report({"val": float(value), "step": trainer.global_step})

    summary = run(config, callbacks=(Report(),))
    (folder / "summary.json").write_text(json.dumps(summary))
    final = summary.get(f"val_{setup['metric']}")
    ray.tune.report({"val": final if final is not None else float("nan"), "step": -1, "finished": True})


# ---- the search -----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[fit.parser(add_help=False)])
    p.add_argument("--search", action="append", default=[], help="KEY=KIND:VALUES, KIND one of "
                   f"{', '.join(KINDS)} (repeatable), e.g. model.peft.lora_tuning.adapter_dim=choice:4,8,16")
    p.add_argument("--space", help="a yaml file of KEY: {KIND: [VALUES]} (with --search: both)")
    p.add_argument("--trials", type=int, default=8, help="trials to sample (grid keys multiply them; default 8)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at once (default 1)")
    p.add_argument("--grace-period", type=int, default=2, help="validations before ASHA may stop a trial (default 2)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (default 0)")
    p.add_argument("--experiment-dir", default="runs/tune", help="where trials and their bundles are kept "
                   "(default runs/tune)")
    p.add_argument("--experiment-name", help="its folder under --experiment-dir (default: the adapter name)")
    p.add_argument("--resume", action="store_true", help="carry on the experiment in that folder")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return search(args)
    except (ConfigError, DataError, BundleError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def search(args: argparse.Namespace) -> int:
    from training.task_config import resolve_task
    from training.run import default_name

    if args.ray_workers:
        raise ConfigError("--ray-workers: each trial trains in a Tune worker of its own; use --max-concurrent "
                          "and --cpus-per-trial / --gpus-per-trial")
    overrides = [o for o in fit.overrides_of(args) if not o.startswith(("ray.address=", "ray.token_file="))]
    space = space_of(args.search, args.space)
    if not space:
        raise ConfigError("nothing to search: give --search KEY=KIND:VALUES or --space FILE")
    config = load_config(args.config, overrides, args.config_path, args.config_name)  # the shared part, checked
    for key, (kind, values) in space.items():  # every value a trial may get is a valid config value
        for value in (values if kind in ("choice", "grid") else values[:2]):
            load_config(args.config, [*overrides, *overrides_of({key: value})], args.config_path, args.config_name)
    task = resolve_task(config)
    name = config.name or default_name(config, task)
    setup = {"config": args.config, "config_path": args.config_path, "config_name": args.config_name,
             "overrides": overrides, "metric": task.metric}
    results, seconds = run_search(args, space, setup, task.metric_mode, name)
    trials = trial_table(results, space)
    finished = [t for t in trials if t["error"] is None and t["val"] is not None]
    if not finished:
        errors = "; ".join(f"{t['trial']}: {t['error']}" for t in trials)[:2000]
        print(f"error: every trial failed, nothing published: {errors}", file=sys.stderr)
        return 2
    best = (max if task.metric_mode == "max" else min)(finished, key=lambda t: t["val"])
    summary = json.loads((Path(best["path"]) / "summary.json").read_text())
    record = {"space": {key: {kind: values} for key, (kind, values) in space.items()}, "trials": len(trials),
              "finished": len(finished), "metric": f"val/{task.metric}", "mode": task.metric_mode,
              "best": {"trial": best["trial"], "values": best["values"], "val": best["val"]},
              "seconds": round(seconds, 1), "scheduler": f"ASHA (grace period {args.grace_period} validations)"}
    published = publish_best(Path(summary["published"]), Path(config.registry), name, record, trials)
    print(json.dumps({**record, "published": str(published),
                      **{k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}}, indent=2))
    return 0


def run_search(args, space: dict, setup: dict, mode: str, name: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from modeling import ray_auth
    # --ray-address / --ray-token-file (training.fit's flags): the cluster the trials run on
    token = ray_auth.init_ray(args.ray_address, args.ray_token_file, include_dashboard=False,
                              logging_level=logging.WARNING)
    try:
        storage = Path(args.experiment_dir).resolve()
        experiment = args.experiment_name or name
        trainable = tune.with_resources(tune.with_parameters(trial, setup=setup),
                                        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        started = time.time()
        if args.resume:
            if not tune.Tuner.can_restore(storage / experiment):
                raise ConfigError(f"--resume: no experiment to resume in {storage / experiment}")
            tuner = tune.Tuner.restore(str(storage / experiment), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=tune_space(space),
                tune_config=tune.TuneConfig(metric="val", mode=mode, num_samples=args.trials,
                                            max_concurrent_trials=args.max_concurrent,
                                            scheduler=ASHAScheduler(grace_period=args.grace_period, reduction_factor=2)),
                run_config=tune.RunConfig(name=experiment, storage_path=str(storage)))
        results = tuner.fit()
        return results, time.time() - started
    finally:
        import ray
        ray.shutdown()
        token.close()


def trial_table(results, space: dict) -> list[dict]:
    """One row per trial: its values, last and best validation score, status, where it is."""
    rows = []
    for i, result in enumerate(results):
        values = {key: result.config.get(key) for key in space}
        history = result.metrics_dataframe
        scores = [] if history is None or "val" not in history else [v for v in history["val"].tolist() if v == v]
        finished = bool(result.metrics.get("finished")) if result.metrics else False
        rows.append({"trial": f"trial_{i}", "values": values, "reports": len(scores),
                     "val": (result.metrics or {}).get("val") if finished else None,
                     "stopped_early": not finished and result.error is None,
                     "error": None if result.error is None else str(result.error).splitlines()[-1][:300],
                     "path": str(result.path)})
    return rows


def publish_best(trial_bundle: Path, registry: Path, name: str, record: dict, trials: list[dict]) -> Path:
    """The best trial's bundle with the search recorded: `search.json` (the trial table) added under
    the manifest's checksums, the summary in the manifest, published as a new version of `name`."""
    from modeling import bundle as bundles
    from modeling import registry as store

    bundles.read_bundle(trial_bundle)  # every checksum, before anything is copied
    staged = store.staging_dir(registry)
    try:
        manifest = json.loads((trial_bundle / bundles.MANIFEST).read_text())
        for fname in manifest["files"]:
            shutil.copy2(trial_bundle / fname, staged / fname)
        table = [{k: v for k, v in t.items() if k != "path"} for t in trials]
        (staged / SEARCH_FILE).write_text(json.dumps(table, indent=2, sort_keys=True))
        manifest["files"][SEARCH_FILE] = bundles.sha256_file(staged / SEARCH_FILE)
        manifest["search"] = record
        bundles.check_manifest(manifest)
        (staged / bundles.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return store.publish(staged, registry, name)
    finally:
        store.discard(staged)


if __name__ == "__main__":
    sys.exit(main())
