"""The Helm chart, rendered by the real `helm` binary, checked against the real schemas, and its
serve config deployed onto a real Ray cluster the way KubeRay does it.

Kubernetes objects: the schemas `kubernetes-validate` ships (strict: unknown fields fail).
RayService: the openAPIV3Schema of KubeRay's CRD (tests/k8s/), with unknown fields refused the way
the API server's strict field validation refuses them. ServiceMonitor / PodMonitor: the JSON schema
of the models generated from the Prometheus operator's CRDs (cloudcoil-models-prometheus-operator).
The serve config inside the RayService is checked against Ray's own schema and against our code.
"""
from __future__ import annotations

import base64
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import torch
import yaml

from serving.serve.auth import TOKEN_FILE_ENV

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "esm-adapters"
KUBERNETES_VERSION = "1.37.0"
EVERYTHING_ON = ("trainingJob.enabled=true,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,"
                 "metrics.grafanaDashboard.enabled=true,tls.enabled=true,tls.secretName=t,"
                 "auth.enabled=true,auth.existingSecret=a,model.cache.existingClaim=weights,registry.existingClaim=reg")
VALUE_SETS = {
    "default": [],
    "production-gpu": ["-f", str(ROOT / "helm" / "values" / "production-gpu.yaml")],
    "cpu-kind": ["-f", str(ROOT / "helm" / "values" / "cpu-kind.yaml")],
    "everything-on": ["--set", EVERYTHING_ON],
    "ray-jobs": ["--set", "batchJob.enabled=true,trainingJob.enabled=true,trainingJob.runAs=RayJob,"
                          "batchJob.extraArgs={--crop,--embeddings}"],
}


def helm_binary() -> str:
    found = shutil.which("helm") or shutil.which("helm", path=str(Path(sys.prefix) / "bin"))
    if not found:
        pytest.fail("no helm binary: run `python helm/install_helm.py` (make test does)")
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


@lru_cache
def render(values_set: str) -> list[dict]:
    out = helm("template", "esm", str(CHART), "--namespace", "proteins", *VALUE_SETS[values_set])
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def only(docs: list[dict], kind: str, name_ends: str = "") -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_ends)]
    return doc


def refuse_unknown_fields(node):
    """Objects with declared properties accept no others (what `kubectl apply` does by default)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            refuse_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            refuse_unknown_fields(value)
    return node


@lru_cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators = {}
    for name in ("ray.io_rayservices.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.safe_load((ROOT / "tests" / "k8s" / name).read_text())
        for version in crd["spec"]["versions"]:
            schema = refuse_unknown_fields(version["schema"]["openAPIV3Schema"])
            validators[(f"ray.io/{version['name']}", crd["spec"]["names"]["kind"])] = jsonschema.Draft7Validator(schema)
    from cloudcoil.models.prometheus_operator import v1 as prometheus
    for kind in ("ServiceMonitor", "PodMonitor"):
        schema = refuse_unknown_fields(getattr(prometheus, kind).model_json_schema(by_alias=True))
        validators[("monitoring.coreos.com/v1", kind)] = jsonschema.Draft202012Validator(schema)
    return validators


def schema_errors(doc: dict) -> list[str]:
    validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
    if validator is not None:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"])


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    for job in (d for d in docs if d["kind"] == "Job"):
        specs["job"] = job["spec"]["template"]["spec"]
    for job in (d for d in docs if d["kind"] == "RayJob"):
        own = job["spec"]["rayClusterSpec"]
        specs[f"{job['metadata']['name']}/head"] = own["headGroupSpec"]["template"]["spec"]
        for group in own["workerGroupSpecs"]:
            specs[f"{job['metadata']['name']}/{group['groupName']}"] = group["template"]["spec"]
    return specs


@pytest.mark.parametrize("values_set", VALUE_SETS)
def test_lint_is_clean(values_set):
    out = helm("lint", "--strict", str(CHART), *VALUE_SETS[values_set])
    assert out.returncode == 0 and "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("values_set", VALUE_SETS)
def test_every_object_matches_its_schema(values_set):
    docs = render(values_set)
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "PersistentVolumeClaim", "Service"} <= kinds or values_set == "everything-on"
    for doc in docs:
        assert not schema_errors(doc), (doc["kind"], schema_errors(doc))


def test_schemas_catch_mistakes():
    """The validators above are not vacuous: a typo'd field and a wrong type are both caught."""
    service = only(render("default"), "RayService")
    typo = json.loads(json.dumps(service))
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in schema_errors(typo))
    wrong_type = json.loads(json.dumps(service))
    wrong_type["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"] = "six"
    assert schema_errors(wrong_type)
    pvc = only(render("default"), "PersistentVolumeClaim")
    pvc["spec"]["acessModes"] = pvc["spec"].pop("accessModes")
    assert schema_errors(pvc)


