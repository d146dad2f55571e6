"""The light client: `pip install 'esm-adapters[client]'` (grpcio and protobuf only, no torch).

    from esm_adapters.client import Client
    with Client("127.0.0.1:9000", token="...") as c:
        answer = c.predict("sec_str-r16", ["MKTAYIAKQR"])
        print(answer.adapter, answer.predictions[0].labels)

`Client` and `AsyncClient` (grpc.aio) call the service over gRPC and return plain dataclasses:
predict -> Answer, annotate -> [Answer], embed -> [Embedding], adapters -> Listing, health -> str.
Every call is a read, so a call that finds the service UNAVAILABLE (a replica or proxy restarting)
is retried: up to 4 attempts, exponential backoff from 0.2 s to 2 s; other statuses are answers
and raise grpc.RpcError at once. The token: `token=` (`token_from()` reads the variables the
service reads, $ESM_ADAPTERS_AUTH_TOKEN_FILE or $ESM_ADAPTERS_AUTH_TOKEN; the command line does
that). TLS: tls=True (system CAs) or tls_ca=PEM.

Command line:  esm-adapters predict --adapter NAME[,NAME...] --sequence MKT... | --fasta FILE
               esm-adapters list | embed --sequence ... | health     [--target HOST:PORT] [--token-file F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import grpc

from esm_adapters.fasta import read_fasta
from esm_adapters.v1 import adapters_pb2 as pb
from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc

TOKEN_FILE_ENV = "ESM_ADAPTERS_AUTH_TOKEN_FILE"
TOKEN_ENV = "ESM_ADAPTERS_AUTH_TOKEN"
APP_METADATA = (("application", "esm-adapters"),)  # Ray Serve routes gRPC by application name
RETRY_POLICY = {"methodConfig": [{
    "name": [{"service": "esm_adapters.v1.AdapterService"}, {"service": "grpc.health.v1.Health"}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}
DEFAULT_TARGET = "127.0.0.1:9000"
# Where `serving.serve` keeps the token it makes when given none (0600); the clients on the same
# machine read it when nothing else names a token.
DEFAULT_TOKEN_FILE = os.path.join(os.environ.get("XDG_CONFIG_HOME") or "~/.config", "esm-adapters", "token")


# ---- answers, as plain Python ---------------------------------------------------------------------
@dataclass
class Prediction:
    labels: str | None = None  # per-residue: one label per residue
    residue_probabilities: list[list[float]] | None = None
    label: str | None = None  # sequence classification
    probabilities: dict[str, float] | None = None
    value: float | None = None  # regression
    cropped: bool = False


@dataclass
class Answer:
    adapter: str  # the NAME@VERSION that answered
    task: str
    kind: str  # per_residue | sequence_class | regression
    label_names: list[str]
    predictions: list[Prediction]


@dataclass
class Embedding:
    mean: list[float]
    length: int
    residues: list[list[float]] | None = None  # length x dim, when asked for


@dataclass
class AdapterInfo:
    name: str
    version: int
    status: str  # ok | refused
    reason: str
    task: str
    kind: str
    mode: str
    rank: int
    labels: list[str]
    base_fingerprint: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class Listing:
    base_name: str
    base_fingerprint: str
    adapters: list[AdapterInfo]
    registry_problem: str = ""


def answer_of(response: pb.PredictResponse) -> Answer:
    predictions = []
    for p in response.predictions:
        kind = response.kind
        predictions.append(Prediction(
            labels=p.labels if kind == "per_residue" else None,
            residue_probabilities=[list(row.values) for row in p.residue_probabilities] or None,
            label=p.label if kind == "sequence_class" else None,
            probabilities=dict(p.probabilities) if kind == "sequence_class" else None,
            value=p.value if p.HasField("value") else None, cropped=p.cropped))
    return Answer(response.adapter, response.task, response.kind, list(response.label_names), predictions)


def embeddings_of(response: pb.EmbedResponse) -> list[Embedding]:
    out = []
    for e in response.embeddings:
        flat = list(e.residues)
        rows = [flat[i:i + response.dim] for i in range(0, len(flat), response.dim)] if flat else None
        out.append(Embedding(list(e.mean), e.length, rows))
    return out


def listing_of(response: pb.ListAdaptersResponse) -> Listing:
    return Listing(response.base_name, response.base_fingerprint, [
        AdapterInfo(a.name, a.version, a.status, a.reason, a.task, a.kind, a.mode, a.rank, list(a.labels),
                    a.base_fingerprint, dict(a.metrics)) for a in response.adapters], response.registry_problem)


# ---- connections ----------------------------------------------------------------------------------
def token_from(path: str | None = None) -> str | None:
    """`path`, else $ESM_ADAPTERS_AUTH_TOKEN_FILE, else $ESM_ADAPTERS_AUTH_TOKEN, else the token a
    local `serving.serve` made (DEFAULT_TOKEN_FILE), else none."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if not path and not os.environ.get(TOKEN_ENV) and os.path.isfile(os.path.expanduser(DEFAULT_TOKEN_FILE)):
        path = os.path.expanduser(DEFAULT_TOKEN_FILE)
    if path:
        try:
            token = open(path).read().strip()
        except OSError as exc:
            raise ValueError(f"token file {path}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def channel_options() -> list:
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY))]


