"""Access on a real Ray Serve deployment. Bearer-token auth: every RPC refuses a missing or wrong
token with UNAUTHENTICATED, accepts the right one, follows a rotated token file, counts refusals.
TLS: terminated by serving.tls_front in front of the proxy. Limits: a full request queue answers
RESOURCE_EXHAUSTED instead of growing, and the service keeps serving."""
import concurrent.futures
import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bundles import make_bundle
from conftest import free_port, tiny_hf_folder
from esm_adapters.v1 import adapters_pb2 as pb
from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc
from modeling.base import load_base
from serving import client, serve as service, tls_front
from serving.auth import TOKEN_FILE_ENV, TokenCheck, Unauthenticated


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    base_dir = tiny_hf_folder(root / "base")
    registry = root / "adapters"
    make_bundle(load_base(str(base_dir)), registry, "ss", rank=4, seed=1)
    token_file = root / "token"
    token_file.write_text("first-secret\n")
    grpc_port, metrics_port = free_port(), free_port()
    args = {"registry": str(registry), "base": str(base_dir), "r_max": 8, "auth_token_file": str(token_file)}
    service.start(args, grpc_port, metrics_port, num_cpus=0.5, ray_cpus=2, http_port=free_port(),
                  token="first-secret", max_ongoing_requests=1, max_queued_requests=1)
    yield {"target": f"127.0.0.1:{grpc_port}", "metrics": metrics_port, "token_file": token_file}
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
    """TLS terminated by serving.tls_front in front of the plaintext Ray Serve proxy."""
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
