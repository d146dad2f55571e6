"""Start the gRPC service on an embedded single-node Ray and serve until interrupted.

  python -m serving.serve --registry adapters/ --grpc-port 9000 --metrics-port 9100

Prometheus text (our series and Ray Serve's) is on http://HOST:METRICS_PORT/metrics.
On an existing Ray cluster use `serve deploy serving/serve/serve_config.yaml` instead: same app.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import fields

import yaml

from serving.serve import tls_front
from serving.serve.config import SERVICERS, ServiceConfig
from serving.serve.auth import TokenCheck
from modeling import ray_auth
from serving.serve.metrics_front import MetricsFront
from serving.serve.ports import free_port, listening

log = logging.getLogger("serving.serve")
APP_NAME = "esm-adapters"


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(ServiceConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("targets", "merged"):
            parser.add_argument(flag, help=f"comma-separated (default: {f.default_factory()})")
        else:
            # Optional fields (default None) may hold numbers too: parse their values as YAML.
            parse = type(f.default) if f.default is not None else yaml.safe_load
            parser.add_argument(flag, type=parse, default=None)


def service_args(ns: argparse.Namespace) -> dict:
    args = {}
    for f in fields(ServiceConfig):
        value = getattr(ns, f.name)
        if value is not None:
            args[f.name] = [v for v in value.split(",") if v] if f.name in ("targets", "merged") else value
    return args


_running: list = []  # what start() set up besides Ray and Serve, undone by stop() (last first)


def start(args: dict, grpc_port: int, metrics_port: int, num_replicas: int = 1, num_cpus: float = 0.5,
          num_gpus: float = 0.0, ray_cpus: int | None = None, http_port: int = 0, token: str | None = None,
          max_ongoing_requests: int | None = None, max_queued_requests: int = 1024, access_log: bool = False,
          metrics_host: str = "0.0.0.0", ray_token_file: str | None = None, http_host: str = "127.0.0.1"):
    """Embedded Ray + Serve, its control plane closed (modeling.ray_auth: token authentication, every
    Ray port on loopback); the gRPC port, the HTTP port (on `http_host`) and the metrics port are
    the service's only open doors.
    Returns the first ListAdapters answer once the app is RUNNING (base loaded, warm) and routable.
    `token` is the gRPC bearer token clients send; `ray_token_file` Ray's own (default: made now)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serving.serve.app import AdapterServer
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    # Serve's proxy readiness check (5 s by default) fails on a busy 2-core machine and the
    # controller then kills the proxy; give it room. Inherited by the processes ray.init starts.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    args = {"torch_threads": 0, **args}  # a local single-node service may use every core
    config = ServiceConfig.from_args(args)  # bad arguments fail here, before anything starts
    http_port = http_port or 8000
    require_free_ports({"gRPC": grpc_port, "metrics": metrics_port, "HTTP": http_port})
    ray_token = ray_auth.close_control_plane(ray_token_file)
    _running.append(ray_token.close)
    try:  # a start that fails half way stops what it started: no Ray left behind in the caller
        ray_metrics = free_port()  # Ray's metrics agent, on loopback; the front publishes it
        ray.init(num_cpus=ray_cpus or os.cpu_count(), include_dashboard=False, _metrics_export_port=ray_metrics,
                 _temp_dir=os.environ.get("ESM_ADAPTERS_RAY_TMP", tempfile.gettempdir() + "/esm-adapters-ray"),
                 namespace=APP_NAME, logging_level=logging.WARNING)
        _running.append(MetricsFront(metrics_host, metrics_port, ray_metrics).stop)
        serve.start(grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICERS),
                    http_options={"host": http_host, "port": http_port})
        app = AdapterServer.options(
            num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
            max_ongoing_requests=max_ongoing_requests or max(256, 2 * config.max_batch_size),
            max_queued_requests=max_queued_requests,
            # A log line per request costs the replica CPU it needs for the model; metrics count requests.
            logging_config={"enable_access_log": access_log}).bind(
            {f.name: getattr(config, f.name) for f in fields(ServiceConfig)})
        serve.run(app, name=APP_NAME, route_prefix="/")
        return wait_until_routable(f"127.0.0.1:{grpc_port}", token=token)
    except BaseException:
        stop()
        raise