@pytest.mark.parametrize("values_set", VALUE_SETS)
def test_serve_config_runs_our_app_with_options_the_code_accepts(values_set):
    from ray.serve.schema import ServeDeploySchema

    from serving.serve.config import SERVICERS, ServiceConfig
    docs = render(values_set)
    config = serve_config(docs)
    schema = ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder(app.args) is not None  # the module path exists and accepts exactly these args
    assert set(app.args) <= {f.name for f in fields(ServiceConfig)}
    for path in config["grpc_options"]["grpc_servicer_functions"]:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))
    assert config["grpc_options"]["grpc_servicer_functions"] == SERVICERS
    (deployment,) = app.deployments
    assert deployment.name == "AdapterServer"
    assert deployment.max_ongoing_requests >= app.args["max_batch_size"]
    ray_service = only(docs, "RayService")
    import ray
    assert ray_service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    # The registry the app reads is the one every Ray pod mounts.
    for name, spec in pod_specs(docs).items():
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["registry"]["mountPath"] == app.args["registry"], name


@pytest.mark.parametrize("values_set", VALUE_SETS)
def test_gpus_flow_from_values_to_replicas_and_pods(values_set):
    docs = render(values_set)
    (deployment,) = serve_config(docs)["applications"][0]["deployments"]
    gpus = deployment["ray_actor_options"]["num_gpus"]
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    limit = workers["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
    assert limit >= gpus  # a replica fits on one worker
    assert (limit > 0) == (values_set != "cpu-kind")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head


@pytest.mark.parametrize("values_set", VALUE_SETS)
def test_pods_are_locked_down(values_set):
    for name, spec in pod_specs(render(values_set)).items():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"], name
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name  # Ray's only writes
    specs = pod_specs(render(values_set))
    worker_mounts = {m["name"]: m for m in next(s for n, s in specs.items() if n not in ("head", "job"))[
        "containers"][0]["volumeMounts"]}
    assert worker_mounts["registry"].get("readOnly") is True  # replicas never write the registry


def test_secrets_are_mounted_where_the_service_is_told_to_look():
    docs = render("everything-on")
    for name, spec in pod_specs(docs).items():
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert env["ESM_ADAPTERS_TLS_CERT_FILE"].startswith(mounts["tls"] + "/"), name
        assert env[TOKEN_FILE_ENV] == mounts["auth"] + "/token", name  # the variable serving.auth reads
        assert volumes["tls"]["secret"]["secretName"] == "t" and volumes["auth"]["secret"]["secretName"] == "a"
        assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == "reg"
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]  # existing claim: none created


@pytest.mark.parametrize("values_set", ["production-gpu", "everything-on"])
def test_tls_front_beside_every_ray_container_and_the_only_way_in(values_set):
    from serving.serve.tls_front import make_parser
    docs = render(values_set)
    ray_service = only(docs, "RayService")
    (grpc_port,) = [p for p in ray_service["spec"]["serveService"]["spec"]["ports"] if p["name"] == "grpc"]
    for name, spec in pod_specs(docs).items():
        if name == "job":
            continue
        (front,) = [c for c in spec["containers"] if c["name"] == "tls-front"]
        assert front["command"] == ["python3", "-m", "serving.serve.tls_front"]
        args = make_parser().parse_args(front["args"])  # flags the code accepts
        assert args.listen.endswith(f":{grpc_port['targetPort']}")  # the Service reaches TLS only
        assert args.target == f"127.0.0.1:{serve_config(docs)['grpc_options']['port']}"
        mounts = {m["name"]: m["mountPath"] for m in front["volumeMounts"]}
        assert args.cert.startswith(mounts["tls"] + "/") and args.key.startswith(mounts["tls"] + "/")


