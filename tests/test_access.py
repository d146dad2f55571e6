"""Access on a real Ray Serve deployment. Bearer-token auth: every RPC refuses a missing or wrong
token with UNAUTHENTICATED, accepts the right one, follows a rotated token file, counts refusals.
TLS: terminated by serving.serve.tls_front in front of the proxy. Limits: a full request queue answers
RESOURCE_EXHAUSTED instead of growing, and the service keeps serving. Ray's own control plane:
token authentication on, Ray's ports on loopback, a driver without the Ray token refused."""
import concurrent.futures
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bundles import make_bundle
from conftest import free_port, tiny_hf_folder
from esm_adapters.v1 import adapters_pb2 as pb
from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc
from modeling.base import load_base
from serving import client, serve as service
from serving.serve import tls_front
from serving.serve.auth import TOKEN_FILE_ENV, TokenCheck, Unauthenticated


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    base_dir = tiny_hf_folder(root / "base")
    registry = root / "adapters"
    make_bundle(load_base(str(base_dir)), registry, "ss", rank=4, seed=1)
    token_file = root / "token"
    token_file.write_text("first-secret\n")
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    args = {"registry": str(registry), "base": str(base_dir), "r_max": 8, "auth_token_file": str(token_file)}
    service.start(args, grpc_port, metrics_port, num_cpus=0.5, ray_cpus=2, http_port=http_port,
                  token="first-secret", max_ongoing_requests=1, max_queued_requests=1)
    yield {"target": f"127.0.0.1:{grpc_port}", "grpc": grpc_port, "metrics": metrics_port, "token_file": token_file,
           "http": f"http://127.0.0.1:{http_port}"}
    service.stop()


