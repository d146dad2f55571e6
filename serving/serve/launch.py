"""Start the service (gRPC and HTTP/JSON) on an embedded single-node Ray; serve until interrupted.

  python -m serving.serve --registry adapters/ [--grpc-port 9000] [--http-port 8000] [--metrics-port 9100]

Every call needs a bearer token: yours (--auth-token-file, $ESM_ADAPTERS_AUTH_TOKEN_FILE or
$ESM_ADAPTERS_AUTH_TOKEN), else one made once and kept in ~/.config/esm-adapters/token, where the
clients on this machine find it; --no-auth opens the ports to anyone who reaches them. HTTP and
metrics listen on loopback unless --http-host / --metrics-host say otherwise.
Prometheus text (our series and Ray Serve's) is on http://HOST:METRICS_PORT/metrics.
On an existing Ray cluster use `serve deploy serving/serve/serve_config.yaml` instead: same app.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from serving.serve import tls_front
from serving.serve.config import SERVICERS, ServiceConfig
from esm_adapters.client import DEFAULT_TOKEN_FILE, TOKEN_FILE_ENV
from serving.serve.auth import TokenCheck
from modeling import ray_auth
from serving.serve.metrics_front import MetricsFront
from serving.serve.ports import free_port, listening

log = logging.getLogger("serving.serve")
APP_NAME = "esm-adapters"


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServiceConfig field, its help and default from the field."""
    group = parser.add_argument_group("service options (the Serve config's args, the chart's service.*)")
    for f in fields(ServiceConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        about = f.metadata["help"] + (f" (default {shown})" if shown not in (None, "", []) else "")
        if f.name in ("targets", "merged"):
            group.add_argument(flag, help=about + "; comma-separated")
        else:
            # Optional fields (default None) may hold numbers too, and bool("false") is True: YAML parses them.
            parse = type(f.default) if f.default is not None and not isinstance(f.default, bool) else yaml.safe_load
            group.add_argument(flag, type=parse, default=None, help=about, choices=f.metadata.get("choices"))


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000; Ray Serve's proxy "
                   "listens on every interface, so it always has a bearer token unless --no-auth)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/JSON port (default 8000)")
    p.add_argument("--http-host", default="127.0.0.1", help="where the HTTP port listens (default 127.0.0.1; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--metrics-port", type=int, default=9100, help="Prometheus text on /metrics (default 9100)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="where the metrics port listens (default "
                   "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--no-auth", action="store_true", help="serve without a bearer token: anyone who reaches "
                   "the ports may call them (default: the token of --auth-token-file or the environment, else "
                   f"one made once and kept in {DEFAULT_TOKEN_FILE})")
    p.add_argument("--ray-token-file", help=f"Ray's own token (default ${ray_auth.TOKEN_FILE_ENV}, else one "
                   "made for this start); not the bearer token of the calls")
    p.add_argument("--replicas", type=int, default=1, help="replicas, each one base on its device (default 1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    p.add_argument("--access-log", action="store_true", help="log every request (Ray Serve access log; off)")
    p.add_argument("--max-queued-requests", type=int, default=1024, help="requests the proxy queues before "
                   "answering RESOURCE_EXHAUSTED (default 1024; -1: no limit)")
    p.add_argument("--tls-port", type=int, help="also serve gRPC over TLS here (serving.serve.tls_front), with:")
    p.add_argument("--tls-cert", help="PEM certificate chain for --tls-port")
    p.add_argument("--tls-key", help="PEM private key for --tls-port")
    add_service_flags(p)
    return p


def bearer_token(args: dict, no_auth: bool, made: str = DEFAULT_TOKEN_FILE) -> tuple[dict, str | None, str]:
    """(service args, the token calls must send or None, what to tell the operator). A door that
    answers requests has a credential unless the operator opens it explicitly: without a token of
    their own (a file or the environment), one is made once and kept private in `made`
    (DEFAULT_TOKEN_FILE, where the clients on this machine find it)."""
    if no_auth:
        return args, None, "no bearer token (--no-auth): anyone who reaches the ports may call them"
    auth = TokenCheck(args.get("auth_token_file"))  # a file named or in the environment
    if auth.enabled:
        return args, auth.token().decode(), "bearer-token auth on"
    path = Path(made).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    args = {**args, "auth_token_file": str(path)}
    return args, TokenCheck(str(path)).token().decode(), (f"bearer-token auth on, token in {path} (the clients on this "
                                                          f"machine read it; elsewhere: ${TOKEN_FILE_ENV})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli = parser()
    ns = cli.parse_args(argv)
    if ns.tls_port and not (ns.tls_cert and ns.tls_key):
        cli.error("--tls-port needs --tls-cert and --tls-key")
    try:
        ServiceConfig.from_args(service_args(ns))
        args, token, notice = bearer_token(service_args(ns), ns.no_auth)
    except (TypeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (log.warning if ns.no_auth else log.info)("starting: %s; %s", json.dumps(args), notice)
    try:
        adapters = start(args, ns.grpc_port, ns.metrics_port, ns.replicas, ns.replica_cpus, ns.replica_gpus,
                         http_port=ns.http_port, token=token, max_queued_requests=ns.max_queued_requests,
                         access_log=ns.access_log, metrics_host=ns.metrics_host, ray_token_file=ns.ray_token_file,
                         http_host=ns.http_host)
    except (OSError, ValueError) as exc:  # a port in use, a bad token file: said plainly
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = sum(a.status == "ok" for a in adapters.adapters)
    log.info("serving gRPC on 0.0.0.0:%d (reflection, grpc.health.v1), HTTP on http://%s:%d (/docs), metrics on "
             "http://%s:%d/metrics; %d adapter versions found (%d servable)", ns.grpc_port, ns.http_host,
             ns.http_port, ns.metrics_host, ns.metrics_port, len(adapters.adapters), ok)
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
