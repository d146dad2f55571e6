"""One training run, from a parsed FitConfig to a published bundle: data, base, model, Lightning
trainer (or Ray Train), scores, bundle. The command line is training/fit.py."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger

from modeling import bundle as bundles
from modeling import registry as store
from modeling.base import load_base
from modeling.heads import PER_RESIDUE, REGRESSION, HeadSpec
from modeling.lora import LoraSpec, add_lora, export_adapter, export_positions, load_adapter_weights
from modeling.model import TaskModel
from training.config import ConfigError, FitConfig
from training.data import load_splits, settle_labels
from training.datamodule import FlipDataModule
from training.module import AdapterModule, InputMasking
from training.plots import plot_curves
from training.predict import predict, score, scoring_device
from training.task_config import data_files, expected_classes, resolve_task
from training.tasks import Task

log = logging.getLogger("training.fit")


def default_name(config: FitConfig, task: Task) -> str:
    suffix = f"r{config.model.peft.lora_tuning.adapter_dim}" if config.mode == "lora" else config.mode
    return f"{task.name}-{suffix}"


def lora_spec(config: FitConfig) -> LoraSpec:
    t = config.model.peft.lora_tuning
    return LoraSpec(rank=t.adapter_dim, alpha=t.alpha, dropout=t.adapter_dropout, init_a=t.column_init_method,
                    init_b=t.row_init_method, layers=t.layer_selection, targets=list(t.target_modules),
                    tie=t.weight_tying, position_embedding=t.position_embedding_strategy)


def head_hidden(config: FitConfig, kind: str) -> int:
    """BioNeMo sizes per-residue heads with cnn_dim and pooled heads with hidden_layer_size; a size
    for the other kind of head is listed as ignored."""
    sizes, mine = config.notes.head_sizes, "per_residue" if kind == PER_RESIDUE else "sequence"
    for other, size in sizes.items():
        if other != mine:
            key = "model.cnn_dim" if other == "per_residue" else "model.hidden_layer_size"
            config.notes.ignored.append(f"{key} (sizes {other.replace('_', '-')} heads; this task's head is pooled)"
                                        if other == "per_residue" else f"{key} (sizes pooled heads; this task is per-residue)")
    return sizes.get(mine, config.model.head.hidden)


def build_model(config: FitConfig, base, task, registry: Path) -> tuple[TaskModel, LoraSpec | None]:
    """The trainable model for the configured mode, optionally restored from an adapter bundle."""
    mode = config.mode
    encoder = base.encoder
    spec = None
    if mode == "lora":
        spec = lora_spec(config)
        add_lora(encoder, spec, encoder.shape.num_layers)
    elif mode == "full":
        for p in encoder.parameters():
            p.requires_grad_(True)
    h = config.model.head
    head = HeadSpec(task.kind, len(task.labels) or 1, encoder.embed_dim, head_hidden(config, task.kind), h.dropout, h.kernel)
    model = TaskModel(encoder, head).train()  # the loaded base comes in eval mode
    restore = config.model.peft.restore_from_path
    if restore:
        restored = resolve_bundle(restore, registry)
        if restored.manifest["base"]["fingerprint"] != base.fingerprint:
            raise ConfigError(f"restore_from_path {restore}: trained on another base")
        if mode == "lora":
            load_adapter_weights(encoder, restored.adapter, restored.positions)
        if restored.manifest["head"] == head.as_dict():
            model.head.load_state_dict(restored.head)
    return model, spec


def resolve_bundle(ref: str, registry: Path) -> bundles.Bundle:
    """A bundle folder path, or a registry NAME / NAME@VERSION."""
    path = Path(ref)
    if (path / bundles.MANIFEST).is_file():
        return bundles.read_bundle(path)
    return bundles.read_bundle(store.resolve(registry, ref))


def placement(config: FitConfig) -> dict:
    """Lightning's accelerator, devices, nodes and strategy. A file written for GPUs (BioNeMo's
    `accelerator: gpu`, `devices: 2`) still runs where torch sees no GPU: on the CPU, one process,
    said in a warning, instead of failing at once."""
    t = config.trainer
    chosen = {"accelerator": t.accelerator, "devices": t.devices, "num_nodes": t.num_nodes, "strategy": t.strategy}
    if str(t.accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        log.warning("trainer.accelerator=%s but torch sees no GPU here: training on the CPU, one process "
                    "(trainer.devices=%s applies to GPUs)", t.accelerator, t.devices)
        chosen.update(accelerator="cpu", devices=1, strategy="auto")
    return chosen


def validation_every(config: FitConfig, train_batches: int) -> tuple[int | float, int | None]:
    """(val_check_interval, check_val_every_n_epoch) for Lightning. A whole number is a count of
    training steps, counted across epochs (NeMo's meaning; an epoch may be shorter); a fraction is
    a share of an epoch. A short run still validates after its last step."""
    t = config.trainer
    every = t.val_check_interval
    if isinstance(every, int) and not isinstance(every, bool):
        return every * t.accumulate_grad_batches, None
    if t.max_steps > 0 and every == 1.0 and t.max_steps * t.accumulate_grad_batches < train_batches:
        # counted over epochs (under DDP a rank sees only its share of an epoch's batches)
        return t.max_steps * t.accumulate_grad_batches, None
    return every, 1


def make_trainer(config: FitConfig, run_dir: Path, task, train_records: list, on_ray: bool = False,
                 extra_callbacks: tuple = ()) -> tuple[pl.Trainer, ModelCheckpoint]:
    monitor = f"val/{task.metric}"
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=monitor,
                                 mode=task.metric_mode, save_top_k=1, save_weights_only=True,
                                 filename="best")
    callbacks = [checkpoint, TQDMProgressBar(refresh_rate=5), *extra_callbacks]
    if config.early_stopping.enabled:
        callbacks.append(EarlyStopping(monitor=monitor, mode=task.metric_mode, patience=config.early_stopping.patience,
                                       check_on_train_epoch_end=False))
    loggers = [CSVLogger(run_dir, name="", version="")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401  (optional)
        loggers.append(TensorBoardLogger(run_dir, name="tb", version=""))
    except ImportError:
        pass
    t = config.trainer
    val_every, every_epoch = validation_every(config, -(-len(train_records) // config.model.micro_batch_size))
    where = placement(config)
    if on_ray:  # Ray Train made the process group: its strategy and environment join it
        from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment
        where = {"accelerator": "gpu" if config.ray.gpus_per_worker else "cpu", "devices": "auto",
                 "strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()]}
    trainer = pl.Trainer(
        **where, precision=t.precision, max_steps=t.max_steps, max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches, val_check_interval=val_every,
        check_val_every_n_epoch=every_epoch, limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=t.num_sanity_val_steps,
        callbacks=callbacks, logger=loggers, default_root_dir=run_dir,
        use_distributed_sampler=False, enable_model_summary=False)
    if on_ray:
        from ray.train.lightning import prepare_trainer
        trainer = prepare_trainer(trainer)
    return trainer, checkpoint


def write_bundle(staged: Path, config: FitConfig, base, task, model: TaskModel, spec: LoraSpec | None,
                 scale, results: dict, seconds: float, warnings: list[str] = (), monitored: dict | None = None) -> dict:
    mode = config.mode
    tensors = {bundles.HEAD_WEIGHTS: model.head.state_dict()}
    json_files = {}
    if mode == "lora":
        adapter_config, adapter = export_adapter(model.encoder, spec, base.encoder.shape.num_layers)
        adapter_config["base_model_name_or_path"] = base.name
        json_files[bundles.ADAPTER_CONFIG] = adapter_config
        tensors[bundles.ADAPTER_WEIGHTS] = adapter
        if positions := export_positions(model.encoder):
            tensors[bundles.POSITIONS] = positions
    elif mode == "full":
        tensors[bundles.ENCODER_WEIGHTS] = model.encoder.state_dict()
    output = {"kind": task.kind, "labels": list(task.labels)}
    if task.kind == REGRESSION:
        output.update(target_mean=scale.mean, target_std=scale.std)
    manifest = {
        "task": task.name, "task_spec": task.as_dict(), "mode": mode, "output": output,
        "head": model.head_spec.as_dict(), "lora": spec.as_dict() | {"scale": spec.scale} if spec else None,
        "base": base.describe(), "metrics": results,
        "training": {"seconds": round(seconds, 1), "config": asdict(config), "data_warnings": list(warnings),
                     "monitored": monitored},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return bundles.write_bundle(staged, manifest, tensors, json_files)


def train_on_ray(config: FitConfig) -> dict:
    """The same run under Ray Train: ray.workers Lightning workers (DDP over Ray's process group)
    on a local Ray or the cluster at ray.address, each with cpus_per_worker / gpus_per_worker.
    Rank 0 publishes, once; the summary comes back through Ray Train's report."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from modeling import ray_auth
    r = config.ray
    token = ray_auth.init_ray(r.address, r.token_file, include_dashboard=False, logging_level=logging.WARNING)
    try:
        gpus = r.gpus_per_worker
        trainer = TorchTrainer(
            ray_train_loop, train_loop_config={"config": config},
            scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            run_config=RunConfig(name=f"fit-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
                                 storage_path=str(Path(config.run_dir).resolve() / "ray")))
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "summary.json").read_text())
    finally:
        import ray
        ray.shutdown()
        token.close()


