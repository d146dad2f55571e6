"""Faults on a real Ray Serve deployment: the replica process (which also holds the batcher) and
the gRPC proxy are killed under load. Ray Serve replaces them; callers using the client's retry
policy see a bounded number of errors; afterwards every adapter answers as before and the registry
is untouched."""
import hashlib
import threading
import time
from collections import Counter

import grpc
import pytest

from bundles import make_bundle
from conftest import free_port, tiny_hf_folder
from modeling.base import load_base
from modeling.heads import SEQUENCE_CLASS
from serving import client, serve as service


def registry_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base_dir = tiny_hf_folder(root / "base")
    registry = root / "adapters"
    base = load_base(str(base_dir))
    make_bundle(base, registry, "ss", rank=4, seed=1)
    make_bundle(base, registry, "cls", rank=2, kind=SEQUENCE_CLASS, seed=2)
    grpc_port = free_port()
    service.start({"registry": str(registry), "base": str(base_dir), "r_max": 8}, grpc_port, free_port(),
                  num_cpus=0.5, ray_cpus=2, http_port=free_port())
    yield {"target": f"127.0.0.1:{grpc_port}", "registry": registry}
    service.stop()


def answers(target) -> dict:
    with client.AdapterClient(target) as c:
        return {"ss": c.predict("ss", ["MKTAYIAKQR"]).predictions[0].labels,
                "cls": c.predict("cls", ["MKTAYIAKQR"]).predictions[0].label}


def kill_under_load(target: str, actor_name_part: str) -> tuple[int, list]:
    """Kill the named Serve actor while 4 callers run; returns (calls made, error codes)."""
    import ray
    stop, codes, calls = threading.Event(), [], []

    def caller():
        with client.AdapterClient(target) as c:
            while not stop.is_set():
                try:
                    c.predict("ss", ["MKTAYIAK"], timeout=30)
                    calls.append(time.monotonic())
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    time.sleep(0.2)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if actor_name_part in a["name"]]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    killed = time.monotonic()
    deadline = killed + 120
    while time.monotonic() < deadline and not [t for t in calls if t > killed + 1]:
        time.sleep(0.5)  # until calls succeed again after the kill
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert [t for t in calls if t > killed + 1], "the service did not recover within 120 s"
    return len(calls), codes


@pytest.mark.parametrize("victim", ["AdapterServer", "SERVE_PROXY_ACTOR"])
def test_a_killed_process_is_replaced_and_everything_serves_again(server, victim):
    before, digest = answers(server["target"]), registry_digest(server["registry"])
    calls, codes = kill_under_load(server["target"], victim)
    print(f"\n{victim} killed: {calls} calls answered, errors {Counter(c.name for c in codes)}")
    # Bounded: only "try again" kinds of error, and far fewer than the calls that succeeded.
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
                          grpc.StatusCode.DEADLINE_EXCEEDED}, set(codes)
    assert len(codes) < max(40, calls), (len(codes), calls)
    assert answers(server["target"]) == before  # every adapter again, same answers
    assert registry_digest(server["registry"]) == digest  # the registry is intact
