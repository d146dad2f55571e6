"""training.tune on a local token-authenticated Ray: a tiny space (two trials of a few steps) on the
tiny base; the best trial published as a bundle that records its search and is served as any other."""
from __future__ import annotations

import json

import pytest

from modeling import bundle as bundles
from modeling import registry as store
from modeling.base import load_base
from serving.engine import Engine, EngineConfig
from training import tune
from training.config import ConfigError


def test_a_search_publishes_its_best_trial_with_the_search_recorded(tmp_path, tiny_base_dir, sec_str_csv, capsys):
    registry = tmp_path / "reg"
    code = tune.main(["--base", str(tiny_base_dir), "--data-dir", str(sec_str_csv), "--registry", str(registry),
                      "--name", "ss-tuned", "--max-steps", "4", "--batch-size", "4", "--rank", "2",
                      "--experiment-dir", str(tmp_path / "tune"),
                      "--search", "model.finetuning_optim.lr=grid:1e-4,3e-3", "--search",
                      "model.peft.lora_tuning.target_modules=choice:[q_proj,v_proj]", "--trials", "1",
                      "trainer.val_check_interval=2"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    report = json.loads(out[out.rindex("\n{") + 1:])
    assert report["trials"] == 2 and report["finished"] >= 1 and report["metric"] == "val/q3"
    folder = registry / "ss-tuned" / "1"
    assert report["published"] == str(folder) and store.versions(registry, "ss-tuned") == [1]
    bundle = bundles.read_bundle(folder)  # every checksum, search.json's included
    search = bundle.manifest["search"]
    assert search["best"]["values"]["model.finetuning_optim.lr"] in (1e-4, 3e-3)
    assert search["space"]["model.finetuning_optim.lr"] == {"grid": [1e-4, 3e-3]}
    assert {row["values"]["model.finetuning_optim.lr"] for row in json.loads((folder / tune.SEARCH_FILE).read_text())} \
        == {1e-4, 3e-3}
    assert "test" in bundle.manifest["metrics"]  # scored on the test split like any training.fit run
    table = json.loads((folder / tune.SEARCH_FILE).read_text())
    assert len(table) == 2 and all("values" in row and "val" in row for row in table)
    assert bundle.manifest["files"][tune.SEARCH_FILE] == bundles.sha256_file(folder / tune.SEARCH_FILE)
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8))
    assert engine.predict([("ss-tuned", "MKTAYIAK")])[0].labels  # served like any bundle


def test_a_search_where_every_trial_fails_publishes_nothing(tmp_path, tiny_base_dir, sec_str_csv, capsys):
    registry = tmp_path / "reg"
    code = tune.main(["--base", str(tiny_base_dir), "--data-dir", str(sec_str_csv), "--registry", str(registry),
                      "--max-steps", "2", "--experiment-dir", str(tmp_path / "tune"), "--trials", "1",
                      "--search", f"model.restore_encoder_path=choice:{tmp_path / 'no-such-base'}"])
    assert code == 2 and not store.versions(registry, "sec_str-r2") and not store.versions(registry, "sec_str-r16")
    err = capsys.readouterr().err
    assert "every trial failed, nothing published" in err and "no-such-base" in err


@pytest.mark.parametrize("flags, message", [
    (["--search", "model.finetuning_optim.lrr=choice:1,2"], "model.finetuning_optim.lr"),
    (["--search", "model.finetuning_optim.lr=normal:1,2"], "kind 'normal'"),
    (["--search", "model.finetuning_optim.lr=loguniform:3,1"], "low < high"),
    (["--search", "model.peft.lora_tuning.adapter_dim=choice:big"], "expected an integer"),
    (["--search", "model.head.kernel=choice:3,4"], "odd width"),  # every value checked before any trial
    (["--search", "lr"], "KEY=KIND:VALUES"),
    ([], "nothing to search"),
])
def test_bad_spaces_are_refused_before_any_trial(flags, message, tmp_path, capsys):
    assert tune.main(["--experiment-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_spaces_from_a_yaml_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model.peft.lora_tuning.adapter_dim: {choice: [4, 8]}\nmodel.optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert tune.space_of([], str(path)) == {"model.peft.lora_tuning.adapter_dim": ("choice", [4, 8]),
                                            "model.finetuning_optim.lr": ("loguniform", [1e-4, 1e-2])}
    with pytest.raises(ConfigError, match="expected"):
        path.write_text("model.head.hidden: [4, 8]\n")
        tune.space_of([], str(path))