def ray_train_loop(loop_config: dict) -> None:
    """One Ray Train worker: the ordinary run, inside Ray's process group. Every rank reports;
    rank 0's report carries the summary, as a checkpoint (what Ray Train keeps for the driver)."""
    import tempfile

    import ray.train

    summary = run(loop_config["config"], on_ray=True)
    if not summary:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "summary.json").write_text(json.dumps(summary))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def check_against_base(config: FitConfig, base) -> list[str]:
    """The yaml's claims about the checkpoint (BioNeMo's architecture keys) against the base loaded:
    the checkpoint wins; each disagreement is said."""
    shape = base.encoder.shape
    actual = {"model.num_layers": shape.num_layers, "model.hidden_size": shape.embed_dim,
              "model.ffn_hidden_size": 4 * shape.embed_dim, "model.num_attention_heads": shape.attention_heads,
              "model.seq_length": 1024}
    said = []
    for key, claimed in config.notes.checkpoint.items():
        if key in actual and claimed != actual[key]:
            said.append(f"{key}={claimed} overridden by the checkpoint ({actual[key]}, {base.name})")
    for line in said:
        log.warning("%s", line)
    return said


def check_restore_path(config: FitConfig) -> None:
    """BioNeMo's .nemo checkpoints (a tar of its yaml and a Megatron state) are not read here."""
    path = str(config.model.restore_encoder_path or "")
    if path.endswith(".nemo"):
        layers = config.notes.checkpoint.get("model.num_layers")
        size = {6: "esm2_t6_8M_UR50D", 12: "esm2_t12_35M_UR50D", 30: "esm2_t30_150M_UR50D",
                33: "esm2_t33_650M_UR50D", 36: "esm2_t36_3B_UR50D"}.get(layers, "esm2_t33_650M_UR50D")
        raise ConfigError(f"model.restore_encoder_path={path}: a BioNeMo .nemo checkpoint is not read here; pass the "
                          f"official checkpoint of the same size instead, by name (model.restore_encoder_path={size}) "
                          f"or as a fair-esm .pt file or a Hugging Face folder")


