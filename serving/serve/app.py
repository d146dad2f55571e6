"""The Ray Serve application: the gRPC AdapterService (and grpc.health.v1), with HTTP/JSON on the
same deployment (serving/serve/http.py), over the batched multi-LoRA engine.

Deploy locally with `python -m serving.serve`, or on a cluster with a Serve config whose
import_path is `serving.serve.app:build` (see serving/serve/serve_config.yaml). One replica holds one base
on its device; requests for different adapters share batches (the adapter travels in the request,
so one `@serve.batch` queue mixes them).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import grpc
from ray import serve

from esm_adapters.v1 import adapters_pb2 as pb
from modeling import bundle as bundles
from modeling import registry as store
from modeling.alphabet import SequenceError, normalise, within_limit
from modeling.base import load_base
from serving.engine import Engine, EngineConfig, InferenceError, Prediction
from serving.registry import AdapterNotFound, AdapterRefused, RegistryUnavailable
from serving.serve.auth import TokenCheck, Unauthenticated
from serving.serve.config import ServiceConfig
from serving.serve.http import HttpFront, api

log = logging.getLogger("serving.serve.app")

WARMUP = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAIGLNGELLKAGLIQGSE"


MAX_ADAPTERS_PER_CALL = 32  # Annotate: each adapter adds a Predict's worth of work


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, RequestError):
        return exc.code
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, AdapterNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, RegistryUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, AdapterRefused):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, InferenceError):
        return grpc.StatusCode.INTERNAL
    if isinstance(exc, (bundles.BundleError, SequenceError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


MAX_DETAILS = 1000
# Trailing metadata on every answered Predict: milliseconds in the model (the batch that held the
# request's sequences) and in the replica altogether (queue + model + our code).
MODEL_MS, SERVER_MS = "esm-model-ms", "esm-server-ms"


def metadata_of(grpc_context) -> tuple:
    return tuple(grpc_context.invocation_metadata()) if grpc_context is not None else ()


def fail(grpc_context, exc: Exception, empty):
    """Answer with exc's status and message (the server keeps serving)."""
    if grpc_context is not None:
        grpc_context.set_code(status_of(exc))
        grpc_context.set_details(str(exc)[:MAX_DETAILS])  # details travel as a header: keep it small
    return empty


