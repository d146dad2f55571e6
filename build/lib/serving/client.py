"""`python -m serving.client`: the light client's command line (esm_adapters/client.py, which also
gives `Client` and `AsyncClient`), and one-call helpers that return the protobuf messages themselves.

  python -m serving.client predict --adapter sec_str-r16 --sequence MKTAYIAK... [--fasta file] [--target host:port]
  python -m serving.client predict --adapter sec_str-r16,scl-frozen,bind-r16 --fasta proteome.fasta   (Annotate)
  python -m serving.client list | embed --sequence ... | health
"""
from __future__ import annotations

import sys

from esm_adapters.client import APP_METADATA, Client, annotate_request, main, predict_request, token_from
from esm_adapters.v1 import adapters_pb2 as pb

AdapterClient = Client
__all__ = ["APP_METADATA", "AdapterClient", "Client", "annotate", "list_adapters", "main", "predict", "token_from"]


def predict(target: str, adapter: str, sequences: list[str], probabilities: bool = False, crop: bool = False,
            timeout: float = 60.0, token: str | None = None, **tls) -> pb.PredictResponse:
    """One call on a channel of its own (scripts, tests); use Client for many."""
    with Client(target, token, **tls) as c:
        return c.stub.Predict(predict_request(adapter, sequences, probabilities, crop), metadata=c.metadata,
                              timeout=timeout)


def annotate(target: str, adapters: list[str], sequences: list[str], probabilities: bool = False,
             crop: bool = False, timeout: float = 120.0, token: str | None = None, **tls) -> pb.AnnotateResponse:
    with Client(target, token, **tls) as c:
        return c.stub.Annotate(annotate_request(adapters, sequences, probabilities, crop), metadata=c.metadata,
                               timeout=timeout)


def list_adapters(target: str, timeout: float = 30.0, token: str | None = None, **tls) -> pb.ListAdaptersResponse:
    with Client(target, token, **tls) as c:
        return c.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=c.metadata, timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
