"""The docs as a reader meets them: the README short and current, the MkDocs site building under
--strict, and every command the README and docs show accepted by the command line it names."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STALE = ["--data flip:", "serving/protos_gen", "all three RPCs", "serving.registry push runs/", "max_cpu_adapters",
         "serve run serving/serve/serve_config.yaml", "serving.app:build", "kuberay-operator >= 1.3"]


def test_the_readme_reads_in_ten_minutes_and_links_only_to_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "serving" / "index.html").exists()


def test_no_stale_line_is_left():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        if name.endswith((".py", ".md", ".yaml", ".tpl", ".txt", ".toml", ".proto")) and name != "tests/test_docs.py":
            text = (ROOT / name).read_text(errors="ignore")
            for stale in STALE:
                assert stale not in text, (name, stale)


def commands() -> list[tuple[str, str]]:
    """(page, command line) of every `python -m ...` and `esm-adapters ...` line in a shell block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].split("   #")[0].strip()
                line = re.sub(r"^\.venv/bin/", "", line)
                if line.startswith(("python -m ", "esm-adapters ")) and " | " not in line:
                    found.append((page.name, line))
    return found


def parser_of(words: list[str]):
    from esm_adapters import client
    from serving.batch import export_onnx, scoring
    from serving.registry import cli as registry_cli
    from serving.serve import launch, tls_front
    from training import evaluate, fit, tune
    modules = {"training.fit": fit.parser, "training.evaluate": evaluate.parser, "training.tune": tune.parser, "serving.serve": launch.parser,
               "serving.batch": scoring.parser, "serving.registry": registry_cli.parser, "serving.client": client.parser,
               "serving.serve.tls_front": tls_front.make_parser, "serving.batch.export_onnx": export_onnx.parser}
    commands_ = {"fit": "training.fit", "evaluate": "training.evaluate", "tune": "training.tune", "serve": "serving.serve",
                 "batch": "serving.batch", "registry": "serving.registry"}
    if words[0] == "python":
        return modules.get(words[2]), words[3:]
    if words[1] in commands_:
        return modules[commands_[words[1]]], words[2:]
    return client.parser, words[1:]


@pytest.mark.parametrize("page, line", commands())
def test_every_command_shown_is_accepted_by_its_command_line(page, line):
    words = shlex.split(re.sub(r"\$\([^)]*\)|\$\{?\w+\}?", "X", line))
    parser, args = parser_of(words)
    if parser is None:
        pytest.skip(f"{words[2]}: not a command of the product")
    try:
        parser().parse_args(args)
    except SystemExit as exit:
        pytest.fail(f"{page}: `{line}` is refused by its command line (exit {exit.code})")
