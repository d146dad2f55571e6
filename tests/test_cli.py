"""The command lines as a user meets them: `esm-adapters COMMAND` and every `python -m` form, help
text on every flag, `--help` without torch, Ray or Lightning, and the service's secure default."""
from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["training.fit", "training.evaluate", "training.tune", "serving.serve", "serving.batch", "serving.registry",
           "serving.client", "serving.serve.tls_front", "serving.batch.export_onnx", "esm_adapters.cli"]
HEAVY = ("torch", "ray", "pytorch_lightning", "lightning", "peft", "transformers")
PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules], "help": out.getvalue()}))
""" % (HEAVY,)


@pytest.mark.parametrize("module", MODULES)
def test_help_loads_neither_torch_ray_nor_lightning(module):
    result = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] in (0, None) and report["heavy"] == [], (module, report["heavy"], result.stderr[-500:])
    assert "usage:" in report["help"]


def parsers() -> dict[str, argparse.ArgumentParser]:
    from esm_adapters import client
    from serving.batch import export_onnx, scoring
    from serving.registry import cli as registry_cli
    from serving.serve import launch, tls_front
    from training import evaluate, fit, tune
    return {"fit": fit.parser(), "evaluate": evaluate.parser(), "tune": tune.parser(), "serve": launch.parser(), "batch": scoring.parser(),
            "registry": registry_cli.parser(), "client": client.parser(), "tls_front": tls_front.make_parser(),
            "export_onnx": export_onnx.parser()}


def actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize("name", ["fit", "evaluate", "tune", "serve", "batch", "registry", "client", "tls_front", "export_onnx"])
def test_every_flag_has_help_with_its_default_and_choices(name):
    for action in actions(parsers()[name]):
        assert action.help, (name, action.option_strings or action.dest)
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS) and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, (name, action.option_strings, action.help)
        if action.choices and not isinstance(action.choices, dict):
            assert set(map(str, action.choices)) and action.metavar is None  # argparse lists them in --help


def test_esm_adapters_runs_every_command(capsys):
    from esm_adapters import cli
    assert cli.main([]) == 2 and "fit" in capsys.readouterr().out
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0, command
        assert "usage:" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "esm-adapters"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "registry" in result.stdout


def test_the_client_takes_its_connection_flags_before_or_after_the_command():
    from esm_adapters import client
    for argv in (["--target", "h:1", "list"], ["list", "--target", "h:1"]):
        assert client.parser().parse_args(argv).target == "h:1"
    assert client.parser().parse_args(["list"]).target == client.DEFAULT_TARGET


def test_serve_makes_a_private_token_when_given_none(tmp_path, monkeypatch):
    from serving.serve.launch import bearer_token
    from serving.serve.auth import TOKEN_ENV, TOKEN_FILE_ENV
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    made = tmp_path / "config" / "esm-adapters" / "token"
    args, token, notice = bearer_token({"registry": "adapters"}, no_auth=False, made=str(made))
    assert token and len(token) >= 32 and made.read_text().strip() == token and str(made) in notice
    assert stat.S_IMODE(made.stat().st_mode) == 0o600 and args["auth_token_file"] == str(made)
    assert bearer_token({}, no_auth=False, made=str(made))[1] == token  # kept: clients keep working
    monkeypatch.setenv(TOKEN_ENV, "mine")
    assert bearer_token({}, no_auth=False, made=str(made))[1] == "mine"
    assert bearer_token({}, no_auth=True, made=str(made))[1] is None  # opened only when asked
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop(TOKEN_ENV)
    found = subprocess.run([sys.executable, "-c", "from esm_adapters.client import token_from; print(token_from())"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert found.stdout.strip() == token  # the clients on this machine find it
