"""gRPC service benchmark: a locally started service over loopback. Prints one JSON object.

  python -m bench.grpc [--requests 192] [--base ...]

Single-sequence Predict requests (real FLIP sequences, 50-500 residues, fixed seed) at
concurrency 1, 8 and 64, with 1 and with 64 adapters in the traffic; throughput, p50/p95/p99
latency and errors. The engine's own figures for the same traffic, measured in this run, give the
ratios: `c64_mixed64_over_engine` (service / in-process engine throughput, the engine on every
core) and `p50_c1_over_engine_ms` (service p50 at concurrency 1 minus the in-process engine's p50
for the same requests on as many torch threads as a replica has, timed while the service runs
idle, for 1 and for 64 adapters) and
`p50_c1_over_own_model_ms` (per request: client latency minus the model time the replica reports
for that same request in the `esm-model-ms` trailing metadata; the median).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from bench.engine import publish_random_adapters, rates, sequences
from esm_adapters.v1 import adapters_pb2 as pb
from modeling.base import load_base
from serving import client
from serving import serve as service
from serving.serve.app import MODEL_MS
from serving.serve.config import ServiceConfig
from serving.engine import Engine, EngineConfig
from serving.serve.ports import free_port


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class InFlight:
    """Keeps at most `concurrency` Predict calls in flight on one channel, sent asynchronously from
    one thread (so the load generator takes little of the CPU it shares with the service).
    records: (finished at, seconds, error code or None) per call."""

    def __init__(self, target: str, concurrency: int):
        self.caller = client.AdapterClient(target)
        self.caller.adapters()  # connected before the first timed call
        self.concurrency, self.window = concurrency, threading.Semaphore(concurrency)
        self.records: list[tuple[float, float, str | None]] = []

    def send(self, adapter: str, sequence: str) -> None:
        self.window.acquire()
        sent = time.perf_counter()
        future = self.caller.stub.Predict.future(pb.PredictRequest(adapter=adapter, sequences=[sequence]),
                                                 metadata=self.caller.metadata, timeout=300)
        future.add_done_callback(lambda f: self._done(f, sent))

    def _done(self, future, sent: float) -> None:
        now = time.perf_counter()
        error = future.exception().code().name if future.exception() is not None else None
        self.records.append((now, now - sent, error))
        self.window.release()

    def close(self) -> None:
        """Wait for the calls still in flight, then close the channel."""
        for _ in range(self.concurrency):
            self.window.acquire()
        self.caller.close()


def summary(requests: list[tuple[str, str]], wall: float, latencies: list[float]) -> dict:
    """Throughput over `wall` seconds and latency percentiles (ms) of the calls."""
    return {**rates(requests, wall), **{f"p{q}_ms": round(percentile(latencies, q) * 1000, 1) for q in (50, 95, 99)}}


def load(target: str, requests: list[tuple[str, str]], concurrency: int) -> dict:
    flight = InFlight(target, concurrency)
    start = time.perf_counter()
    for adapter, sequence in requests:
        flight.send(adapter, sequence)
    flight.close()
    latencies = [seconds for _, seconds, _ in flight.records]
    return {**summary(requests, time.perf_counter() - start, latencies),
            "errors": sum(error is not None for *_, error in flight.records)}


def single(engine: Engine, threads: int, target: str, requests: list[tuple[str, str]]) -> dict:
    """Concurrency 1: every request through the service, then the same requests through the
    in-process engine, on `threads` torch threads as a replica runs it, while the service idles
    (interleaving them would leave this process's OpenMP threads spinning during the service
    calls). Two overheads: client latency minus the model time the replica reports for that same
    request, and the difference of the medians."""
    caller = client.AdapterClient(target)
    caller.list_adapters()
    served, beyond_model, errors = [], [], 0
    for adapter, sequence in requests:
        sent = time.perf_counter()
        try:
            _, call = caller.stub.Predict.with_call(pb.PredictRequest(adapter=adapter, sequences=[sequence]),
                                                    metadata=caller.metadata, timeout=300)
            beyond_model.append((time.perf_counter() - sent) * 1000 - float(dict(call.trailing_metadata())[MODEL_MS]))
        except grpc.RpcError:
            errors += 1
        served.append(time.perf_counter() - sent)
    caller.close()
    direct = []
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as model_thread:
        for adapter, sequence in requests:
            began = time.perf_counter()
            model_thread.submit(engine.predict, [(adapter, sequence)]).result()
            direct.append(time.perf_counter() - began)
    p50, engine_p50 = percentile(served, 50) * 1000, percentile(direct, 50) * 1000
    return {**summary(requests, sum(served), served), "errors": errors,
            "engine_p50_ms": round(engine_p50, 1), "p50_over_engine_ms": round(p50 - engine_p50, 1),
            "p50_over_own_model_ms": round(percentile(beyond_model, 50), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--base")
    parser.add_argument("--batch-wait", type=float, default=ServiceConfig.batch_wait_timeout_s)
    # CPU trade-off: one single-threaded replica per core (the default: highest throughput under
    # load, no OpenMP barrier waits on threads preempted by the proxy or the replica's own event
    # loop) or `--replicas 1 --torch-threads 0`, one replica on every core (lowest latency when idle).
    parser.add_argument("--replicas", type=int, default=os.cpu_count())
    parser.add_argument("--torch-threads", type=int, default=1, help="per replica; 0 = every core")
    args = parser.parse_args()
    threads = args.torch_threads or os.cpu_count()
    base = load_base(args.base)
    seqs = sequences(args.requests, seed=0)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, device cpu", "base": base.name,
                 "requests_per_level": args.requests, "batch_wait_timeout_s": args.batch_wait,
                 "replicas": args.replicas, "torch_threads_per_replica": threads}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "adapters"
        names = publish_random_adapters(base, registry, 64, 16)
        traffic = {1: [(names[0], s) for s in seqs], 64: [(names[i % 64], s) for i, s in enumerate(seqs)]}

        # The reference: the in-process engine on every core, as bench.engine runs it; the better
        # of two passes, so machine noise cannot flatter the service.
        engine = Engine(load_base(args.base), registry, EngineConfig(r_max=16, max_batch_size=64))
        engine.predict(traffic[64][:64])  # warm and load every adapter
        passes = []
        for _ in range(2):
            start = time.perf_counter()
            for i in range(0, len(seqs), 64):
                engine.predict(traffic[64][i:i + 64])
            passes.append(len(seqs) / (time.perf_counter() - start))
        out["engine"] = {"mixed64_sequences_per_s": round(max(passes), 2), "torch_threads": torch.get_num_threads()}

        grpc_port, metrics_port = free_port(), free_port()
        service.start({"registry": str(registry), "base": args.base, "max_batch_size": 64,
                       "batch_wait_timeout_s": args.batch_wait, "torch_threads": args.torch_threads},
                      grpc_port, metrics_port, num_replicas=args.replicas, num_cpus=0.5, ray_cpus=2,
                      http_port=free_port())
        target = f"127.0.0.1:{grpc_port}"
        try:
            # Warm: every adapter loaded on every replica (the router picks replicas at random, so
            # with several, 12 short calls per adapter leave any one unloaded with chance 2**-12).
            rounds = 1 if args.replicas == 1 else 12
            load(target, [(name, seqs[0][:32]) for name in names] * rounds, 64)
            for adapters in (1, 64):
                out[f"c1_adapters{adapters}"] = single(engine, threads, target, traffic[adapters][:16] * 3)
                for concurrency in (8, 64):
                    out[f"c{concurrency}_adapters{adapters}"] = load(target, traffic[adapters], concurrency)
        finally:
            service.stop()
    out["errors"] = sum(v["errors"] for k, v in out.items() if k.startswith("c") and isinstance(v, dict))
    out["c64_mixed64_over_engine"] = round(out["c64_adapters64"]["sequences_per_s"] / out["engine"]["mixed64_sequences_per_s"], 3)
    out["p50_c1_over_engine_ms"] = {f"adapters{a}": out[f"c1_adapters{a}"]["p50_over_engine_ms"] for a in (1, 64)}
    out["p50_c1_over_own_model_ms"] = {f"adapters{a}": out[f"c1_adapters{a}"]["p50_over_own_model_ms"]
                                       for a in (1, 64)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
