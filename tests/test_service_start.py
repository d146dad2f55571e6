"""A service start that fails stops whatever it started: one failure is one failure."""
import socket
import time

import pytest

from bundles import make_bundle
from conftest import free_port, tiny_hf_folder
from modeling.base import load_base
from serving import serve as service


def ray_is_up() -> bool:
    import ray
    return ray.is_initialized()


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(OSError, match=f"gRPC port {port} is not free"):
            service.start({"registry": str(tmp_path)}, port, free_port(), http_port=free_port())
    assert not ray_is_up()


def test_bad_service_options_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        service.start({"registry": str(tmp_path), "dtype": "float8"}, free_port(), free_port(), http_port=free_port())
    assert not ray_is_up()


def test_a_start_that_fails_after_ray_is_up_leaves_nothing_running(tmp_path):
    """The replica cannot load its base: Serve gives up on the deployment, start() raises, and
    Ray, Serve and the proxy are gone, so the next start in the same process works."""
    import ray
    base_dir = tiny_hf_folder(tmp_path / "base")
    make_bundle(load_base(str(base_dir)), tmp_path / "adapters", "ss", rank=2)
    grpc_port = free_port()
    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        service.start({"registry": str(tmp_path / "adapters"), "base": str(tmp_path / "no-such-base")}, grpc_port,
                      free_port(), num_cpus=0.5, ray_cpus=2, http_port=free_port())
    print(f"failed start took {time.monotonic() - started:.1f} s: {type(failure.value).__name__}")
    assert not ray_is_up()
    with socket.socket() as probe:  # the proxy's port is free again
        probe.bind(("0.0.0.0", grpc_port))
    for attempt in range(2):  # not "ray.init twice"; Ray gives a raylet 30 s to start, a busy machine more
        try:
            ray.init(num_cpus=1, include_dashboard=False)
            break
        except Exception as exc:
            ray.shutdown()
            if attempt or "timed out during startup" not in str(exc):
                raise
    ray.shutdown()


def test_service_ports_stay_out_of_rays_ranges():
    from serving.serve import ports
    handed = [free_port() for _ in range(20)]
    assert len(set(handed)) == 20
    for port in handed:
        assert port not in ports.ephemeral_ports() and port not in ports.RAY_WORKER_PORTS
        assert not ports.listening(port)


def test_a_call_past_the_server_side_deadline_gets_deadline_exceeded(tmp_path):
    """request_timeout_s=0.05 against an Embed of 256 x 1,000 residues (seconds of work on this
    base): DEADLINE_EXCEEDED, and the service keeps answering (ListAdapters has no model work)."""
    import grpc

    from esm_adapters.v1 import adapters_pb2 as pb
    from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc
    from serving import client
    base_dir = tiny_hf_folder(tmp_path / "base")
    grpc_port = free_port()
    service.start({"registry": str(tmp_path / "adapters"), "base": str(base_dir), "request_timeout_s": 0.05},
                  grpc_port, free_port(), num_cpus=0.5, ray_cpus=2, http_port=free_port())
    try:
        target = f"127.0.0.1:{grpc_port}"
        stub = pb_grpc.AdapterServiceStub(grpc.insecure_channel(target))
        with pytest.raises(grpc.RpcError) as late:
            stub.Embed(pb.EmbedRequest(sequences=["MKTAYIAKQR" * 100] * 256), metadata=client.APP_METADATA, timeout=120)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "request_timeout_s" in late.value.details()
        assert client.list_adapters(target).base_fingerprint
    finally:
        service.stop()
