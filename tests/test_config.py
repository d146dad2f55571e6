"""The training configuration: Hydra composition, the typed tree, flags, and BioNeMo's keys."""
from pathlib import Path

import pytest

from training.config import ConfigError, FitConfig, load_config
from training.fit import parse_args
from training.run import default_name, lora_spec
from training.module import schedule
from training.task_config import resolve_task
from training.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
PROJECT_YAML = ROOT / "training" / "configs" / "downstream_sec_str_LORA.yaml"
BIONEMO = ROOT / "tests" / "data" / "bionemo_v1"


def test_flags_and_dotted_overrides():
    config = parse_args(["--task", "scl", "--rank", "8", "--lr", "1e-4", "--layers", "0,2",
                         "--target-modules", "attention_qkv", "model.optim.weight_decay=0.1"])
    assert isinstance(config, FitConfig) and config.task == "scl"
    assert config.model.finetuning_optim.lr == pytest.approx(1e-4)
    assert config.model.finetuning_optim.weight_decay == pytest.approx(0.1)  # this project's earlier key
    assert config.model.finetuning_optim.sched.name == "WarmupCosine"  # an override is no BioNeMo file
    spec = lora_spec(config)
    assert (spec.rank, spec.layers, spec.targets) == (8, [0, 2], ["q_proj", "k_proj", "v_proj"])
    assert default_name(config, resolve_task(config)) == "scl-r8"
    tied = lora_spec(parse_args(["--adapter-dim", "4", "--tie", "--position-embedding", "add"]))
    assert (tied.rank, tied.tie, tied.position_embedding) == (4, True, "add")


def test_bionemo_keys_as_overrides():
    config = load_config(None, ["model.peft.enabled=True", "model.peft.lora_tuning.adapter_dim=16",
                                "model.encoder_frozen=False", "model.restore_encoder_path=/x/esm2.pt",
                                "do_training=True", "model.peft.lora_tuning.adapter_dropout=0.1"])
    assert config.model.peft.lora_tuning.adapter_dim == 16
    assert config.model.restore_encoder_path == "/x/esm2.pt"
    assert config.model.peft.lora_tuning.adapter_dropout == pytest.approx(0.1)
    assert config.mode == "lora"
    assert load_config(None, ["model.peft.enabled=false", "model.encoder_frozen=false"]).mode == "full"


def test_modes_from_the_command_line():
    assert parse_args(["--mode", "frozen"]).mode == "frozen"
    config = parse_args(["--mode", "full", "--task", "gb1"])
    assert default_name(config, resolve_task(config)) == "gb1-full"
    assert parse_args([]).mode == "lora"