@pytest.mark.parametrize("values_set", ["production-gpu", "everything-on"])
def test_training_job_runs_a_command_training_accepts(values_set):
    from training.fit import parse_args
    job = only(render(values_set), "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python3", "-m", "training.fit"]
    config = parse_args(container["args"])  # raises on an unknown flag or key
    registry_mount = {m["name"]: m for m in container["volumeMounts"]}["registry"]
    assert config.registry == registry_mount["mountPath"] and not registry_mount.get("readOnly")
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_values_schema_matches_the_code():
    from modeling.lora import ALL_TARGETS
    from serving.serve.config import ServiceConfig
    from serving.engine import DTYPES
    from serving.engine.config import QUANTIZE
    from training.tasks import TASKS
    schema = json.loads((CHART / "values.schema.json").read_text())
    service = schema["properties"]["service"]["properties"]
    # registry and base come from registry.* and model.*, the token file from auth.* (a mounted secret)
    assert set(service) | {"registry", "base", "auth_token_file"} == {f.name for f in fields(ServiceConfig)}
    assert set(service["targets"]["items"]["enum"]) == set(ALL_TARGETS)
    assert set(service["dtype"]["enum"]) == set(DTYPES)
    assert set(service["quantize"]["enum"]) == set(QUANTIZE)
    assert set(schema["properties"]["trainingJob"]["properties"]["task"]["enum"]) == set(TASKS) | {""}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) == set(schema["properties"])