@serve.deployment(name="AdapterServer", max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(api)
class AdapterServer(HttpFront):
    def __init__(self, args: dict):
        import torch

        from serving.serve.metrics import ServiceMetrics
        self.config = ServiceConfig.from_args(args)
        self.auth = TokenCheck(self.config.auth_token_file)
        device = self.config.device
        if device == "auto":  # int8 is a CPU mode (serving/engine/int8.py): it picks the CPU on a GPU node too
            device = "cuda" if torch.cuda.is_available() and self.config.quantize == "none" else "cpu"
        # Ray pins OMP threads to num_cpus (1 for 0.5). OpenMP's thread count is per calling
        # thread, so the model runs on one dedicated thread that sets it for itself.
        threads = (self.config.torch_threads or os.cpu_count()) if self.config.torch_threads is not None \
            else torch.get_num_threads()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model",
                                                initializer=torch.set_num_threads, initargs=(threads,))
        # Cold loads (disk -> verified, packed CPU tier) run here, beside the model thread.
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="adapter-load")
        self.base = load_base(self.config.base)
        self.engine = Engine(self.base, Path(self.config.registry), EngineConfig(
            r_max=self.config.r_max, max_device_adapters=self.config.max_device_adapters,
            max_cpu_bytes=self.config.max_cpu_bytes, max_batch_size=self.config.max_batch_size,
            max_batch_residues=self.config.max_batch_residues, targets=tuple(self.config.targets),
            merged=tuple(self.config.merged), merge_top_k=self.config.merge_top_k, device=device,
            dtype=self.config.dtype, quantize=self.config.quantize, packed=self.config.packed,
            fused_rotary=self.config.fused_rotary))
        self.metrics = ServiceMetrics()
        self.engine.batch_observers.append(self.metrics.on_batch)
        self.engine.event_observers.append(self.metrics.on_event)
        self.engine.registry.watch(self.config.registry_poll_s)
        self._batch.set_max_batch_size(self.config.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._model_thread.submit(self.engine.embed, [WARMUP]).result()  # ready once the base has run
        self._update_gauges()
        log.info("AdapterServer ready: base %s (%s) on %s, %d adapter versions in %s", self.base.name,
                 self.base.fingerprint[:12], device, len(self.engine.registry.entries()), self.config.registry)

    def _update_gauges(self) -> None:
        registry = self.engine.registry
        self.metrics.set_tiers(self.engine.tiers(), registry.problem is None, registry.health)

    def check_health(self) -> None:
        """Serve's health probe. An unreadable registry does not fail it (a restart cannot bring a
        volume back and would drop what is loaded): it shows in ListAdapters (registry_problem,
        registry_health) and in the esm_registry_* gauges instead."""
        self._update_gauges()

    # ---- batching --------------------------------------------------------------------------
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _batch(self, items: list[tuple]) -> list:
        started = time.perf_counter()
        for *_, enqueued in items:
            self.metrics.latency.observe(started - enqueued, tags={"stage": "queue"})
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._model_thread, self.engine.predict, [item[:3] for item in items])
        model_seconds = time.perf_counter() - started
        self.metrics.latency.observe(model_seconds, tags={"stage": "model"})
        self._update_gauges()
        return [(result, model_seconds) for result in results]

    # ---- RPCs ------------------------------------------------------------------------------
    async def _answer(self, rpc: str, grpc_context, empty, work, counted: bool = True):
        """The response `work()` makes (it returns (response, adapter label or None)), under auth
        and the request deadline; any failure becomes its defined status on this call alone (the
        server keeps serving). `counted`: in esm_requests_total and the latency histogram."""
        started = time.perf_counter()
        label = "_" + rpc.lower() if rpc != "Predict" else self.metrics.adapter_label(None, False)
        try:
            self.auth.check(metadata_of(grpc_context))
            response, known = await asyncio.wait_for(work(), self.config.request_timeout_s)
            label = known or label
            code = grpc.StatusCode.OK
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                exc = RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc} not answered within "
                                   f"{self.config.request_timeout_s:g} s (request_timeout_s)")
            code = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", rpc, exc, exc_info=not isinstance(exc, InferenceError))
            response = fail(grpc_context, exc, empty)
        if counted:
            self.metrics.requests.inc(tags={"adapter": label, "code": code.name})
            self.metrics.latency.observe(time.perf_counter() - started, tags={"stage": "total"})
        return response

    async def _load(self, ref: str):
        """The adapter version `ref` names, verified and in the CPU tier: read from disk on a
        loader thread, so a cold load never holds up the batch running on the model thread."""
        self._adapter(ref)  # a bad name, a missing or refused version: answered without a thread
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self.engine.load, ref)

    async def _run(self, pairs: list[tuple], probabilities: bool) -> tuple[list[Prediction], float]:
        """(adapter, sequence) pairs through the shared batcher; raises the first error."""
        now = time.perf_counter()
        outcomes = await asyncio.gather(*[self._batch((adapter, seq, probabilities, now)) for adapter, seq in pairs])
        for result, _ in outcomes:
            if isinstance(result, Exception):
                raise result
        return [result for result, _ in outcomes], max(seconds for _, seconds in outcomes)

    async def Predict(self, request: pb.PredictRequest, grpc_context=None) -> pb.PredictResponse:
        async def work():
            started = time.perf_counter()
            sequences, cropped = self._sequences(request, request.sequences)
            self.engine.prefetch(request.adapter)  # a cold adapter's slot fills while the batch ahead runs
            adapter = await self._load(request.adapter)
            results, model_seconds = await self._run([(adapter, seq) for seq in sequences],
                                                     request.residue_probabilities)
            if grpc_context is not None:  # like HTTP's Server-Timing: where the time went
                grpc_context.set_trailing_metadata([
                    (MODEL_MS, f"{1000 * model_seconds:.2f}"),
                    (SERVER_MS, f"{1000 * (time.perf_counter() - started):.2f}")])
            return self._response(adapter, results, cropped), self.metrics.adapter_label(adapter.ref.split("@")[0], True)
        return await self._answer("Predict", grpc_context, pb.PredictResponse(), work)

    async def Annotate(self, request: pb.AnnotateRequest, grpc_context=None) -> pb.AnnotateResponse:
        """Every named adapter over the same sequences; the pairs go through the same batcher as
        Predict's, where head-only adapters asked for one sequence share its encoder pass."""
        async def work():
            if not request.adapters:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no adapters in the request")
            if len(request.adapters) > MAX_ADAPTERS_PER_CALL:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(request.adapters)} adapters; the "
                                   f"limit per call is {MAX_ADAPTERS_PER_CALL}")
            if len(set(request.adapters)) != len(request.adapters):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "an adapter is named twice")
            for ref in request.adapters:
                self._adapter(ref)
            # each adapter runs every sequence: the work is residues x adapters
            sequences, cropped = self._sequences(request, request.sequences, times=len(request.adapters))
            for ref in request.adapters:
                self.engine.prefetch(ref)
            adapters = [await self._load(ref) for ref in request.adapters]
            results, _ = await self._run([(adapter, seq) for adapter in adapters for seq in sequences],
                                         request.residue_probabilities)
            response = pb.AnnotateResponse()
            for i, adapter in enumerate(adapters):
                part = results[i * len(sequences):(i + 1) * len(sequences)]
                response.results.append(self._response(adapter, part, cropped))
            return response, None
        return await self._answer("Annotate", grpc_context, pb.AnnotateResponse(), work)

    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        async def work():
            sequences, _ = self._sequences(request, request.sequences)
            dim = self.base.encoder.embed_dim
            if request.per_residue and sum(map(len, sequences)) * dim > self.config.max_embed_values:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{sum(map(len, sequences))} residues x {dim} dimensions per residue is more "
                                   f"than max_embed_values={self.config.max_embed_values}; ask for fewer "
                                   f"sequences or mean embeddings only")
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            reps = await loop.run_in_executor(self._model_thread, self.engine.embed, sequences)
            self.metrics.latency.observe(time.perf_counter() - started, tags={"stage": "embed"})
            response = pb.EmbedResponse(dim=dim)
            for rep in reps:
                e = response.embeddings.add(mean=rep.mean(0).tolist(), length=rep.shape[0])
                if request.per_residue:
                    e.residues.extend(rep.reshape(-1).tolist())  # 3x faster into protobuf than numpy items
            return response, None
        return await self._answer("Embed", grpc_context, pb.EmbedResponse(), work)

    def _adapter(self, ref: str):
        try:
            store.parse_ref(ref)
        except bundles.BundleError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return self.engine.registry.resolve(ref)  # NOT_FOUND / FAILED_PRECONDITION

    def _sequences(self, request, raw_sequences, times: int = 1) -> tuple[list[str], list[bool]]:
        """The request's sequences, checked and normalised (cropped where asked); `times`: how many
        times each is computed (Annotate: once per adapter), counted against the residue limit."""
        if not raw_sequences:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no sequences in the request")
        if len(raw_sequences) > self.config.max_sequences_per_request:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{len(raw_sequences)} sequences; the limit per request is "
                               f"{self.config.max_sequences_per_request}")
        total = sum(len(s) for s in raw_sequences) * times
        if total > self.config.max_residues_per_request:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{total} residues{f' ({times} adapters x sequences)' if times > 1 else ''}; "
                               f"the limit per request is {self.config.max_residues_per_request}")
        crop = getattr(request, "crop", False)
        sequences, cropped = [], []
        for i, raw in enumerate(raw_sequences):
            try:
                seq, was_cropped = within_limit(normalise(raw, f"sequence {i}"), f"sequence {i}", crop,
                                                "set crop=true to crop" if hasattr(request, "crop") else "")
            except SequenceError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            cropped.append(was_cropped)
            sequences.append(seq)
        return sequences, cropped

    @staticmethod
    def _response(adapter, results: list[Prediction], cropped: list[bool]) -> pb.PredictResponse:
        """The answer, described by the very version that computed it."""
        manifest = adapter.manifest
        response = pb.PredictResponse(adapter=adapter.ref, task=manifest["task"], kind=manifest["output"]["kind"],
                                      label_names=manifest["output"]["labels"])
        for result, was_cropped in zip(results, cropped):
            p = response.predictions.add(cropped=was_cropped)
            if result.labels is not None:
                p.labels = result.labels
                for row in result.residue_probabilities or []:
                    p.residue_probabilities.add(values=row)
            if result.label is not None:
                p.label = result.label
                p.probabilities.update(result.probabilities)
            if result.value is not None:
                p.value = result.value
        return response

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check, as a kubelet sends it (no metadata, no token): SERVING once
        this replica is warm (its constructor ran the base), for the service "" and AdapterService.
        A registry problem never fails it: resident adapters keep serving."""
        from grpc_health.v1 import health_pb2
        if request.service not in ("", "esm_adapters.v1.AdapterService", "grpc.health.v1.Health"):
            return fail(grpc_context, RequestError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"),
                        health_pb2.HealthCheckResponse())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, grpc_context=None) -> pb.ListAdaptersResponse:
        async def work():
            registry = self.engine.registry
            health = registry.health
            response = pb.ListAdaptersResponse(
                base_fingerprint=self.base.fingerprint, base_name=self.base.name,
                registry_problem=registry.problem or "",
                registry_health=pb.RegistryHealth(last_scan_time=health.last_ok, scans=health.scans,
                                                  scan_errors=health.errors, last_error=health.last_error or "",
                                                  skipped=health.skipped))
            for entry in registry.entries():
                try:
                    response.adapters.append(adapter_info(entry.summary()))
                except Exception as exc:  # one entry the listing cannot show must not fail the call
                    response.adapters.add(name=entry.name, version=entry.version, status="refused",
                                          reason=f"cannot be listed: {type(exc).__name__}")
            return response, None
        # not counted: health checks and start-up waits call it all the time
        return await self._answer("ListAdapters", grpc_context, pb.ListAdaptersResponse(), work, counted=False)


def adapter_info(s: dict) -> pb.AdapterInfo:
    info = pb.AdapterInfo(name=s["name"], version=s["version"], task=s["task"] or "", rank=s["rank"] or 0,
                          status=s["status"], reason=s["reason"] or "", mode=s["mode"] or "",
                          base_fingerprint=s["base_fingerprint"] or "", kind=s["kind"] or "", labels=s["labels"])
    for split, values in s["metrics"].items():
        for key, value in values.items():
            info.metrics[f"{split}.{key}"] = float(value)
    return info


def build(args: dict) -> serve.Application:
    """Application builder for Serve configs: `import_path: serving.serve.app:build`, `args: {...}`."""
    config = ServiceConfig.from_args(dict(args))
    return AdapterServer.bind(asdict(config))