def check_loss(config: FitConfig, task) -> None:
    loss = config.model.loss_func
    wanted = "MSELoss" if task.kind == REGRESSION else "CrossEntropyLoss"
    if loss is not None and loss != wanted:
        raise ConfigError(f"model.loss_func={loss}: task {task.name} ({task.kind}) trains with {wanted}")


def run(config: FitConfig, on_ray: bool = False, callbacks: tuple = ()) -> dict:
    """One training run; `callbacks`: more Lightning callbacks (training.tune reports through one)."""
    if config.ray.workers and not on_ray:
        return train_on_ray(config)
    check_restore_path(config)
    task = resolve_task(config)
    check_loss(config, task)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    registry = Path(config.registry)
    name = store.validate_name(config.name or default_name(config, task))
    d = config.model.data
    files = data_files(config)
    splits = load_splits(task, files["data"], files["train"], files["val"], files["test"], config.seed,
                         d.val_fraction)
    task, warnings = settle_labels(task, splits)
    if (expected := expected_classes(config)) is not None and task.kind != REGRESSION and expected != len(task.labels):
        raise ConfigError(f"model.data.num_classes / target_sizes say {expected} classes; task {task.name} has "
                          f"{len(task.labels)}: {list(task.labels)}")
    base = load_base(config.model.restore_encoder_path)
    log.info("base %s (%s), fingerprint %s", base.name, base.source, base.fingerprint[:12])
    overridden = check_against_base(config, base)
    model, spec = build_model(config, base, task, registry)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("mode %s: %d trainable parameters; %d train / %d val / %d test sequences",
             config.mode, trainable, *(len(splits[s]) for s in ("train", "val", "test")))
    if config.notes.ignored:
        log.info("%d configuration keys cannot change what is learned here and were ignored (the manifest "
                 "lists them): %s", len(config.notes.ignored), ", ".join(config.notes.ignored[:8])
                 + (", ..." if len(config.notes.ignored) > 8 else ""))

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir) / f"{name}-{stamp}"
    workers = min(d.num_workers, max(0, (os.cpu_count() or 1) - 1))
    if workers < d.num_workers:
        log.info("model.data.num_workers=%d: %d here (the CPUs less one)", d.num_workers, workers)
    data = FlipDataModule(splits, task, config.model.micro_batch_size, config.model.max_length, config.seed,
                          d.bucket_batches, workers)
    module = AdapterModule(model, task, config.model.finetuning_optim, data.splits["val"], data.scale,
                           InputMasking.of(d))
    start = time.time()
    monitored = None
    if config.do_training:
        trainer, checkpoint = make_trainer(config, run_dir, task, data.splits["train"], on_ray, callbacks)
        trainer.fit(module, datamodule=data)
        if not trainer.is_global_zero:
            return {}
        if checkpoint.best_model_score is not None:  # what early stopping / checkpointing watched
            monitored = {"metric": checkpoint.monitor, "best": float(checkpoint.best_model_score),
                         "world_size": trainer.world_size}
        if checkpoint.best_model_path:
            best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            module.on_load_checkpoint(best)
            module.load_state_dict(best["state_dict"])
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", task.metric)
    seconds = time.time() - start
    # Scored where it trained (Lightning hands the model back on the CPU): a 650M model scores a
    # FLIP split in seconds on a GPU and in minutes on a CPU.
    device = trainer.strategy.root_device if config.do_training else scoring_device(placement(config)["accelerator"])
    model.to(device).eval()
    results = {}
    if config.score_val:
        results["val"] = score(task, data.splits["val"], predict(model, data.splits["val"], device=device), data.scale)
    test = limited(splits["test"], config.trainer.limit_test_batches, config.model.micro_batch_size)
    if config.do_testing and test:
        results["test"] = score(task, test, predict(model, test, device=device), data.scale)
    model.cpu()
    results, undefined = undefined_as_null(results)
    if undefined:  # e.g. Spearman of a model that predicts one constant: said, and published as null
        warnings = [*warnings, f"metrics undefined (NaN or infinite, published as null): {', '.join(undefined)}; "
                               f"a constant prediction does this (a collapsed run: try a lower learning rate)"]
        log.warning(warnings[-1])
    monitored = undefined_as_null(monitored)[0] if monitored else monitored
    summary = {"task": task.name, "labels": list(task.labels), "mode": config.mode, "run_dir": str(run_dir),
               "train_seconds": round(seconds, 1), "trainable_parameters": trainable, "scored_on": str(device),
               **{f"{split}_{task.metric}": r[task.metric] for split, r in results.items()},
               "ignored_keys": len(config.notes.ignored), "overridden_by_checkpoint": overridden,
               **({"undefined_metrics": undefined} if undefined else {})}
    if config.publish:
        staged = store.staging_dir(registry)
        try:
            write_bundle(staged, config, base, task, model, spec, data.scale, results, seconds, warnings, monitored)
            summary["published"] = str(store.publish(staged, registry, name))
        finally:
            store.discard(staged)  # no-op after a successful rename
    return summary


def undefined_as_null(value, path: str = "") -> tuple:
    """(value with every NaN/infinite float replaced by None, the dotted paths replaced): JSON, and so
    a manifest, has no NaN, and an undefined score is not a number to rank by."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path]
    if isinstance(value, dict):
        pairs = [(k, undefined_as_null(v, f"{path}.{k}" if path else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, found) in pairs for p in found]
    if isinstance(value, list):
        items = [undefined_as_null(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, found in items for p in found]
    return value, []


def limited(records: list, limit, batch_size: int) -> list:
    """Lightning's limit_*_batches for the test split scored here: a whole number of batches of
    `batch_size`, or a share of the records (1.0: all)."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return records[:limit * batch_size]
    return records[:round(len(records) * float(limit))] if float(limit) < 1 else records
