"""The training configuration: one typed tree (`FitConfig`, dataclasses validated by OmegaConf),
parsed once at the entry point from what Hydra composes.

  python -m training.fit --config-path=DIR --config-name=NAME key=value ...   (Hydra's form, BioNeMo's)
  python -m training.fit --config FILE.yaml key=value ...
  python -m training.fit --task sec_str --rank 16 ...                         (flags: shortcuts for keys)

Hydra composes the yaml with its `defaults:` list from the config folder and applies the key=value
overrides (Hydra's own grammar); training/bionemo.py then reads that tree as BioNeMo means it (its
key names, interpolations, keys that describe the checkpoint, keys that cannot change what is
learned); what remains must be a key of `FitConfig`, of the right type, or it is an error naming
the nearest valid key.
"""
from __future__ import annotations

import difflib
import logging
import math
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from modeling.targets import ATTENTION_TARGETS

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


# ---- the schema -----------------------------------------------------------------------------------
@dataclass
class TaskDef:
    """A task declared (or changed) on the command line: --kind, --labels, ..."""
    kind: Optional[str] = None
    labels: Any = None  # a comma-separated string or a list
    label_column: Optional[str] = None
    sequence_column: Optional[str] = None
    mask_column: Optional[str] = None
    metric: Optional[str] = None
    split: Optional[str] = None


@dataclass
class TrainerConfig:
    """Lightning's Trainer arguments, as BioNeMo's `trainer:` section passes them."""
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    max_steps: int = -1
    max_epochs: Optional[int] = 3
    accumulate_grad_batches: int = 1
    val_check_interval: Any = 1.0  # a whole number: every N training steps (across epochs); a fraction: of an epoch
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0  # the test split scored at the end: N batches of micro_batch_size, or a fraction
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 10
    num_sanity_val_steps: int = 0


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 3


@dataclass
class RayConfig:
    """Train under Ray Train instead of in this process: workers > 0 (a local Ray, or address)."""
    workers: int = 0
    address: Optional[str] = None
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    token_file: Optional[str] = None


@dataclass
class HeadConfig:
    hidden: int = 32  # BioNeMo: cnn_dim (per-residue tasks), hidden_layer_size (sequence tasks)
    dropout: float = 0.25  # BioNeMo: dropout_rate
    kernel: int = 7


@dataclass
class LoraTuning:
    adapter_dim: int = 16
    alpha: Optional[float] = None  # None = adapter_dim (scale 1), as in BioNeMo
    adapter_dropout: float = 0.0
    column_init_method: str = "xavier"
    row_init_method: str = "zero"
    layer_selection: Optional[list[int]] = None
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    weight_tying: bool = False
    position_embedding_strategy: Optional[str] = None


@dataclass
class PeftConfig:
    enabled: bool = True
    restore_from_path: Optional[str] = None  # an adapter bundle folder or registry NAME[@VERSION]
    lora_tuning: LoraTuning = field(default_factory=LoraTuning)


@dataclass
class SchedConfig:
    """The learning-rate schedule. WarmupCosine (ours): linear warm-up over warmup_steps, then
    cosine decay to 10%. BioNeMo/NeMo's: WarmupAnnealing (linear warm-up over warmup_steps or
    warmup_ratio x steps, then linear decay to min_lr), CosineAnnealing (then cosine to min_lr),
    constant (no schedule: what NeMo does when `sched` is absent)."""
    name: str = "WarmupCosine"
    warmup_steps: Optional[int] = 100
    warmup_ratio: Optional[float] = None
    min_lr: float = 0.0


@dataclass
class OptimConfig:
    """BioNeMo's `model.finetuning_optim`. adam: L2 weight decay (torch.optim.Adam, as NeMo's adam);
    adamw and fused_adam (NeMo's FusedAdam decouples the decay): AdamW."""
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    encoder_lr: Optional[float] = None  # LoRA/encoder parameters (default = lr)
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class DatasetStems:
    """BioNeMo's model.data.dataset: file stems under <dataset_path>/<split>/ (x000, x[000..003])."""
    train: Optional[str] = None
    val: Optional[str] = None
    test: Optional[str] = None


