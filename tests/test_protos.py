"""The checked-in stubs must be what protoc generates from protos/ today."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    str(ROOT / "protos/esm_adapters/v1/adapters.proto")], check=True)
    for name in ("adapters_pb2.py", "adapters_pb2_grpc.py", "adapters_pb2.pyi"):
        fresh = (tmp_path / "esm_adapters/v1" / name).read_text()
        assert (ROOT / "esm_adapters/v1" / name).read_text() == fresh, f"{name} is stale: run `make protos`"
