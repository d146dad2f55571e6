"""TLS in front of the service. Ray Serve's gRPC proxy speaks plaintext only (its gRPCOptions have
no TLS settings), so this small pass-through terminates TLS and forwards every call to the proxy
on loopback, bytes untouched.

  python -m serving.serve.tls_front --listen 0.0.0.0:9443 --target 127.0.0.1:9000 --cert tls.crt --key tls.key

--cert/--key default to $ESM_ADAPTERS_TLS_CERT_FILE / $ESM_ADAPTERS_TLS_KEY_FILE (how the Helm
chart mounts its secret). Calls are forwarded without being decoded, with their metadata (so the
application name and the bearer token pass through), deadline and status; unary calls and the
streaming reflection call are both supported.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc

log = logging.getLogger("serving.serve.tls_front")
CERT_ENV, KEY_ENV = "ESM_ADAPTERS_TLS_CERT_FILE", "ESM_ADAPTERS_TLS_KEY_FILE"
STREAMING = {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
             "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}


class Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.Channel):
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        if method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: self._stream(method, requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(method, request, context))

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = self.channel.unary_unary(method)
        try:
            return call(request, metadata=forwarded(context), timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")

    def _stream(self, method: str, requests, context: grpc.ServicerContext):
        call = self.channel.stream_stream(method)
        try:
            yield from call(requests, metadata=forwarded(context), timeout=context.time_remaining())
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")


def forwarded(context: grpc.ServicerContext) -> tuple:
    """The caller's own metadata (the transport's headers are set again by the next hop)."""
    return tuple((k, v) for k, v in context.invocation_metadata() if k not in ("user-agent",) and not k.startswith(":"))


def start(listen: str, target: str, cert: bytes, key: bytes, workers: int = 64) -> grpc.Server:
    channel = grpc.insecure_channel(target)
    server = grpc.server(futures.ThreadPoolExecutor(workers, thread_name_prefix="tls-front"),
                         handlers=[Forward(channel)])
    if server.add_secure_port(listen, grpc.ssl_server_credentials([(key, cert)])) == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server


def wait_for_termination() -> None:
    """Block until SIGTERM (Kubernetes, Docker) or Ctrl-C."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.serve.tls_front", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="0.0.0.0:9443", help="HOST:PORT of TLS (default 0.0.0.0:9443)")
    parser.add_argument("--target", default="127.0.0.1:9000", help="the plaintext gRPC service it forwards to "
                        "(default 127.0.0.1:9000)")
    parser.add_argument("--cert", default=os.environ.get(CERT_ENV), help=f"PEM certificate chain (default ${CERT_ENV})")
    parser.add_argument("--key", default=os.environ.get(KEY_ENV), help=f"PEM private key (default ${KEY_ENV})")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.cert or not args.key:
        parser.error(f"--cert and --key (or ${CERT_ENV} and ${KEY_ENV}) are required")
    try:
        with open(args.cert, "rb") as c, open(args.key, "rb") as k:
            cert, key = c.read(), k.read()
        server = start(args.listen, args.target, cert, key)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("TLS on %s -> %s", args.listen, args.target)
    wait_for_termination()
    server.stop(grace=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
