"""The client's retry policy, against a real gRPC server on loopback that is briefly UNAVAILABLE."""
from concurrent import futures

import grpc
import pytest

from esm_adapters.v1 import adapters_pb2 as pb
from esm_adapters.v1 import adapters_pb2_grpc as pb_grpc
from serving.client import AdapterClient


class Flaky(pb_grpc.AdapterServiceServicer):
    def __init__(self, failures: int, code: grpc.StatusCode):
        self.failures, self.code, self.calls = failures, code, 0

    def Predict(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, "replica restarting")
        return pb.PredictResponse(adapter=request.adapter + "@1")


def serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_AdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_unavailable_is_retried_with_backoff():
    flaky = Flaky(failures=2, code=grpc.StatusCode.UNAVAILABLE)
    server, target = serve(flaky)
    try:
        with AdapterClient(target) as client:
            assert client.predict("ss", ["MKT"]).adapter == "ss@1"
        assert flaky.calls == 3
    finally:
        server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND])
def test_answers_are_not_retried(code):
    flaky = Flaky(failures=1, code=code)
    server, target = serve(flaky)
    try:
        with AdapterClient(target) as client, pytest.raises(grpc.RpcError) as error:
            client.predict("ss", ["MKT"])
        assert error.value.code() == code and flaky.calls == 1
    finally:
        server.stop(None)


def test_retries_stop_after_four_attempts():
    flaky = Flaky(failures=10, code=grpc.StatusCode.UNAVAILABLE)
    server, target = serve(flaky)
    try:
        with AdapterClient(target) as client, pytest.raises(grpc.RpcError) as error:
            client.predict("ss", ["MKT"])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 4
    finally:
        server.stop(None)