@pytest.mark.parametrize("bad, message", [
    ("service.registery=x", "registery"),
    ("service.max_batch_size=0", "max_batch_size"),
    ("service.dtype=float8", "dtype"),
    ("service.quantize=int4", "quantize"),
    ("service.quantize=int8", "CPU replicas"),  # the default values put replicas on GPUs
    ("workers.gpus=-1", "gpus"),
    ("tls.enabled=true", "secretName"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("trainingJob.task=folding", "task"),
    ("networkPolicy.grpcFrom[0].bogus=1", "bogus"),
    ("rayAuth.existingSecret=Not_A_Name", "existingSecret"),
    ("batchJob.adapters={../etc}", "adapters"),
    ("trainingJob.runAs=Pod", "runAs"),
])
def test_wrong_values_fail_at_install(bad, message):
    out = helm("template", "esm", str(CHART), "--set", bad)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_notes_tell_how_to_call_predict_and_upload():
    out = helm("install", "esm", str(CHART), "--dry-run=client", "--namespace", "proteins")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/esm-esm-adapters-grpc 9000:9000" in notes
    assert "python -m serving.registry push" in notes and "kubectl -n proteins cp" in notes


def render_with(*sets: str) -> list[dict]:
    out = helm("template", "esm", str(CHART), "--namespace", "proteins", *(arg for s in sets for arg in ("--set", s)))
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def ray_pod_labels(docs: list[dict]) -> list[dict]:
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return [group["template"]["metadata"]["labels"] for group in groups]


def admitted(policy: dict) -> dict[tuple, list | None]:
    """Ingress rules as {ports: from-peers (None = from anywhere)}; () = every port."""
    return {tuple(p["port"] for p in rule.get("ports", [])): rule.get("from") for rule in policy["spec"]["ingress"]}


def test_ray_token_auth_and_a_network_policy_by_default():
    docs = render("default")
    secret = only(docs, "Secret", "-ray-token")
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert len(token) == 64 and token.isalnum()
    assert base64.b64decode(only(render_with(), "Secret", "-ray-token")["data"]["auth_token"]).decode() != token
    policy = only(docs, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert all(selector.items() <= labels.items() for labels in ray_pod_labels(docs))  # every Ray pod
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = admitted(policy)
    assert rules[(9000,)] is None and rules[(8000,)] is None  # gRPC and HTTP, from anywhere (token on by default)
    assert rules[(8080,)] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rules[(8265,)] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert rules[()] == [{"podSelector": {"matchLabels": selector}}]  # Ray's own ports: own pods only
    assert set(rules) == {(9000,), (8000,), (8080,), (8265,), ()}  # GCS 6379, client 10001: not from outside


def test_with_tls_the_front_is_the_only_public_port():
    docs = render("everything-on")
    rules = admitted(only(docs, "NetworkPolicy"))
    assert (9443,) in rules and (9000,) not in rules
    own = {"matchLabels": only(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]}
    assert [peer["podSelector"]["matchLabels"].items() <= own["matchLabels"].items()
            for peer in rules[(8000,)]] == [True]  # plaintext HTTP: inside the release only


def test_every_call_needs_a_token_by_default():
    docs = render("default")
    secret = only(docs, "Secret", "-auth")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    for name, spec in pod_specs(docs).items():
        if name == "job":
            continue
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert env[TOKEN_FILE_ENV] == "/etc/esm-adapters/auth/token", name
        assert volumes["auth"]["secret"]["secretName"] == secret["metadata"]["name"], name
    notes = helm("install", "esm", str(CHART), "--dry-run=client", "--namespace", "proteins").stdout
    assert "get secret esm-esm-adapters-auth" in notes and "Authorization: Bearer" in notes and ">= 1.5.1" in notes
    opened = render_with("auth.enabled=false")
    assert not [d for d in opened if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-auth")]
    mine = render_with("auth.existingSecret=team-token")
    assert not [d for d in mine if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-auth")]
    assert {v["name"]: v for v in pod_specs(mine)["head"]["volumes"]}["auth"]["secret"]["secretName"] == "team-token"


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
def test_a_public_service_or_ingress_without_auth_is_refused(service_type):
    out = helm("template", "esm", str(CHART), "--set", f"grpcService.type={service_type},auth.enabled=false")
    assert out.returncode != 0 and "auth" in out.stderr, out.stderr
    assert helm("template", "esm", str(CHART), "--set", f"grpcService.type={service_type}").returncode == 0
    out = helm("template", "esm", str(CHART), "--set", "httpIngress.enabled=true,httpIngress.tlsSecretName=x,"
                                                       "auth.enabled=false")
    assert out.returncode != 0 and "auth" in out.stderr


def test_serving_containers_have_grpc_probes_as_the_kubelet_sends_them():
    """tests/test_http.py calls the same grpc.health.v1 Check with no metadata, as a kubelet does."""
    docs = render("default")
    port = serve_config(docs)["grpc_options"]["port"]
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in \
        serve_config(docs)["grpc_options"]["grpc_servicer_functions"]
    for name, spec in pod_specs(docs).items():
        if name == "job":
            continue
        container = spec["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (name, probe)
        assert container["livenessProbe"]["initialDelaySeconds"] >= 300  # a first model load takes minutes


def test_http_through_an_ingress_with_tls():
    docs = render_with("httpIngress.enabled=true,httpIngress.tlsSecretName=web-tls,httpIngress.host=esm.example.org")
    ingress = only(docs, "Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["esm.example.org"], "secretName": "web-tls"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    ports = {p["name"]: p for p in only(docs, "RayService")["spec"]["serveService"]["spec"]["ports"]}
    assert backend == {"name": "esm-esm-adapters-grpc", "port": {"name": "serve"}} and "serve" in ports
    assert helm("template", "esm", str(CHART), "--set", "httpIngress.enabled=true").returncode != 0  # TLS required


def test_chart_states_the_kuberay_it_needs():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["esm-adapters/requires"] == "kuberay-operator >= 1.5.1"
    template = (CHART / "templates" / "rayservice.yaml").read_text()
    assert 'lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" "rayservices.ray.io"' in template


def test_network_policy_off_an_existing_ray_secret_and_ray_auth_off():
    docs = render_with("networkPolicy.enabled=false", "rayAuth.existingSecret=mine", "trainingJob.enabled=true",
                       "networkPolicy.grpcFrom[0].podSelector.matchLabels.team=proteins")
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["esm-esm-adapters-auth"]  # not Ray's
    assert only(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "mine"}
    env = {e["name"]: e for e in pod_specs(docs)["job"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "auth_token"}
    peers = admitted(only(render_with("networkPolicy.grpcFrom[0].podSelector.matchLabels.team=proteins"),
                          "NetworkPolicy"))[(9000,)]
    assert peers == [{"podSelector": {"matchLabels": {"team": "proteins"}}}]
    off = render_with("rayAuth.enabled=false")
    assert only(off, "RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    assert not [d for d in off if d["kind"] == "Secret" and "ray" in d["metadata"]["name"]]


def test_ray_jobs_run_commands_the_code_accepts_on_their_own_token_authenticated_clusters():
    import shlex

    from serving import batch
    from training.fit import parse_args
    docs = render("ray-jobs")
    jobs = {d["metadata"]["labels"]["esm-adapters/role"]: d for d in docs if d["kind"] == "RayJob"}
    assert set(jobs) == {"batch", "training"} and not [d for d in docs if d["kind"] == "Job"]
    secret = only(docs, "Secret", "-ray-token")["metadata"]["name"]
    selector = only(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    for job in jobs.values():
        spec = job["spec"]
        assert spec["submissionMode"] == "HTTPMode" and spec["shutdownAfterJobFinishes"] is True
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": secret}
        groups = [spec["rayClusterSpec"]["headGroupSpec"]] + spec["rayClusterSpec"]["workerGroupSpecs"]
        assert all(selector.items() <= g["template"]["metadata"]["labels"].items() for g in groups)  # policed
        workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
        assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    argv = shlex.split(jobs["batch"]["spec"]["entrypoint"])
    assert argv[:3] == ["python3", "-m", "serving.batch"]
    args = batch.parser().parse_args(argv[3:])
    assert (args.address, args.adapter, args.workers, args.gpus_per_worker, args.crop, args.embeddings) == (
        "auto", ["sec_str-r16"], 2, 1.0, True, True)
    argv = shlex.split(jobs["training"]["spec"]["entrypoint"])
    assert argv[:3] == ["python3", "-m", "training.fit"]
    config = parse_args(argv[3:])
    assert config.ray.workers == 2 and config.ray.address == "auto" and config.ray.gpus_per_worker == 1
    assert jobs["training"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2


def test_grafana_dashboard_is_shipped_whole():
    """The ConfigMap carries files/dashboard.json; test_service checks its series against a live scrape."""
    dashboard = json.loads(next(iter(only(render("everything-on"), "ConfigMap")["data"].values())))
    assert dashboard == json.loads((CHART / "files" / "dashboard.json").read_text())
    assert all(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])


def test_the_charts_serve_config_deploys_on_a_ray_cluster(tmp_path):
    """What KubeRay does with serveConfigV2, done for real: `serve deploy` through the Ray
    dashboard's REST API onto a running cluster, then Predict over gRPC (CPU values file, whose
    service.quantize=int8 must reach the replica's engine)."""

    import ray

    from bundles import make_bundle
    from conftest import free_port, tiny_hf_folder
    from modeling.base import load_base
    from serving import client
    from serving.engine import Engine, EngineConfig
    from modeling import ray_auth
    from serving.serve import stop, wait_until_routable
    base_dir = tiny_hf_folder(tmp_path / "base")
    registry = tmp_path / "adapters"
    make_bundle(load_base(str(base_dir)), registry, "ss", rank=4, seed=1)
    grpc_port, http_port, dashboard_port = free_port(), free_port(), free_port()
    out = helm("template", "esm", str(CHART), *VALUE_SETS["cpu-kind"], "--set",
               f"registry.mountPath={registry},model.base={base_dir},serve.grpcPort={grpc_port},"
               f"serve.httpPort={http_port},service.r_max=8")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    config = tmp_path / "serve_config.yaml"
    config.write_text(only(docs, "RayService")["spec"]["serveConfigV2"])
    ray_token = ray_auth.close_control_plane()  # as a KubeRay cluster with authOptions runs
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
    try:  # inside: a Ray that fails half way up is shut down too
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                 _temp_dir=ray_tmp, logging_level="WARNING")
        deploy = subprocess.run([shutil.which("serve", path=str(Path(sys.prefix) / "bin")) or "serve", "deploy",
                                 str(config), "--address", f"http://127.0.0.1:{dashboard_port}"],
                                capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        target = f"127.0.0.1:{grpc_port}"
        wait_until_routable(target, timeout=240)
        response = client.predict(target, "ss", ["MKTAYIAKQR"], probabilities=True)
        assert response.adapter == "ss@1" and len(response.predictions[0].labels) == 10
        served = [list(p.values) for p in response.predictions[0].residue_probabilities]
        for quantize, same in (("int8", True), ("none", False)):
            engine = Engine(load_base(str(base_dir)), registry, EngineConfig(r_max=8, quantize=quantize))
            expected = engine.predict([("ss", "MKTAYIAKQR", True)])[0].residue_probabilities
            difference = (torch.tensor(served) - torch.tensor(expected)).abs().max().item()
            assert (difference < 1e-5) == same, (quantize, difference)
    finally:
        stop()
        ray_token.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
