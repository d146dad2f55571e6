"""Train a few steps on a tiny random base, publish, reload: the bundle round trip."""
import json

import pytest
import torch

from modeling import bundle as bundles
from modeling import registry as store
from modeling.alphabet import tokenize
from modeling.base import load_base
from modeling.model import load_task_model
from training import evaluate, fit, run
from training.config import ConfigError


def train(tmp_path, base_dir, data, *extra):
    argv = ["--base", str(base_dir), "--data-dir", str(data), "--registry", str(tmp_path / "reg"),
            "--run-dir", str(tmp_path / "runs"), "--max-steps", "6", "--batch-size", "4", *extra]
    config = fit.parse_args(argv)
    return config, run.run(config)


def test_lora_round_trip_publish_reload_identical(tmp_path, tiny_base_dir, sec_str_csv, monkeypatch):
    captured = {}
    original = run.write_bundle

    def spy(staged, config, base, task, model, *rest):
        captured["model"] = model
        return original(staged, config, base, task, model, *rest)

    monkeypatch.setattr(run, "write_bundle", spy)
    config, summary = train(tmp_path, tiny_base_dir, sec_str_csv, "--rank", "4", "--name", "ss")
    folder = tmp_path / "reg" / "ss" / "1"
    assert summary["published"] == str(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["lora"]["rank"] == 4 and manifest["mode"] == "lora"
    assert manifest["base"]["fingerprint"] == load_base(str(tiny_base_dir)).fingerprint
    assert set(manifest["metrics"]) == {"val", "test"} and "q3" in manifest["metrics"]["test"]
    assert list((tmp_path / "runs").glob("ss-*/curves.png")), "loss/metric PNG missing"

    trained = captured["model"].eval()
    reloaded = load_task_model(load_base(str(tiny_base_dir)).encoder, bundles.read_bundle(folder))
    tokens = tokenize(["MKTAYIAKQRQISFV", "MKTLLVAAG"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens)[0], trained(tokens)[0], atol=1e-6, rtol=1e-6)
        lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
        assert any(p.abs().sum() > 0 for p in lora_b), "training did not move the adapter"

    # a second run publishes a new immutable version; restore_from_path resumes from the first
    _, again = train(tmp_path, tiny_base_dir, sec_str_csv, "--rank", "4", "--name", "ss",
                     "--restore-from", "ss@1", "--max-steps", "1")
    assert again["published"].endswith("ss/2")
    assert json.loads((folder / "manifest.json").read_text()) == manifest

    result = evaluate.evaluate(str(folder), sec_str_csv)
    assert result["sequences"] == 48 and result["residues"] == sum(
        len(line.split(",")[1]) - 2 for line in sec_str_csv.read_text().splitlines()[1:])
    assert result["q3"] == result["accuracy"] and len(result["confusion_matrix"]) == 3


@pytest.mark.parametrize("mode, trainable_encoder", [("frozen", False), ("full", True)])
def test_frozen_and_full_modes(tmp_path, tiny_base_dir, sec_str_csv, mode, trainable_encoder):
    _, summary = train(tmp_path, tiny_base_dir, sec_str_csv, "--mode", mode, "--max-steps", "2")
    manifest = bundles.read_manifest(tmp_path / "reg" / f"sec_str-{mode}" / "1")
    assert manifest["mode"] == mode and manifest["lora"] is None
    head_params = 32 * 32 * 7 + 32 + 32 * 3 * 7 + 3
    assert (summary["trainable_parameters"] > head_params) == trainable_encoder


def test_regression_task_records_target_scale(tmp_path, tiny_base_dir):
    lines = ["sequence,target,set,validation"] + [
        f"MKTAYIAK{'A' * (i % 7)}GG,{10 + i},{'test' if i > 20 else 'train'},{'True' if i % 5 == 0 else ''}"
        for i in range(26)]
    data = tmp_path / "g.csv"
    data.write_text("\n".join(lines) + "\n")
    _, summary = train(tmp_path, tiny_base_dir, data, "--task", "gb1", "--rank", "2", "--max-steps", "3")
    manifest = bundles.read_manifest(tmp_path / "reg" / "gb1-r2" / "1")
    assert manifest["output"]["target_mean"] == pytest.approx(sum(10 + i for i in range(21) if i % 5) / 16)
    assert "spearman" in manifest["metrics"]["test"] and "mse" in manifest["metrics"]["test"]


def test_failed_run_leaves_nothing_in_the_registry(tmp_path, tiny_base_dir, sec_str_csv, monkeypatch):
    def broken(staged, *args, **kwargs):
        (staged / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(run, "write_bundle", broken)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, tiny_base_dir, sec_str_csv, "--rank", "2", "--max-steps", "1")
    registry = tmp_path / "reg"
    assert not (registry / "sec_str-r2").exists()
    assert list((registry / store.STAGING).iterdir()) == []


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, tiny_base_dir, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,sequence,3state,set\nrowZ,MK1T,HHHH,train\n")
    code = fit.main(["--base", str(tiny_base_dir), "--data-dir", str(bad), "--registry", str(tmp_path / "r")])
    assert code == 2
    assert "row rowZ: invalid residue '1'" in capsys.readouterr().err
    assert fit.main(["--task", "nope"]) == 2
    assert fit.main(["trainer.max_stepz=1"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_evaluate_on_a_gpu_that_is_not_there_is_a_clear_error(tmp_path, capsys):
    assert evaluate.main(["--adapter", str(tmp_path / "none"), "--data", str(tmp_path / "none.csv"),
                          "--device", "cuda"]) == 2
    assert "'cuda' asked for, but torch sees no CUDA device here" in capsys.readouterr().err


def test_an_undefined_score_is_published_as_null_and_said(tmp_path, tiny_base_dir):
    """Spearman over a test split whose targets are all equal is undefined (NaN): the run still
    publishes a valid manifest, with null there, and says so (JSON has no NaN; it used to fail at
    publish time, after the whole run)."""
    rows = ["id,sequence,target,set,validation"]
    for i, seq in enumerate(["MKTAYIAKQR", "MKLLVAAGGH", "MSTNPKPQRK", "MKVLAAGIVG", "MRSLLILVLC", "MADEEKLPPG"] * 4):
        split = "test" if i >= 18 else "train"
        rows.append(f"s{i},{seq},{1.0 if split == 'test' else i % 5},{split},{'True' if i in (1, 3, 7, 9, 12) else ''}")
    data = tmp_path / "reg.csv"
    data.write_text("\n".join(rows) + "\n")
    _, summary = train(tmp_path, tiny_base_dir, data, "--task", "flat", "--kind", "regression", "--name", "flat")
    assert summary["test_spearman"] is None and {"test.spearman", "test.pearson"} <= set(summary["undefined_metrics"])
    assert not any(m.startswith("val.") for m in summary["undefined_metrics"]), summary
    manifest = json.loads((tmp_path / "reg" / "flat" / "1" / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["spearman"] is None and manifest["metrics"]["val"]["spearman"] is not None
    assert any("test.spearman" in w for w in manifest["training"]["data_warnings"])


def test_a_non_finite_config_value_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"model.finetuning_optim.lr=nan: a finite number"):
        fit.parse_args(["model.finetuning_optim.lr=nan"])