def require_free_ports(ports: dict[str, int]) -> None:
    """Refuse ports something already listens on before starting anything (a clear error instead of
    a proxy that cannot bind)."""
    for what, port in ports.items():
        if listening(port):
            raise OSError(f"{what} port {port} is not free: something listens on it")


def wait_until_routable(target: str, timeout: float = 300.0, token: str | None = None):
    """serve.run returns before the gRPC proxy's route table lists the app; wait for it."""
    import time

    import grpc

    from serving.client import list_adapters
    deadline = time.monotonic() + timeout
    while True:
        try:
            return list_adapters(target, timeout=10, token=token)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def stop() -> None:
    """Stop Serve and the embedded Ray; safe to call whatever was started."""
    import ray
    from ray import serve
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        while _running:
            _running.pop()()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m serving.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--metrics-port", type=int, default=9100)
    parser.add_argument("--metrics-host", default="0.0.0.0", help="where the metrics port listens")
    parser.add_argument("--ray-token-file", help=f"Ray's own token (default ${ray_auth.TOKEN_FILE_ENV}, else one "
                        "made for this start); not the gRPC bearer token")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--replica-gpus", type=float, default=0.0)
    parser.add_argument("--access-log", action="store_true", help="log every request (Ray Serve access log)")
    parser.add_argument("--max-queued-requests", type=int, default=1024,
                        help="requests the proxy queues before answering RESOURCE_EXHAUSTED (-1: no limit)")
    parser.add_argument("--tls-port", type=int, help="also serve TLS here (serving.serve.tls_front), with:")
    parser.add_argument("--tls-cert", help="PEM certificate chain for --tls-port")
    parser.add_argument("--tls-key", help="PEM private key for --tls-port")
    add_service_flags(parser)
    ns = parser.parse_args(argv)
    if ns.tls_port and not (ns.tls_cert and ns.tls_key):
        parser.error("--tls-port needs --tls-cert and --tls-key")
    args = service_args(ns)
    try:
        ServiceConfig.from_args(args)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        auth = TokenCheck(args.get("auth_token_file"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = auth.token().decode() if auth.enabled else None
    log.info("starting: %s%s", json.dumps(args), " (bearer-token auth on)" if auth.enabled else "")
    try:
        adapters = start(args, ns.grpc_port, ns.metrics_port, ns.replicas, ns.replica_cpus, ns.replica_gpus,
                         token=token, max_queued_requests=ns.max_queued_requests, access_log=ns.access_log,
                         metrics_host=ns.metrics_host, ray_token_file=ns.ray_token_file)
    except (OSError, ValueError) as exc:  # a port in use, a bad token file: said plainly
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = sum(a.status == "ok" for a in adapters.adapters)
    log.info("serving gRPC on 0.0.0.0:%d (reflection on), metrics on http://%s:%d/metrics; "
             "%d adapter versions found (%d servable)", ns.grpc_port, ns.metrics_host, ns.metrics_port,
             len(adapters.adapters), ok)
    front = None
    try:
        if ns.tls_port:
            with open(ns.tls_cert, "rb") as cert, open(ns.tls_key, "rb") as key:
                front = tls_front.start(f"0.0.0.0:{ns.tls_port}", f"127.0.0.1:{ns.grpc_port}", cert.read(),
                                        key.read())
            log.info("TLS on 0.0.0.0:%d", ns.tls_port)
        tls_front.wait_for_termination()
        log.info("shutting down")
    finally:  # a TLS front that cannot start stops the service it fronts, too
        if front is not None:
            front.stop(grace=5)
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