@dataclass
class DataConfig:
    dataset_path: Optional[str] = None  # a data file or folder (BioNeMo: the folder of train/ val/ test/)
    train: Any = None  # files of each split (str or list), instead of dataset_path's split column
    val: Any = None
    test: Any = None
    val_fraction: float = 0.1
    num_workers: int = 0  # DataLoader processes (at most the CPUs here minus one)
    bucket_batches: int = 50
    # BioNeMo's task keys, as BioNeMo means them (training/task_config.py)
    task_name: Optional[str] = None
    task_type: Optional[str] = None
    sequence_column: Optional[str] = None
    target_column: Any = None
    target_sizes: Any = None
    mask_column: Any = None
    num_classes: Optional[int] = None
    dataset: DatasetStems = field(default_factory=DatasetStems)
    # Input masking while training (BioNeMo's modify_percent): that share of residues is modified,
    # of which mask_percent become <mask>, perturb_percent a random residue, identity_percent stay.
    modify_percent: float = 0.0
    mask_percent: float = 0.8
    perturb_percent: float = 0.1
    identity_percent: float = 0.1


@dataclass
class ModelConfig:
    restore_encoder_path: Optional[str] = None  # --base: fair-esm .pt, HF folder, model name; None = default
    encoder_frozen: bool = True
    micro_batch_size: int = 8
    max_length: int = 1022  # training crop (residues); evaluation always sees up to 1022
    loss_func: Optional[str] = None  # BioNeMo's: checked against the task's kind (its loss is fixed by it)
    head: HeadConfig = field(default_factory=HeadConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    finetuning_optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class Notes:
    """What reading the configuration found (not settable): shown to the user and kept in the manifest."""
    ignored: list[str] = field(default_factory=list)  # keys that cannot change what is learned
    checkpoint: dict[str, Any] = field(default_factory=dict)  # architecture keys: what the yaml says
    head_sizes: dict[str, int] = field(default_factory=dict)  # cnn_dim / hidden_layer_size, by task kind
    source: Optional[str] = None  # the composed yaml, if any


@dataclass
class FitConfig:
    task: Optional[str] = None  # a built-in task or a new task's name; None = sec_str, the task file's, or task_name's
    task_file: Optional[str] = None  # a task declaration in yaml (training/tasks/*.yaml show the form)
    task_def: TaskDef = field(default_factory=TaskDef)
    name: Optional[str] = None  # adapter name in the registry; default <task>-r<rank> (or -frozen / -full)
    registry: str = "adapters"
    run_dir: str = "runs"
    seed: int = 0
    do_training: bool = True
    do_testing: bool = True
    score_val: bool = True  # score the whole validation split once more at the end (for the manifest)
    publish: bool = True
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    notes: Notes = field(default_factory=Notes)

    @property
    def mode(self) -> str:
        """lora / frozen / full, from BioNeMo's peft.enabled and encoder_frozen."""
        if self.model.peft.enabled:
            return "lora"
        return "frozen" if self.model.encoder_frozen else "full"


def _keys(cls, prefix: str = "") -> dict[str, Any]:
    """Every settable key of a config dataclass -> its field type (sections included)."""
    out = {}
    for f in fields(cls):
        path = prefix + f.name
        if path == "notes":
            continue
        out[path] = f.type
        if isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            out.update(_keys(f.default_factory, path + "."))
    return out


VALID_KEYS = _keys(FitConfig)
SECTIONS = {key for key in VALID_KEYS
            if any(other.startswith(key + ".") for other in VALID_KEYS)}

MODE_OVERRIDES = {"lora": ["model.peft.enabled=true", "model.encoder_frozen=true"],
                  "frozen": ["model.peft.enabled=false", "model.encoder_frozen=true"],
                  "full": ["model.peft.enabled=false", "model.encoder_frozen=false"]}


def nearest(key: str) -> str:
    near = difflib.get_close_matches(key, [k for k in VALID_KEYS if k not in SECTIONS], n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


# ---- loading --------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] = (), config_dir: str | Path | None = None,
                config_name: str | None = None) -> FitConfig:
    """The FitConfig of a yaml (`path`, or Hydra's config_dir + config_name) and key=value overrides."""
    from training import bionemo
    if path is not None:
        if config_dir is not None or config_name is not None:
            raise ConfigError("give --config FILE or --config-path/--config-name, not both")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        if path.suffix != ".yaml":
            raise ConfigError(f"--config {path}: Hydra reads .yaml files (rename it)")
        config_dir, config_name = path.parent, path.stem
    elif config_name is not None and config_dir is None:
        config_dir = Path.cwd()
    config_name = config_name.removesuffix(".yaml") if config_name else None
    composed = compose(config_dir, config_name, overrides)
    written = compose(config_dir, config_name, []) if config_name else None  # the files alone
    notes = Notes(source=str(Path(config_dir) / f"{config_name}.yaml") if config_name else None)
    values = bionemo.translate(composed, notes, written)
    config = _build(values)
    # The task's recipe is what `--task T` alone means; a yaml is a recipe of its own (BioNeMo's files
    # run as BioNeMo reads them), so it applies only to runs without one, under the flags.
    if config_name is None and (recipe := task_recipe(config)):
        config = _build({**{k: v for k, v in recipe.items() if k not in values}, **values}, recipe)
    config.notes = notes
    _check(config)
    for key in notes.ignored:
        log.info("config key %s cannot change what is learned here; ignored", key)
    return config


def _build(values: dict[str, Any], recipe: dict[str, Any] | None = None) -> FitConfig:
    schema = OmegaConf.structured(FitConfig)
    for key, value in values.items():
        try:
            _set(schema, key, value)
        except ConfigError as exc:
            raise ConfigError(f"the task's recipe: {exc}" if recipe and key in recipe else str(exc)) from None
    return OmegaConf.to_object(schema)


def task_recipe(config: FitConfig) -> dict[str, Any]:
    """The recipe the run's task declares (a task that cannot be resolved is refused here, before any work)."""
    from training.task_config import resolve_task
    return dict(resolve_task(config).recipe)


def compose(config_dir: str | Path | None, config_name: str | None, overrides: list[str]):
    """Hydra's composition: the primary yaml, its defaults list, then the overrides (each may add a
    key: they set keys of this project that BioNeMo's files do not have)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from training import bionemo

    forced = []
    for text in overrides:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip().lstrip("+~"):
            raise ConfigError(f"override {text!r}: expected key=value, e.g. model.finetuning_optim.lr=1e-4")
        forced.append(text if text.startswith(("+", "~")) else "++" + bionemo.cli_key(text))
    folder = Path(config_dir or Path(__file__).parent / "configs").resolve()
    if config_name is not None:
        config_name = config_name.removesuffix(".yaml")
        if not (folder / f"{config_name}.yaml").is_file():
            raise ConfigError(f"--config-name {config_name}: no {folder / config_name}.yaml")
    GlobalHydra.instance().clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Hydra's notes on defaults lists without _self_
            with initialize_config_dir(config_dir=str(folder), version_base=None, job_name="training.fit"):
                return hydra_compose(config_name=config_name, overrides=forced)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"cannot compose the configuration: {str(exc).strip()}") from None
    finally:
        GlobalHydra.instance().clear()


def _set(schema, key: str, value: Any) -> None:
    if key not in VALID_KEYS:
        raise ConfigError(f"unknown config key {key!r}{nearest(key)}")
    try:
        OmegaConf.update(schema, key, value, merge=False)
    except (ValidationError, ConfigKeyError):
        raise ConfigError(f"{key}: expected {_type_name(VALID_KEYS[key])}, got {value!r}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _type_name(kind) -> str:
    text = str(kind)
    for name, said in (("list", "a list"), ("bool", "true/false"), ("int", "an integer"), ("float", "a number"),
                       ("str", "a string")):
        if name in text:
            return said
    return text


def _check(config: FitConfig) -> None:
    """Ranges and combinations a type cannot say."""
    for key in VALID_KEYS:  # the manifest records the config as JSON, which has no NaN
        value = config
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: a finite number")
    data = config.model.data
    if not 0 <= data.modify_percent < 1:
        raise ConfigError(f"model.data.modify_percent={data.modify_percent}: a share of residues in [0, 1)")
    shares = (data.mask_percent, data.perturb_percent, data.identity_percent)
    if data.modify_percent and (min(shares) < 0 or abs(sum(shares) - 1) > 1e-6):
        raise ConfigError(f"model.data mask_percent + perturb_percent + identity_percent = {sum(shares):g}: they "
                          f"split the modified residues, so they must add up to 1")
    if config.model.head.kernel < 1 or config.model.head.kernel % 2 == 0:
        raise ConfigError(f"model.head.kernel={config.model.head.kernel}: an odd width (the convolution keeps the "
                          f"sequence's length)")
    if config.model.micro_batch_size < 1:
        raise ConfigError("model.micro_batch_size must be at least 1")
    if not 1 <= config.model.max_length <= 1022:
        raise ConfigError(f"model.max_length={config.model.max_length}: 1 to 1022 residues")
