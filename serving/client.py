"""Command-line client for the gRPC service.

  python -m serving.client predict --adapter sec_str-r16 --sequence MKTAYIAK... [--fasta file] [--target host:port]
  python -m serving.client predict --adapter sec_str-r16,scl-frozen,bind-r16 --fasta proteome.fasta   (Annotate)
  python -m serving.client list [--target host:port]
  --token-file FILE (or $ESM_ADAPTERS_AUTH_TOKEN_FILE / $ESM_ADAPTERS_AUTH_TOKEN) when the service requires a token;
  --tls or --tls-ca FILE for a TLS endpoint (serving.serve.tls_front)
"""
from __future__ import annotations

import argparse
import json
import sys

import grpc

from esm_adapters.v1 import adapters_pb2 as pb
from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc
from serving.serve.auth import TokenCheck

APP_METADATA = (("application", "esm-adapters"),)  # Ray Serve routes gRPC by application name
# Every AdapterService call is idempotent (reads only), so a call that finds the service
# UNAVAILABLE (a replica or proxy restarting) is retried: up to 4 attempts, exponential backoff
# from 0.2 s to 2 s with gRPC's jitter. Other statuses are answers and are never retried.
RETRY_POLICY = {"methodConfig": [{
    "name": [{"service": "esm_adapters.v1.AdapterService"}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}


class AdapterClient:
    """One channel for many calls (channels are thread-safe; a new one per call costs a
    connection set-up each time). Use as a context manager or call close()."""

    def __init__(self, target: str, token: str | None = None, tls: bool = False, tls_ca: str | None = None):
        """tls: connect with TLS trusting the system's CAs, or only the PEM file tls_ca."""
        options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY))]
        if tls or tls_ca:
            roots = open(tls_ca, "rb").read() if tls_ca else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.AdapterServiceStub(self.channel)
        self.metadata = APP_METADATA + ((("authorization", f"Bearer {token}"),) if token else ())

    def predict(self, adapter: str, sequences: list[str], probabilities: bool = False, crop: bool = False,
                timeout: float = 60.0) -> pb.PredictResponse:
        request = pb.PredictRequest(adapter=adapter, sequences=sequences, residue_probabilities=probabilities,
                                    crop=crop)
        return self.stub.Predict(request, metadata=self.metadata, timeout=timeout)

    def annotate(self, adapters: list[str], sequences: list[str], probabilities: bool = False, crop: bool = False,
                 timeout: float = 120.0) -> pb.AnnotateResponse:
        request = pb.AnnotateRequest(adapters=adapters, sequences=sequences, residue_probabilities=probabilities,
                                     crop=crop)
        return self.stub.Annotate(request, metadata=self.metadata, timeout=timeout)

    def list_adapters(self, timeout: float = 30.0) -> pb.ListAdaptersResponse:
        return self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AdapterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def predict(target: str, adapter: str, sequences: list[str], probabilities: bool = False,
            crop: bool = False, timeout: float = 60.0, token: str | None = None, **tls) -> pb.PredictResponse:
    """One call on a channel of its own (scripts, tests); use AdapterClient for many."""
    with AdapterClient(target, token, **tls) as c:
        return c.predict(adapter, sequences, probabilities, crop, timeout)


def annotate(target: str, adapters: list[str], sequences: list[str], probabilities: bool = False,
             crop: bool = False, timeout: float = 120.0, token: str | None = None, **tls) -> pb.AnnotateResponse:
    with AdapterClient(target, token, **tls) as c:
        return c.annotate(adapters, sequences, probabilities, crop, timeout)


def list_adapters(target: str, timeout: float = 30.0, token: str | None = None, **tls) -> pb.ListAdaptersResponse:
    with AdapterClient(target, token, **tls) as c:
        return c.list_adapters(timeout)


def token_from(path: str | None) -> str | None:
    """--token-file, else the same variables the service reads (so a container's health check
    authenticates as itself): $ESM_ADAPTERS_AUTH_TOKEN_FILE, $ESM_ADAPTERS_AUTH_TOKEN; else none."""
    check = TokenCheck(path)
    return check.token().decode() if check.enabled else None


def read_fasta(path: str) -> list[tuple[str, str]]:
    records, name, body = [], None, []
    for line in open(path):
        line = line.strip()
        if line.startswith(">"):
            if name is not None:
                records.append((name, "".join(body)))
            name, body = line[1:].split()[0] if line[1:].split() else "", []
        elif line:
            body.append(line)
    if name is not None:
        records.append((name, "".join(body)))
    return records


def render(response: pb.PredictResponse, names: list[str], sequences: list[str]) -> str:
    lines = [f"adapter {response.adapter}  task {response.task}  ({response.kind})"]
    for name, seq, p in zip(names, sequences, response.predictions):
        lines.append(f">{name}" + ("  (cropped)" if p.cropped else ""))
        if response.kind == "per_residue":
            for start in range(0, len(seq), 60):
                lines += [f"  {seq[start:start + 60]}", f"  {p.labels[start:start + 60]}", ""]
        elif response.kind == "sequence_class":
            ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
            lines.append(f"  {p.label}   " + "  ".join(f"{k}={v:.3f}" for k, v in ranked[:5]))
        else:
            lines.append(f"  value = {p.value:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:9000")
    parser.add_argument("--token-file", help="bearer token for a service with auth (or $ESM_ADAPTERS_AUTH_TOKEN[_FILE])")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    parser.add_argument("--tls-ca", help="connect with TLS, trusting this PEM certificate/CA")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--adapter", required=True, help="NAME[@VERSION], or several comma-separated (one Annotate call)")
    p.add_argument("--sequence", action="append", default=[])
    p.add_argument("--fasta")
    p.add_argument("--crop", action="store_true")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    try:
        token, tls = token_from(args.token_file), {"tls": args.tls, "tls_ca": args.tls_ca}
        if args.command == "list":
            response = list_adapters(args.target, token=token, **tls)
            print(f"base {response.base_name} {response.base_fingerprint[:12]}")
            for a in response.adapters:
                metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(a.metrics.items()))
                print(f"{a.name}@{a.version:<4} {a.status:<8} task={a.task} kind={a.kind} mode={a.mode} "
                      f"rank={a.rank} {metrics}" + (f"  reason: {a.reason}" if a.reason else ""))
            return 0
        named = [(f"seq{i + 1}", s) for i, s in enumerate(args.sequence)]
        if args.fasta:
            named += read_fasta(args.fasta)
        if not named:
            parser.error("give --sequence or --fasta")
        adapters = [a for a in args.adapter.split(",") if a]
        sequences, names, shown = [s for _, s in named], [n for n, _ in named], [s.upper()[:1022] for _, s in named]
        if len(adapters) == 1:
            responses = [predict(args.target, adapters[0], sequences, crop=args.crop, token=token, **tls)]
        else:
            responses = annotate(args.target, adapters, sequences, crop=args.crop, token=token, **tls).results
        print("\n\n".join(render(response, names, shown) for response in responses))
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a missing or empty token file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