def credentials(tls: bool, tls_ca: str | None):
    if not (tls or tls_ca):
        return None
    return grpc.ssl_channel_credentials(open(tls_ca, "rb").read() if tls_ca else None)


def metadata_for(token: str | None) -> tuple:
    return APP_METADATA + ((("authorization", f"Bearer {token}"),) if token else ())


def predict_request(adapter, sequences, probabilities, crop) -> pb.PredictRequest:
    return pb.PredictRequest(adapter=adapter, sequences=list(sequences), residue_probabilities=probabilities, crop=crop)


def annotate_request(adapters, sequences, probabilities, crop) -> pb.AnnotateRequest:
    return pb.AnnotateRequest(adapters=list(adapters), sequences=list(sequences),
                              residue_probabilities=probabilities, crop=crop)


class Client:
    """One channel for many calls (thread-safe). Use as a context manager or call close().
    `stub` and `metadata` are there for calls that want the protobuf messages themselves."""

    def __init__(self, target: str = DEFAULT_TARGET, token: str | None = None, tls: bool = False,
                 tls_ca: str | None = None):
        creds = credentials(tls, tls_ca)
        self.channel = grpc.secure_channel(target, creds, options=channel_options()) if creds \
            else grpc.insecure_channel(target, options=channel_options())
        self.stub = pb_grpc.AdapterServiceStub(self.channel)
        self.metadata = metadata_for(token)

    def predict(self, adapter: str, sequences: list[str], probabilities: bool = False, crop: bool = False,
                timeout: float = 60.0) -> Answer:
        return answer_of(self.stub.Predict(predict_request(adapter, sequences, probabilities, crop),
                                           metadata=self.metadata, timeout=timeout))

    def annotate(self, adapters: list[str], sequences: list[str], probabilities: bool = False, crop: bool = False,
                 timeout: float = 120.0) -> list[Answer]:
        response = self.stub.Annotate(annotate_request(adapters, sequences, probabilities, crop),
                                      metadata=self.metadata, timeout=timeout)
        return [answer_of(r) for r in response.results]

    def embed(self, sequences: list[str], per_residue: bool = False, timeout: float = 60.0) -> list[Embedding]:
        return embeddings_of(self.stub.Embed(pb.EmbedRequest(sequences=list(sequences), per_residue=per_residue),
                                             metadata=self.metadata, timeout=timeout))

    def adapters(self, timeout: float = 30.0) -> Listing:
        return listing_of(self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata, timeout=timeout))

    def health(self, timeout: float = 10.0) -> str:
        """grpc.health.v1 Check: SERVING once a replica is warm (what Kubernetes' probes ask)."""
        return _health(self.channel, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The same calls with grpc.aio: `async with AsyncClient(target) as c: await c.predict(...)`."""

    def __init__(self, target: str = DEFAULT_TARGET, token: str | None = None, tls: bool = False,
                 tls_ca: str | None = None):
        creds = credentials(tls, tls_ca)
        self.channel = grpc.aio.secure_channel(target, creds, options=channel_options()) if creds \
            else grpc.aio.insecure_channel(target, options=channel_options())
        self.stub = pb_grpc.AdapterServiceStub(self.channel)
        self.metadata = metadata_for(token)

    async def predict(self, adapter: str, sequences: list[str], probabilities: bool = False, crop: bool = False,
                      timeout: float = 60.0) -> Answer:
        return answer_of(await self.stub.Predict(predict_request(adapter, sequences, probabilities, crop),
                                                 metadata=self.metadata, timeout=timeout))

    async def annotate(self, adapters: list[str], sequences: list[str], probabilities: bool = False,
                       crop: bool = False, timeout: float = 120.0) -> list[Answer]:
        response = await self.stub.Annotate(annotate_request(adapters, sequences, probabilities, crop),
                                            metadata=self.metadata, timeout=timeout)
        return [answer_of(r) for r in response.results]

    async def embed(self, sequences: list[str], per_residue: bool = False, timeout: float = 60.0) -> list[Embedding]:
        return embeddings_of(await self.stub.Embed(pb.EmbedRequest(sequences=list(sequences), per_residue=per_residue),
                                                   metadata=self.metadata, timeout=timeout))

    async def adapters(self, timeout: float = 30.0) -> Listing:
        return listing_of(await self.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata,
                                                       timeout=timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _health(channel, timeout: float) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # optional: grpcio-health-checking
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


# ---- command line ---------------------------------------------------------------------------------
def render(answer: Answer, names: list[str], sequences: list[str]) -> str:
    lines = [f"adapter {answer.adapter}  task {answer.task}  ({answer.kind})"]
    for name, seq, p in zip(names, sequences, answer.predictions):
        lines.append(f">{name}" + ("  (cropped)" if p.cropped else ""))
        if answer.kind == "per_residue":
            for start in range(0, len(seq), 60):
                lines += [f"  {seq[start:start + 60]}", f"  {p.labels[start:start + 60]}", ""]
        elif answer.kind == "sequence_class":
            ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
            lines.append(f"  {p.label}   " + "  ".join(f"{k}={v:.3f}" for k, v in ranked[:5]))
        else:
            lines.append(f"  value = {p.value:.4f}")
    return "\n".join(lines)


def connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--target and friends, accepted before or after the command (a default only on the main parser)."""
    d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--target", default=d(DEFAULT_TARGET), help=f"HOST:PORT of the gRPC service "
                        f"(default {DEFAULT_TARGET})")
    parser.add_argument("--token-file", default=d(None), help=f"bearer token (default ${TOKEN_FILE_ENV}, "
                        f"then ${TOKEN_ENV}, then {DEFAULT_TOKEN_FILE}; none if none is there)")
    parser.add_argument("--tls", action="store_true", default=d(False), help="TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", default=d(None), help="TLS, trusting only this PEM certificate or CA")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="esm-adapters predict|list|embed|health", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    connection_flags(main_parser, defaults=True)
    sub = main_parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="one adapter (Predict) or several comma-separated (Annotate)")
    p.add_argument("--adapter", required=True, help="NAME[@VERSION], or several comma-separated")
    p.add_argument("--sequence", action="append", default=[], help="a sequence (repeatable)")
    p.add_argument("--fasta", help="sequences from a FASTA file (ids from the headers)")
    p.add_argument("--crop", action="store_true", help="crop sequences over 1,022 residues instead of refusing them")
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    e = sub.add_parser("embed", help="mean embeddings from the bare base (Embed)")
    e.add_argument("--sequence", action="append", default=[], help="a sequence (repeatable)")
    e.add_argument("--fasta", help="sequences from a FASTA file")
    listing = sub.add_parser("list", help="every adapter version and its status (ListAdapters)")
    listing.add_argument("--json", action="store_true", help="print the listing as JSON")
    health = sub.add_parser("health", help="grpc.health.v1 Check; exit 0 when SERVING")
    for p_ in (p, e, listing, health):
        connection_flags(p_, defaults=False)
    return main_parser


