"""End to end: a real Ray Serve on loopback, called over real gRPC, metrics scraped for real."""
import concurrent.futures
import json
import random
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bundles import make_bundle, make_constant_bundle, with_other_lora
from esm_adapters.v1 import adapters_pb2 as pb
from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc
from conftest import free_port, random_sequences, tiny_hf_folder
from modeling import registry as store
from modeling.base import load_base
from modeling.heads import SEQUENCE_CLASS
from serving import client, serve as service
from serving.engine import Engine, EngineConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    base_dir = tiny_hf_folder(root / "base")
    base = load_base(str(base_dir))
    registry = root / "adapters"
    make_bundle(base, registry, "ss", rank=4, seed=1)
    make_bundle(base, registry, "cls", rank=2, kind=SEQUENCE_CLASS, seed=2)
    make_bundle(base, registry, "toobig", rank=32, seed=3)
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    args = {"registry": str(registry), "base": str(base_dir), "r_max": 8, "max_sequences_per_request": 8,
            "max_residues_per_request": 20_000, "max_embed_values": 100_000, "registry_poll_s": 0.25,
            "batch_wait_timeout_s": 0.05}
    service.start(args, grpc_port, metrics_port, num_cpus=0.5, ray_cpus=2, http_port=http_port)
    yield {"target": f"127.0.0.1:{grpc_port}", "metrics": metrics_port, "registry": registry,
           "base": base, "base_dir": base_dir, "http": f"http://127.0.0.1:{http_port}"}
    service.stop()


def expected(server, requests):
    engine = Engine(load_base(str(server["base_dir"])), server["registry"], EngineConfig(r_max=8))
    return engine.predict(requests)


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_concurrent_predicts_for_different_adapters_match_each_adapter_alone(server):
    seqs = random_sequences(12, 10, 60, seed=11)
    jobs = [("ss", seqs[:6]), ("cls", seqs[6:]), ("ss@1", seqs[6:]), ("cls", seqs[:3])]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(client.predict, server["target"], a, s) for a, s in jobs]
        responses = [f.result() for f in futures]
    for (adapter, seqs_), response in zip(jobs, responses):
        alone = expected(server, [(adapter, s) for s in seqs_])
        assert response.adapter == alone[0].adapter and len(response.predictions) == len(seqs_)
        for got, want in zip(response.predictions, alone):
            if response.kind == "per_residue":
                assert got.labels == want.labels
            else:
                assert got.label == want.label
                assert got.probabilities[want.label] == pytest.approx(want.probabilities[want.label], abs=1e-4)


