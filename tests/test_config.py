from pathlib import Path

import pytest

from training.config import ConfigError, load_config, mode_of
from training.fit import default_name, lora_spec, parse_args
from training.task_config import resolve_task

BIONEMO_YAML = Path(__file__).resolve().parent.parent / "training" / "configs" / "downstream_sec_str_LORA.yaml"


def test_flags_and_dotted_overrides():
    config = parse_args(["--task", "scl", "--rank", "8", "--lr", "1e-4", "--layers", "0,2",
                         "--target-modules", "attention_qkv", "model.optim.weight_decay=0.1"])
    assert config["task"] == "scl"
    assert config["model"]["optim"]["lr"] == pytest.approx(1e-4)
    assert config["model"]["optim"]["weight_decay"] == pytest.approx(0.1)
    spec = lora_spec(config)
    assert (spec.rank, spec.layers, spec.targets) == (8, [0, 2], ["q_proj", "k_proj", "v_proj"])
    assert default_name(config, resolve_task(config)) == "scl-r8"
    tied = lora_spec(parse_args(["--adapter-dim", "4", "--tie", "--position-embedding", "add"]))
    assert (tied.rank, tied.tie, tied.position_embedding) == (4, True, "add")


def test_bionemo_keys_as_overrides():
    config = load_config(None, ["model.peft.enabled=True", "model.peft.lora_tuning.adapter_dim=16",
                                "model.encoder_frozen=False", "model.restore_encoder_path=/x/esm2.pt",
                                "do_training=True", "model.peft.lora_tuning.adapter_dropout=0.1"])
    assert config["model"]["peft"]["lora_tuning"]["adapter_dim"] == 16
    assert config["model"]["restore_encoder_path"] == "/x/esm2.pt"
    assert config["model"]["peft"]["lora_tuning"]["adapter_dropout"] == pytest.approx(0.1)
    assert mode_of(config) == "lora"
    assert mode_of(load_config(None, ["model.peft.enabled=false", "model.encoder_frozen=false"])) == "full"


def test_modes_from_the_command_line():
    assert mode_of(parse_args(["--mode", "frozen"])) == "frozen"
    config = parse_args(["--mode", "full", "--task", "gb1"])
    assert default_name(config, resolve_task(config)) == "gb1-full"
    assert mode_of(parse_args([])) == "lora"


def test_bionemo_style_yaml_runs_through_the_loader():
    config = load_config(BIONEMO_YAML, ["model.peft.lora_tuning.adapter_dim=4"])
    assert config["name"] == "sec_str-r16"
    assert config["model"]["head"]["hidden"] == 32  # cnn_dim alias
    assert config["model"]["optim"]["name"] == "adam"  # finetuning_optim alias
    assert config["model"]["peft"]["lora_tuning"]["adapter_dim"] == 4  # override beats the file


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