def main(argv: list[str] | None = None) -> int:
    from dataclasses import asdict
    cli = parser()
    args = cli.parse_args(argv)
    try:
        with Client(args.target, token_from(args.token_file), args.tls, args.tls_ca) as c:
            if args.command == "health":
                status = c.health()
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "list":
                listing = c.adapters()
                if args.json:
                    print(json.dumps(asdict(listing), indent=2))
                    return 0
                print(f"base {listing.base_name} {listing.base_fingerprint[:12]}")
                for a in listing.adapters:
                    metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(a.metrics.items()))
                    print(f"{a.ref:<24} {a.status:<8} task={a.task} kind={a.kind} mode={a.mode} rank={a.rank} "
                          f"{metrics}" + (f"  reason: {a.reason}" if a.reason else ""))
                return 0
            named = [(f"seq{i + 1}", s) for i, s in enumerate(args.sequence)]
            if args.fasta:
                named += read_fasta(args.fasta)
            if not named:
                cli.error("give --sequence or --fasta")
            sequences, names = [s for _, s in named], [n for n, _ in named]
            if args.command == "embed":
                for name, embedding in zip(names, c.embed(sequences)):
                    print(f">{name} length {embedding.length}: " + " ".join(f"{v:.4f}" for v in embedding.mean[:8])
                          + (" ..." if len(embedding.mean) > 8 else ""))
                return 0
            adapters = [a for a in args.adapter.split(",") if a]
            answers = [c.predict(adapters[0], sequences, crop=args.crop)] if len(adapters) == 1 \
                else c.annotate(adapters, sequences, crop=args.crop)
            if args.json:
                print(json.dumps([asdict(a) for a in answers], indent=2))
            else:
                shown = [s.upper()[:1022] for s in sequences]
                print("\n\n".join(render(answer, names, shown) for answer in answers))
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # a missing token or FASTA file, an empty token file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