def test_the_projects_own_yaml_runs_through_the_loader():
    config = load_config(PROJECT_YAML, ["model.peft.lora_tuning.adapter_dim=4"])
    assert config.name == "sec_str-r16"
    assert config.notes.head_sizes == {"per_residue": 32}  # cnn_dim
    assert config.model.finetuning_optim.name == "adam"
    assert config.model.peft.lora_tuning.adapter_dim == 4  # override beats the file


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match="model.peft.lora_tuning.adapter_dim"):
        load_config(None, ["model.peft.lora_tuning.adaptor_dim=8"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_stepz'.*trainer.max_steps"):
        load_config(None, ["trainer.max_stepz=3"])


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  peft:\n    lora_tunning:\n      adapter_dim: 3\n")
    with pytest.raises(ConfigError, match="lora_tunning"):
        load_config(path)


def test_wrong_types_and_malformed_overrides():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["model.peft.lora_tuning.adapter_dim=big"])
    with pytest.raises(ConfigError, match="true/false"):
        load_config(None, ["model.encoder_frozen=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="modify_percent"):
        load_config(None, ["model.data.modify_percent=1.5"])


def test_hydra_composes_defaults_lists_and_the_seeds_command_form(tmp_path):
    (tmp_path / "base.yaml").write_text("trainer: {max_steps: 7, log_every_n_steps: 3}\nmodel: {micro_batch_size: 2}\n")
    (tmp_path / "run.yaml").write_text("defaults: [base]\nmodel: {micro_batch_size: 4}\n")
    config = parse_args(["--config-path", str(tmp_path), "--config-name", "run", "trainer.log_every_n_steps=5"])
    assert (config.trainer.max_steps, config.model.micro_batch_size, config.trainer.log_every_n_steps) == (7, 4, 5)
    same = parse_args([f"--config-path={tmp_path}", "--config-name=run.yaml", "trainer.log_every_n_steps=5"])
    assert same == config
    assert parse_args(["--config", str(tmp_path / "run.yaml")]).trainer.max_steps == 7  # --config composes too
    with pytest.raises(ConfigError, match="no .*missing.yaml"):
        parse_args(["--config-path", str(tmp_path), "--config-name", "missing"])


def test_interpolations_resolve_and_unset_variables_matter_only_where_used(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text(
        "exp_manager: {exp_dir: '${oc.env:NOT_SET_ANYWHERE}/results'}\n"  # ignored: never resolved
        "model:\n  micro_batch_size: ${multiply:2, 3}\n  seq_length: 514\n"
        "  data: {max_seq_length: '${model.seq_length}', dataset_path: '${oc.env:MY_DATA}/flip'}\n")
    monkeypatch.setenv("MY_DATA", "/data")
    config = load_config(tmp_path / "c.yaml")
    assert (config.model.micro_batch_size, config.model.max_length) == (6, 512)  # tokens -> residues
    assert config.model.data.dataset_path == "/data/flip"
    assert any(k.startswith("exp_manager.exp_dir") for k in config.notes.ignored)
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(ConfigError, match=r"model.data.dataset_path.*MY_DATA.*command line"):
        load_config(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", ["model.data.dataset_path=/elsewhere"]).model.data.dataset_path == "/elsewhere"


@pytest.mark.parametrize("name, mode, optim, sched, head, masking", [
    ("downstream_sec_str_LORA", "lora", ("adam", 1e-4), ("WarmupAnnealing", None, 10.0, 1e-5), {"per_residue": 32}, 0.0),
    ("downstream_flip_sec_str", "frozen", ("adam", 1e-3), ("constant", 0, None, 0.0), {"per_residue": 32}, 0.0),
    ("downstream_flip_scl", "frozen", ("adam", 5e-4), ("WarmupAnnealing", 10, None, 1e-5), {"sequence": 256}, 0.15),
    ("downstream_flip_meltome", "frozen", ("adam", 5e-4), ("WarmupAnnealing", 10, None, 1e-5), {"sequence": 128}, 0.0),
])
def test_bionemo_files_compose_as_bionemo_reads_them(name, mode, optim, sched, head, masking):
    """The test copies of BioNeMo v1.8's downstream files (tests/data/bionemo_v1, the same keys and
    values): composed over pretrain_esm2_650M and base_config, given only the two keys a user gives."""
    config = parse_args([f"--config-path={BIONEMO}", f"--config-name={name}", "model.data.dataset_path=/data",
                         "model.restore_encoder_path=/base"])
    assert config.mode == mode  # the model class (`target`) decides whether peft is on, as in BioNeMo
    o = config.model.finetuning_optim
    assert (o.name, o.lr, o.betas, o.eps) == (*optim, [0.9, 0.999], 1e-8)
    assert (o.sched.name, o.sched.warmup_steps, o.sched.warmup_ratio, o.sched.min_lr) == sched
    assert config.notes.head_sizes == head and config.model.data.modify_percent == masking
    t = config.trainer
    assert (t.val_check_interval, t.limit_val_batches, t.limit_test_batches, t.log_every_n_steps) == (20, 1000, 1000, 1)
    assert (t.max_epochs, t.max_steps, t.accelerator, t.gradient_clip_val) == (20, 500000, "gpu", 1.0)
    assert config.model.max_length == 1022 and config.seed == 1234 and config.name == "esm2nv_flip"
    assert config.notes.checkpoint["model.num_layers"] == 33 and config.notes.checkpoint["model.ffn_hidden_size"] == 5120
    ignored = " ".join(config.notes.ignored)
    for key in ("exp_manager.", "model.megatron_amp_O2" if "LORA" in name else "model.tensor_model_parallel_size",
                "model.data.emb_batch_size", "model.optim.lr", "model.dwnstr_task_validation", "trainer.benchmark"):
        assert key in ignored, key


def test_nemo_schedules_as_nemo_computes_them():
    from training.config import OptimConfig, SchedConfig
    annealing = schedule(OptimConfig(lr=1e-3, sched=SchedConfig("WarmupAnnealing", 10, None, 1e-4)), 110)
    assert annealing(0) == pytest.approx(1 / 11) and annealing(10) == pytest.approx(1.0)
    assert annealing(60) == pytest.approx(0.1 + 0.5 * 0.9) and annealing(110) == pytest.approx(0.1)
    whole_run = schedule(OptimConfig(lr=1e-3, sched=SchedConfig("WarmupAnnealing", None, 10.0, 1e-5)), 100)
    assert whole_run(99) == pytest.approx(100 / 1001)  # warmup_ratio 10: the run never leaves warm-up
    assert schedule(OptimConfig(sched=SchedConfig("constant", 0)), 50)(30) == 1.0
    with pytest.raises(ValueError, match="not both"):
        schedule(OptimConfig(sched=SchedConfig("WarmupAnnealing", 5, 0.1)), 50)


def test_a_tasks_recipe_sets_defaults_that_the_users_yaml_and_flags_still_win_over(tmp_path):
    task = tmp_path / "mytask.yaml"
    task.write_text("name: mytask\nkind: regression\nrecipe:\n  trainer.max_epochs: 7\n"
                    "  model.finetuning_optim.encoder_lr: 3.0e-4\n  model.peft.lora_tuning.target_modules: [fc1, fc2]\n")
    config = parse_args(["--task-file", str(task)])
    assert config.trainer.max_epochs == 7 and config.model.finetuning_optim.encoder_lr == pytest.approx(3e-4)
    assert lora_spec(config).targets == ["fc1", "fc2"]
    assert parse_args(["--task-file", str(task), "--max-epochs", "2"]).trainer.max_epochs == 2  # a flag wins
    written = tmp_path / "run.yaml"
    written.write_text(f"task_file: {task}\ntrainer: {{max_epochs: 4}}\n")
    assert load_config(written).trainer.max_epochs == 4  # a yaml is a recipe of its own
    assert load_config(written).model.finetuning_optim.encoder_lr is None
    assert parse_args([]).trainer.max_epochs == TASKS["sec_str"].recipe["trainer.max_epochs"]  # the default task's
    task.write_text("name: mytask\nkind: regression\nrecipe: {trainer.max_epoch: 7}\n")
    with pytest.raises(ConfigError, match="the task's recipe: unknown config key 'trainer.max_epoch'"):
        parse_args(["--task-file", str(task)])
    task.write_text("name: mytask\nkind: regression\nrecipe: [8]\n")
    with pytest.raises(ConfigError, match="recipe is a mapping of config keys"):
        parse_args(["--task-file", str(task)])