def status(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_needs_the_token(server):
    target = server["target"]
    for token in (None, "wrong", "first-secret-but-longer", ""):
        assert status(lambda: client.predict(target, "ss", ["MKT"], token=token)) == grpc.StatusCode.UNAUTHENTICATED
        assert status(lambda: client.list_adapters(target, token=token)) == grpc.StatusCode.UNAUTHENTICATED
        embed = pb_grpc.AdapterServiceStub(grpc.insecure_channel(target)).Embed
        metadata = client.APP_METADATA + ((("authorization", f"Bearer {token}"),) if token else ())
        assert status(lambda: embed(pb.EmbedRequest(sequences=["MKT"]), metadata=metadata, timeout=30)) \
            == grpc.StatusCode.UNAUTHENTICATED
    assert client.predict(target, "ss", ["MKTAY"], token="first-secret").predictions[0].labels
    assert client.list_adapters(target, token="first-secret").adapters[0].name == "ss"


def test_http_needs_the_same_token_and_probes_need_none(server):
    import json
    import urllib.error
    import urllib.request

    def call(path, token=None, body=None):
        request = urllib.request.Request(server["http"] + path, data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    predict = {"adapter": "ss", "sequences": ["MKT"]}
    for token in (None, "wrong"):
        assert call("/v1/predict", token, predict) == 401 and call("/v1/adapters", token) == 401
        assert call("/v1/embed", token, {"sequences": ["MKT"]}) == 401
    assert call("/v1/predict", "first-secret", predict) == 200 and call("/v1/adapters", "first-secret") == 200
    assert call("/v1/health/live") == 200 and call("/v1/health/ready") == 200  # what probes call
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # a kubelet sends no token either
    check = health_pb2_grpc.HealthStub(grpc.insecure_channel(server["target"])).Check
    assert check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING


def test_a_rotated_token_file_takes_effect_without_restart(server):
    target = server["target"]
    time.sleep(0.01)  # a new mtime
    server["token_file"].write_text("second-secret\n")
    try:
        assert client.predict(target, "ss", ["MKT"], token="second-secret").predictions[0].labels
        assert status(lambda: client.predict(target, "ss", ["MKT"], token="first-secret")) \
            == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server["token_file"].write_text("first-secret\n")


def test_the_client_cli_reads_the_token_from_the_environment(server, tmp_path):
    token = tmp_path / "token"
    token.write_text("first-secret")
    run = lambda env: subprocess.run([sys.executable, "-m", "serving.client", "--target", server["target"], "list"],
                                     capture_output=True, text=True, timeout=120, env=env)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM_ADAPTERS_AUTH")}
    refused = run(env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    accepted = run({**env, TOKEN_FILE_ENV: str(token)})
    assert accepted.returncode == 0 and "ss@1" in accepted.stdout


def test_refusals_are_counted(server):
    client.predict(server["target"], "ss", ["MKT"], token="first-secret")
    for _ in range(3):
        status(lambda: client.predict(server["target"], "ss", ["MKT"], token="nope"))
    deadline = time.monotonic() + 300  # metrics arrive every 2 s; the deadline only bounds "never"
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=30).read().decode()
        counts = {s.labels.get("code"): s.value for f in text_string_to_metric_families(text)
                  if f.name == "ray_esm_requests" for s in f.samples if s.name.endswith("_total")}
        if counts.get("UNAUTHENTICATED", 0) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert counts.get("UNAUTHENTICATED", 0) >= 3 and counts.get("OK", 0) >= 1


def test_token_check_fails_at_start_on_a_missing_or_empty_token(tmp_path):
    with pytest.raises(ValueError, match="auth token file"):
        TokenCheck(str(tmp_path / "absent"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        TokenCheck(str(tmp_path / "empty"))
    check = TokenCheck(None)  # no token configured: auth is off
    assert not check.enabled and check.check(()) is None
    (tmp_path / "t").write_text("abc")
    with pytest.raises(Unauthenticated):
        TokenCheck(str(tmp_path / "t")).check((("authorization", "Bearer abd"),))


def test_a_full_queue_answers_resource_exhausted_and_keeps_serving(server):
    """One request in the replica and one queued at the proxy; the rest are turned away at once.
    All 16 leave together (a barrier), each heavy enough to outlast the others' arrival; an admitted
    request is answered however long a busy machine takes (a deadline that cannot decide it)."""
    target, heavy = server["target"], ["M" + "A" * 1000] * 64
    together = threading.Barrier(16)

    def call(_):
        together.wait()
        return status(lambda: client.predict(target, "ss", heavy, timeout=900, token="first-secret"))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(16)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert client.predict(target, "ss", ["MKTAY"], token="first-secret").predictions[0].labels


def test_tls_front_forwards_every_call_with_its_token(server, tmp_path):
    """TLS terminated by serving.serve.tls_front in front of the plaintext Ray Serve proxy."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = free_port()
    front = tls_front.start(f"127.0.0.1:{port}", server["target"], cert.read_bytes(), key.read_bytes())
    try:
        secure = f"localhost:{port}"
        tls = {"tls_ca": str(cert)}
        assert client.predict(secure, "ss", ["MKTAY"], token="first-secret", **tls).predictions[0].labels
        assert client.list_adapters(secure, token="first-secret", **tls).adapters[0].name == "ss"
        # The token still matters, the status passes through, and plaintext is not accepted.
        assert status(lambda: client.predict(secure, "ss", ["MKT"], token="wrong", **tls)) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert status(lambda: client.predict(secure, "nope", ["MKT"], token="first-secret", **tls)) \
            == grpc.StatusCode.NOT_FOUND
        assert status(lambda: client.predict(f"127.0.0.1:{port}", "ss", ["MKT"], token="first-secret", timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        channel = grpc.secure_channel(secure, grpc.ssl_channel_credentials(cert.read_bytes()))
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        assert "esm_adapters.v1.AdapterService" in {s.name for r in replies for s in r.list_services_response.service}
    finally:
        front.stop(None)


# ---- Ray's control plane: token authentication, Ray ports on loopback ---------------------------
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listeners() -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening socket of this process and its descendants
    (the embedded Ray: GCS, raylet, workers, agents, Serve's controller, proxy and replicas)."""
    import psutil
    found = []
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass  # a worker that exited meanwhile
    return found


# Ray's servers that listen on every interface whatever the node address (Ray Serve binds its
# replicas' inter-deployment server to [::]), with a method each to knock on.
EVERY_INTERFACE_BY_DESIGN = {"ServeReplica": "/ray.serve.ASGIService/HandleRequest"}


def ray_grpc_status(port: int, method: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return status(lambda: call(b"", metadata=metadata, timeout=30))


def test_every_open_port_is_the_users_or_refuses_without_rays_token(server):
    found = listeners()
    assert any(name == "gcs_server" for name, _, _ in found), found  # the embedded Ray is this process's
    outside = [(name, ip, port) for name, ip, port in found if ip not in LOOPBACK]
    opened = {server["grpc"], server["metrics"]}
    ray_token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    print("\nlisteners:")
    for name, ip, port in sorted(found, key=lambda f: f[2]):
        if ip in LOOPBACK:
            role = "loopback"
        elif port in opened:
            role = "every interface: opened by the user (gRPC, metrics)"
        else:
            kind = next((k for k in EVERY_INTERFACE_BY_DESIGN if k in name), None)
            assert kind, f"{name} listens on {ip}:{port}, every interface, and is not one of the user's ports"
            method = EVERY_INTERFACE_BY_DESIGN[kind]
            assert ray_grpc_status(port, method, None) == grpc.StatusCode.UNAUTHENTICATED, (name, port)
            assert ray_grpc_status(port, method, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED, (name, port)
            assert ray_grpc_status(port, method, ray_token) != grpc.StatusCode.UNAUTHENTICATED  # the control
            role = "every interface: Ray, refuses a call without the Ray token (checked)"
        print(f"  {name[:40]:<40} {ip}:{port:<6} {role}")
    assert {port for _, _, port in outside} >= opened


PROBE = "import ray, sys\nray.init(address=sys.argv[1])\nprint('ran', ray.get(ray.remote(lambda: 1 + 1).remote()))\n"


def test_a_ray_driver_without_the_ray_token_is_refused(server):
    """The ShadowRay door: a plain driver joins the cluster and runs code. Without the token, and
    with a wrong one, it cannot; with the right one (control) it can; the service keeps serving."""
    import ray
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.split(":")[0] in LOOPBACK
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    drivers = {"no token": {**clean, "RAY_AUTH_MODE": "disabled"},
               "wrong token": {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
               "the service's token": dict(os.environ)}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = dict(zip(drivers, pool.map(lambda env: subprocess.run([sys.executable, "-c", PROBE, gcs], env=env,
                                                                        capture_output=True, text=True, timeout=300),
                                          drivers.values())))
    for label in ("no token", "wrong token"):
        assert runs[label].returncode != 0 and "ran" not in runs[label].stdout, (label, runs[label].stdout)
    assert runs["the service's token"].stdout.strip().endswith("ran 2"), runs["the service's token"].stderr[-2000:]
    assert client.predict(server["target"], "ss", ["MKTAY"], token="first-secret").predictions[0].labels


def test_the_ray_token_is_private_and_not_the_grpc_token(server):
    path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0
    assert path.read_text().strip() not in ("", "first-secret")