def test_bad_input_statuses(server):
    t = server["target"]
    assert code_of(lambda: client.predict(t, "ss", []))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of(lambda: client.predict(t, "ss", ["MKT", "MKZJA"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence 1" in details and "'J'" in details
    long = "A" * 1100
    assert code_of(lambda: client.predict(t, "ss", [long]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    cropped = client.predict(t, "ss", [long], crop=True)
    assert cropped.predictions[0].cropped and len(cropped.predictions[0].labels) == 1022
    assert code_of(lambda: client.predict(t, "ss", ["MKT"] * 9))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(lambda: client.predict(t, "missing", ["MKT"]))[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(lambda: client.predict(t, "toobig", ["MKT"]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "r_max" in details
    assert code_of(lambda: client.predict(t, "../etc", ["MKT"]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert client.predict(t, "ss", ["mktay"]).predictions[0].labels  # still serving


def test_hot_add_and_remove_are_noticed_without_restart(server):
    """The registry is polled every 0.25 s here; the deadline only bounds a change never noticed
    (how fast is printed, not asserted: a loaded machine is slower, not wrong)."""
    t = server["target"]
    make_bundle(server["base"], server["registry"], "late", rank=2, seed=7)
    start = time.monotonic()
    while True:
        try:
            assert client.predict(t, "late", ["MKTAY"]).adapter == "late@1"
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert time.monotonic() - start < 120, "hot add not noticed"
            time.sleep(0.1)
    added_after = time.monotonic() - start
    store.remove(server["registry"], "late")
    start = time.monotonic()
    while True:
        try:
            client.predict(t, "late", ["MKTAY"])
            assert time.monotonic() - start < 120, "hot remove not noticed"
            time.sleep(0.1)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
    print(f"hot add visible after {added_after:.2f}s, remove after {time.monotonic() - start:.2f}s")


def test_list_adapters_and_reflection(server):
    listed = client.list_adapters(server["target"])
    by_name = {a.name: a for a in listed.adapters}
    assert by_name["ss"].status == "ok" and by_name["ss"].rank == 4
    assert by_name["toobig"].status == "refused" and "r_max" in by_name["toobig"].reason
    assert listed.base_fingerprint == server["base"].fingerprint and listed.registry_problem == ""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server["target"]))
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert "esm_adapters.v1.AdapterService" in services
    from ray.serve.generated import serve_pb2, serve_pb2_grpc
    serve_api = serve_pb2_grpc.RayServeAPIServiceStub(grpc.insecure_channel(server["target"]))
    assert serve_api.Healthz(serve_pb2.HealthzRequest(), timeout=10).message == "success"
    apps = serve_api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=10)
    assert "esm-adapters" in apps.application_names


def test_predict_reports_where_the_time_went(server):
    from serving.serve.app import MODEL_MS, SERVER_MS
    stub = client.AdapterClient(server["target"])
    started = time.perf_counter()
    _, call = stub.stub.Predict.with_call(pb.PredictRequest(adapter="ss", sequences=["MKTAYIAK", "MKT"]),
                                          metadata=stub.metadata, timeout=60)
    elapsed_ms = (time.perf_counter() - started) * 1000
    timing = {k: float(v) for k, v in call.trailing_metadata() if k in (MODEL_MS, SERVER_MS)}
    assert 0 < timing[MODEL_MS] <= timing[SERVER_MS] <= elapsed_ms
    stub.close()


def embed(target: str, sequences: list[str], per_residue: bool = False) -> pb.EmbedResponse:
    stub = pb_grpc.AdapterServiceStub(grpc.insecure_channel(target))
    return stub.Embed(pb.EmbedRequest(sequences=sequences, per_residue=per_residue), metadata=client.APP_METADATA,
                      timeout=60)


REGISTRY_SERIES = {"ray_esm_registry_readable", "ray_esm_registry_last_scan_timestamp_seconds",
                   "ray_esm_registry_scan_errors"}


def test_metrics_endpoint(server):
    client.predict(server["target"], "ss", ["MKTAYIAK"])
    assert embed(server["target"], ["MKTAYIAK"]).dim == 32
    # The chart's Grafana dashboard must query only series that exist (checked below).
    dashboard = json.loads((ROOT / "helm" / "esm-adapters" / "files" / "dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(ray_[a-z_]+)\b", target["expr"])}
    deadline = time.monotonic() + 60
    while True:  # Ray exports every few seconds, each series on its own schedule
        text = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        exported = {sample.name for family in families.values() for sample in family.samples}
        requests = families.get("ray_esm_requests")
        seen = {(s.labels.get("adapter"), s.labels.get("code")) for s in requests.samples} if requests else set()
        wanted = {("ss", "OK"), ("_unknown", "NOT_FOUND"), ("_embed", "OK")}
        latency = families.get("ray_esm_request_latency_seconds")
        stages = {s.labels.get("stage") for s in latency.samples} if latency else set()
        if (wanted <= seen and queried <= exported and REGISTRY_SERIES <= set(families) and "embed" in stages) \
                or time.monotonic() > deadline:
            break
        time.sleep(1)
    codes = {(s.labels["adapter"], s.labels["code"]) for s in families["ray_esm_requests"].samples}
    assert ("ss", "OK") in codes and ("_unknown", "NOT_FOUND") in codes and ("_embed", "OK") in codes
    for name in ("ray_esm_request_latency_seconds", "ray_esm_batch_size", "ray_esm_batch_distinct_adapters",
                 "ray_esm_batch_padding_ratio", "ray_esm_adapter_events", "ray_esm_adapters_resident", *REGISTRY_SERIES):
        assert name in families, name
    stages = {s.labels.get("stage") for s in families["ray_esm_request_latency_seconds"].samples}
    assert {"queue", "model", "total", "embed"} <= stages
    assert families["ray_esm_registry_last_scan_timestamp_seconds"].samples[0].value > time.time() - 600
    assert any(n.startswith("ray_serve_") for n in families)  # Ray Serve's own series stay
    assert queried and queried <= exported, queried - exported


# ---- bad input, fuzzed: every request gets a defined status and the server keeps serving ------
DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
TEXT = st.characters(exclude_categories=("Cs",))  # protobuf strings are valid UTF-8 by construction
HOSTILE_NAMES = ["../etc/passwd", "/etc/passwd", "ss/../../x", "ss\x00", "a" * 10_000, "ss@", "ss@-1",
                 "ss@99999999999999999999", "", " ss", "SS", "..", ".", "ss@1", "toobig", "~root", "C:\\x"]
SEQUENCES = st.lists(st.one_of(
    st.text(TEXT, max_size=60),
    st.text(st.sampled_from("ACDEFGHIKLMNPQRSTVWYXBZUOacdefgh \n\t\x00*-."), max_size=5000)), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(adapter=st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(TEXT, max_size=80)), sequences=SEQUENCES,
       crop=st.booleans(), probabilities=st.booleans())
def test_fuzzed_predict_gets_a_defined_status(server, adapter, sequences, crop, probabilities):
    try:
        response = client.predict(server["target"], adapter, sequences, probabilities, crop, timeout=60)
        assert len(response.predictions) == len(sequences)
    except grpc.RpcError as exc:
        assert exc.code() in DEFINED, (exc.code(), exc.details())


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(sequences=SEQUENCES, per_residue=st.booleans())
def test_fuzzed_embed_gets_a_defined_status(server, sequences, per_residue):
    stub = pb_grpc.AdapterServiceStub(grpc.insecure_channel(server["target"]))
    try:
        response = stub.Embed(pb.EmbedRequest(sequences=sequences, per_residue=per_residue),
                              metadata=client.APP_METADATA, timeout=60)
        assert len(response.embeddings) == len(sequences)
    except grpc.RpcError as exc:
        assert exc.code() in DEFINED, (exc.code(), exc.details())


def test_extreme_requests_are_refused_and_the_server_keeps_serving(server):
    t = server["target"]
    assert code_of(lambda: client.predict(t, "ss", ["MKT"] * 10_000))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge = "A" * (5 * 2**20)  # over gRPC's 4 MiB default message limit
    assert code_of(lambda: client.predict(t, "ss", [huge], crop=True))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for name in ("../etc/passwd", "/etc/passwd", "ss\x00", "a" * 10_000):
        code, details = code_of(lambda: client.predict(t, name, ["MKT"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300, (name[:20], code, details[:100])
    # Bytes that are not UTF-8 where the proto says string: the request cannot even be parsed.
    raw = grpc.insecure_channel(t).unary_unary("/esm_adapters.v1.AdapterService/Predict",
                                               request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\x0a\x04\xff\xfe\xfd\xfc\x12\x03MKT", metadata=client.APP_METADATA, timeout=30)
    assert error.value.code() != grpc.StatusCode.OK
    assert client.predict(t, "ss", ["MKTAYIAK"]).predictions[0].labels  # still healthy
    assert client.list_adapters(t).registry_problem == ""


# ---- uploads and removals under load ----------------------------------------------------------
def test_uploads_removals_and_a_replacement_under_load_never_answer_wrongly(server):
    """16 callers keep calling while 50 adapters are pushed, 10 removed and one replaced. Each
    adapter answers a constant that names it and its version, so a wrong answer cannot hide. Every
    change waits for answered traffic after it before the next one, so each change is proven under
    load however fast the machine is (deadlines only bound a service that stopped answering)."""
    target, registry, base = server["target"], server["registry"], server["base"]
    value_of: dict[str, float] = {}  # "name@version" -> the constant it answers
    live: list[str] = []  # names the callers may use (listed by the server)
    removed: set[str] = set()
    lock, stop, outcomes = threading.Lock(), threading.Event(), []

    def caller(seed: int):
        rng = random.Random(seed)
        with client.AdapterClient(target) as c:
            while not stop.is_set():
                with lock:
                    name = rng.choice(live) if live else None
                if name is None:
                    time.sleep(0.01)
                    continue
                try:
                    r = c.predict(name, ["MKTAYIAK"], timeout=60)
                    outcomes.append((name, r.adapter, r.predictions[0].value, None))
                except grpc.RpcError as exc:
                    outcomes.append((name, None, None, exc.code()))

    def wait_for(condition, what: str):
        deadline = time.monotonic() + 300
        while not condition():
            assert time.monotonic() < deadline, f"{what} within 300 s"
            time.sleep(0.02)

    def traffic_after_change(answers: int = 3):
        mark = len(outcomes)
        wait_for(lambda: sum(o[3] is None for o in outcomes[mark:]) >= answers, "answers after a change")

    def publish(name: str, value: float):
        folder = make_constant_bundle(base, registry, name, value)
        ref = f"{name}@{folder.name}"
        value_of[ref] = value
        wait_for(lambda: ref in {f"{a.name}@{a.version}" for a in client.list_adapters(target).adapters},
                 f"{ref} listed")
        return ref

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        for i in range(50):
            publish(f"up{i}", float(i))
            with lock:
                live.append(f"up{i}")
            traffic_after_change()
        for i in range(10):
            with lock:
                live.remove(f"up{i}")
                removed.add(f"up{i}")
            store.remove(registry, f"up{i}")
            traffic_after_change()
        replacement = publish("up20", 1000.0)  # a new version of a live adapter
        wait_for(lambda: any(o[1] == replacement for o in outcomes), "the new version answering")
        traffic_after_change()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    answered = [o for o in outcomes if o[3] is None]
    failed = [o for o in outcomes if o[3] is not None]
    print(f"{len(answered)} answered, {len(failed)} NOT_FOUND for removed adapters")
    for asked, adapter, value, _ in answered:
        assert adapter.split("@")[0] == asked and value == pytest.approx(value_of[adapter], abs=1e-3), (asked, adapter)
    assert all(code == grpc.StatusCode.NOT_FOUND and asked in removed for asked, *_, code in failed), failed[:5]


def test_annotate_answers_every_adapter_like_predict_and_refuses_bad_lists(server, capsys):
    t, seqs = server["target"], random_sequences(5, 10, 40, seed=21)
    response = client.annotate(t, ["cls", "ss@1"], seqs, probabilities=True)
    assert [r.adapter for r in response.results] == ["cls@1", "ss@1"]
    for result, name in zip(response.results, ("cls", "ss@1")):
        alone = client.predict(t, name, seqs, probabilities=True)
        assert result.kind == alone.kind and list(result.label_names) == list(alone.label_names)
        for got, want in zip(result.predictions, alone.predictions):
            assert (got.labels, got.label) == (want.labels, want.label)
    assert code_of(lambda: client.annotate(t, [], seqs))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.annotate(t, ["ss", "ss"], seqs))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.annotate(t, ["ss", "missing"], seqs))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.annotate(t, ["ss", "toobig"], seqs))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.annotate(t, ["ss"], ["MKZJ"]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert client.main(["--target", t, "predict", "--adapter", "ss,cls", "--sequence", "MKTAYIAK"]) == 0
    out = capsys.readouterr().out
    assert "adapter ss@1" in out and "adapter cls@1" in out


# ---- the registry folder as operators change it, under a running service ------------------------
def wait_for(condition, what: str, limit: float = 300):
    """Polls `condition`; the limit only bounds a service that stopped noticing changes."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {limit} s"
        time.sleep(0.05)


def listed_refs(target: str) -> set[str]:
    return {f"{a.name}@{a.version}" for a in client.list_adapters(target).adapters}


def test_a_name_removed_and_pushed_again_with_other_lora_answers_with_the_new_weights(server, tmp_path):
    """remove + push of a different bundle under one name, four times, with traffic on that name
    throughout. The bundles differ only in their LoRA weights (same head), so each answer shows
    which LoRA computed it: it must be the one its version was published with, and once the new
    version is listed (and the old one gone), every answer comes from the new one."""
    target, root, base = server["target"], server["registry"], server["base"]
    a = make_bundle(base, tmp_path / "built", "swap", rank=2, kind="regression", seed=11)
    bundles_ = {"A": a, "B": with_other_lora(a, tmp_path / "built" / "b", seed=12)}
    values = {}
    for name, folder in bundles_.items():  # each bundle's own answer, from an engine of its own
        alone = tmp_path / f"alone-{name}"
        store.push(folder, alone, "swap")
        values[name] = Engine(load_base(str(server["base_dir"])), alone, EngineConfig(r_max=8)).predict(
            [("swap", "MKTAYIAK")])[0].value
    assert abs(values["A"] - values["B"]) > 1e-3
    bundle_of: dict[str, str] = {}  # swap@N -> the bundle pushed as N
    outcomes, stop = [], threading.Event()

    def caller():
        with client.AdapterClient(target) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = c.predict("swap", ["MKTAYIAK"], timeout=60)
                    outcomes.append((started, r.adapter, r.predictions[0].value, None))
                except grpc.RpcError as exc:
                    outcomes.append((started, None, None, exc.code()))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    windows = []  # (new ref, visible from, until)
    try:
        for name in ("A", "B", "A", "B"):
            if store.versions(root, "swap"):
                store.remove(root, "swap")
            ref = f"swap@{store.push(bundles_[name], root, 'swap').name}"
            bundle_of[ref] = name
            wait_for(lambda: {r for r in listed_refs(target) if r.startswith("swap@")} == {ref}, f"{ref} alone listed")
            visible = time.monotonic()
            mark = len(outcomes)
            wait_for(lambda: sum(o[1] == ref for o in outcomes[mark:]) >= 5, f"answers from {ref}")
            windows.append((ref, visible, time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    answered = [o for o in outcomes if o[3] is None]
    assert len(answered) >= 20
    for _, ref, value, _ in answered:  # each answer computed with its own version's LoRA
        assert value == pytest.approx(values[bundle_of[ref]], abs=1e-4), (ref, value, values)
    for ref, visible, until in windows:  # after the push is visible, only the new version answers
        late = [o for o in outcomes if visible < o[0] < until]
        assert late and all(o[1] == ref for o in late), [o for o in late if o[1] != ref][:3]
    assert {o[3] for o in outcomes if o[3] is not None} <= {grpc.StatusCode.NOT_FOUND}
    store.remove(root, "swap")


def test_malformed_entries_never_break_listing_or_hot_reload(server, tmp_path):
    target, root, base = server["target"], server["registry"], server["base"]
    bad = make_bundle(base, tmp_path / "built", "bad", rank=2)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["output"]["labels"] = [1, 2, 3]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(bad, root / "malformed" / "1")
    (root / "ss" / "²").mkdir()
    (root / "ss" / ("9" * 20)).mkdir()
    try:
        wait_for(lambda: "malformed@1" in listed_refs(target), "the malformed entry listed")
        listed = client.list_adapters(target)
        info = {f"{a.name}@{a.version}": a for a in listed.adapters}
        assert info["malformed@1"].status == "refused" and "output.labels" in info["malformed@1"].reason
        health = listed.registry_health
        assert health.scans > 0 and health.last_scan_time > time.time() - 60 and health.scan_errors == 0
        assert any("'²'" in line for line in health.skipped) and any("9" * 20 in line for line in health.skipped)
        make_bundle(base, root, "after_bad", rank=2)  # hot reload goes on
        wait_for(lambda: "after_bad@1" in listed_refs(target), "a push after the malformed entries")
        assert client.predict(target, "after_bad", ["MKTAY"]).adapter == "after_bad@1"
    finally:
        shutil.rmtree(root / "malformed")
        for name in ("²", "9" * 20):
            (root / "ss" / name).rmdir()
        if store.versions(root, "after_bad"):
            store.remove(root, "after_bad")


def test_annotate_and_embed_work_is_bounded(server):
    t = server["target"]
    sequences = ["MKTAYIAK" * 125] * 8  # 8,000 residues: within the 20,000 of this server
    assert len(client.predict(t, "ss", sequences).predictions) == 8
    code, details = code_of(lambda: client.annotate(t, ["ss", "cls", "ss@1"], sequences))  # 3 x 8,000
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "24000 residues" in details and "adapters" in details
    assert len(embed(t, sequences).embeddings) == 8  # means only: 8 x 32 values
    code, details = code_of(lambda: embed(t, sequences, per_residue=True))  # 8,000 x 32 values
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_embed_values" in details
    code, details = code_of(lambda: embed(t, ["A" * 3000] * 8))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "24000 residues" in details
    assert len(embed(t, ["MKTAYIAK"] * 2, per_residue=True).embeddings[1].residues) == 8 * 32


def test_the_registry_volume_gone_under_the_service_keeps_resident_adapters_serving(server):
    t, root = server["target"], server["registry"]
    before = {name: client.predict(t, name, ["MKTAYIAKQR"]) for name in ("ss", "cls")}
    away = root.rename(root.parent / "unmounted")
    try:
        wait_for(lambda: client.list_adapters(t).registry_problem != "", "the problem noticed")
        for name, response in before.items():
            again = client.predict(t, name, ["MKTAYIAKQR"])
            assert again.adapter == response.adapter and again.predictions == response.predictions
    finally:
        away.rename(root)
    wait_for(lambda: client.list_adapters(t).registry_problem == "", "the volume back")
