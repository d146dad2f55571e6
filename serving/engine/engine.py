"""The serving engine: one shared ESM-2, many adapters, mixed-adapter batches.

Tiers (vLLM/S-LoRA style): device slots (LRU, reference-counted: a slot used by a queued or
running batch is never evicted; serving/engine/slots.py) <- CPU tier (verified, packed adapters,
bounded by bytes; cpu_tier.py) <- the registry on disk. Every tier, slot and merged copy is keyed by
the version's key (NAME@VERSION and the manifest's sha256), so bytes that changed under a ref are
another adapter, never the old one. Hot adapters can be served from a merged copy of the encoder
(merged.py); the shared base is never modified in place.

Failure isolation: a load that fails, for any reason, refuses that adapter alone (listed with the
reason, not retried until its files change) and fails only the requests that named it; an error
while a batch runs is narrowed down to the adapters it concerns, and the rest of the batch is
answered.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from modeling import bundle as bundles
from modeling import registry as store
from modeling.alphabet import normalise, tokenize, within_limit
from modeling.base import Base
from modeling.encoder import Packing
from modeling.heads import residues
from serving.engine.adapters import LoadedAdapter, build_adapter, refusal_kind
from serving.engine.config import EngineConfig, torch_dtype
from serving.engine.cpu_tier import CpuTier
from serving.engine.decode import Prediction, decode
from serving.engine.graphs import EncoderGraphs, padded_batch
from serving.engine.head_batch import run_heads
from serving.engine.config import check_quantize
from serving.engine.int8 import quantize_linears
from serving.engine.merged import merged_encoder
from serving.engine.multilora import SlotContext, wrap_targets
from serving.engine.slots import NoFreeSlot, SlotTable
from serving.engine.transfer import to_device
from serving.registry import AdapterRefused, Registry, RegistryUnavailable

class InferenceError(RuntimeError):
    """A batch failed while computing these requests' answers (the rest of the batch was answered)."""


@dataclass
class _Item:
    index: int
    sequence: str
    adapter: LoadedAdapter
    slot: int = 0
    probabilities: bool = False


@dataclass
class BatchStats:
    size: int
    distinct_adapters: int
    padding_ratio: float  # padded positions / all positions
    seconds: float
    encoded: int = 0  # encoder rows: fewer than `size` where adapters shared a sequence's pass


class Engine:
    def __init__(self, base: Base, registry: Registry | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.base = base
        self.device = torch.device(self.config.device)
        self.dtype = torch_dtype(self.config.dtype)
        check_quantize(self.config.quantize, self.device.type, self.config.dtype)
        if self.config.packed is None:
            self.config.packed = self.device.type == "cpu"
        if self.config.max_batch_residues is None:
            cpu = 2048 if self.config.quantize == "int8" or self.config.packed else 512
            self.config.max_batch_residues = cpu if self.device.type == "cpu" else 65536
        self.fingerprint = base.fingerprint
        if self.device.type == "cuda" and self.dtype == torch.float32:
            # float32 means float32: torch's default runs convolutions (the per-residue heads) in TF32,
            # 8.5e-5 off the CPU's probabilities at 650M against 3e-7 without (bench/results, H200).
            torch.backends.cudnn.allow_tf32 = False
        self.encoder = base.encoder.to(self.device, self.dtype).eval()
        self.context = SlotContext()
        self.layers, self.slot_store = wrap_targets(self.encoder, self.config.targets,
                                                    self.config.max_device_adapters + 1, self.config.r_max, self.context)
        if self.config.quantize == "int8":
            quantize_linears(self.encoder)  # the wrapped originals too; the LoRA slots stay float32
        if self.config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device.type}")
        self.graphs = EncoderGraphs(self.context, self.slot_store.gather) if self.config.cuda_graphs else None
        if self.config.cuda_graphs and (self.config.packed or self.config.fused_rotary):
            raise ValueError("cuda_graphs replays padded shapes: not with packed or fused_rotary")
        self.encoder.fuse_rotary(self.config.fused_rotary)
        self.rule = store.ServeRule(base.fingerprint, base.encoder.embed_dim, self.config.limits)
        if isinstance(registry, (Path, str)):
            registry = Registry(Path(registry), self.rule)
        self.registry = registry
        self.registry.on_change(self._retire)
        self.slots = SlotTable(self.config.max_device_adapters, on_free=self._slot_freed)
        # On a CPU device a slot is host memory too: a slot-resident adapter's packed LoRA is a view
        # of its slot (one copy, not two), copied out when the slot is given up (_slot_freed).
        self._viewed: dict[str, LoadedAdapter] = {}
        self.cpu_cache = CpuTier(self.config.max_cpu_bytes, in_use=lambda key: key in self.slots.refs)
        self.merged: OrderedDict[str, nn.Module] = OrderedDict()  # key -> merged copy
        self.onnx: dict[str, object] = {}  # key -> OnnxModel (merged export run by onnxruntime)
        self.traffic: Counter[str] = Counter()
        self.stats = Counter()
        self.batch_observers: list = []  # called with BatchStats after every forward pass
        self.event_observers: list = []  # called with (event, detail, seconds): load/eviction/refusal
        self._lock = threading.RLock()
        self._forward = threading.Lock()  # one forward at a time: the slot context is shared
        self._loading: dict[str, Future] = {}  # key -> the load in progress (one read per adapter)
        if self.config.prefetch is None:
            self.config.prefetch = self.device.type == "cuda"
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch")
        # On a GPU, slot copies run on their own stream so they overlap the forward on the default
        # stream; a batch waits (on the GPU, not the host) for the copies of the slots it reads.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._slot_ready: dict[int, torch.cuda.Event] = {}

    # ---- tiers -------------------------------------------------------------------------------
    def load(self, ref: str) -> LoadedAdapter:
        """Resolve NAME[@VERSION] and return the verified adapter version (CPU tier, LRU)."""
        entry = self.registry.resolve(ref)
        with self._lock:
            adapter = self.cpu_cache.get(entry.key)
            if adapter is not None:
                return adapter
            # A loader fills the CPU tier before it leaves _loading: missing from both, nobody has it.
            pending = self._loading.get(entry.key)
            owner = pending is None
            if owner:
                pending = self._loading[entry.key] = Future()
        if not owner:
            return pending.result()  # another thread (a prefetch) is reading it: share its result
        try:
            adapter = self._load_entry(entry)
            pending.set_result(adapter)
            return adapter
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(entry.key, None)

    def prefetch(self, ref: str) -> Future | None:
        """Start making an adapter servable in the background (disk -> CPU tier -> a free device
        slot), so that the load overlaps the batch running now instead of delaying the next one.
        Never evicts; errors are left for predict() to report on the request itself."""
        if not self.config.prefetch:
            return None
        try:
            entry = self.registry.resolve(ref)
        except Exception:
            return None
        with self._lock:
            if entry.key in self.slots.slot_of or entry.key in self._loading:
                return None
        return self._prefetcher.submit(self._stage, entry.ref)

    def _stage(self, ref: str) -> None:
        try:
            adapter = self.load(ref)
            if adapter.has_lora:
                with self._lock:
                    self.slots.acquire(adapter.key, lambda s: self._to_slot(adapter, s), evict=False)
                    self.slots.release(adapter.key)
        except Exception:
            pass  # predict() loads (or refuses) it on its own path

    def _load_entry(self, entry) -> LoadedAdapter:
        start = time.perf_counter()
        try:
            stamps = store.file_stamps(entry.folder)
            # Checksums and safetensors only; the adapter is packed while its checksums are computed.
            adapter = bundles.read_bundle(entry.folder, lambda bundle: build_adapter(
                entry.ref, entry.key, bundle, self.rule, self.slot_store, self.device, self.dtype), entry.identity)
            if store.file_stamps(entry.folder) != stamps:
                raise bundles.BundleError("its files changed while they were read")
        except Exception as exc:  # of any type: this adapter is refused, nothing else is touched
            if not self.registry.readable():  # the volume went away, the bundle did not go bad
                raise RegistryUnavailable(f"adapter {entry.ref}: registry unreadable; retry later") from exc
            reason = str(exc) if isinstance(exc, bundles.BundleError) else f"{type(exc).__name__}: {exc}"
            self.registry.mark_refused(entry, reason)
            self.stats["refusals"] += 1
            self._event("refusal", refusal_kind(reason), 0.0)
            raise AdapterRefused(f"adapter {entry.ref} refused: {reason}") from exc
        self.registry.seal(entry, stamps)
        self._event("load", entry.ref, time.perf_counter() - start)
        with self._lock:
            self.cpu_cache.put(entry.key, adapter)
            self.stats["loads"] += 1
        return adapter

    def _retire(self, keys: set[str]) -> None:
        """Versions that are gone, edited or refused: drop everything held for them (a slot that a
        batch holds is freed when the batch releases it)."""
        with self._lock:
            for key in keys:
                self.cpu_cache.pop(key)
                self.merged.pop(key, None)
                self.onnx.pop(key, None)
                self.traffic.pop(key, None)
                self.slots.drop(key)

    def _event(self, event: str, detail: str, seconds: float) -> None:
        for observer in self.event_observers:
            observer(event, detail, seconds)

    def tiers(self) -> dict[str, int]:
        """Adapters resident per tier (for gauges)."""
        with self._lock:
            return {"device": len(self.slots.slot_of), "cpu": len(self.cpu_cache),
                    "merged": len(self.merged), "onnx": len(self.onnx),
                    "registry": len(self.registry)}

    def _to_slot(self, adapter: LoadedAdapter, slot: int) -> None:
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext()
        with stream:
            self.slot_store.load(slot, adapter.lora)
        for path in adapter.lora.bias_paths:
            self.layers[path].use_bias = True
        if self._copy_stream is not None:
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
            self._slot_ready[slot] = ready
        if self.device.type == "cpu":
            adapter.lora = replace(adapter.lora, data=self.slot_store.slab[slot, :adapter.lora.data.numel()])
            self._viewed[adapter.key] = adapter

    def _slot_freed(self, key: str, slot: int) -> None:
        """A slot leaves `key`: an adapter whose packed LoRA is a view of it gets its own copy back
        first (it may still be queued, or in the CPU tier)."""
        adapter = self._viewed.pop(key, None)
        if adapter is not None:
            adapter.lora = replace(adapter.lora, data=adapter.lora.data.clone())

    # ---- merged mode -------------------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        """The shared base's own weights (the wrapped Linears' originals, no LoRA buffers)."""
        return {k.replace(".base.", "."): v for k, v in self.encoder.state_dict().items() if ".lora_" not in k}

    def merged_encoder(self, adapter: LoadedAdapter) -> nn.Module:
        """A dedicated copy with the adapter folded in; the shared base is untouched."""
        return merged_encoder(self.base.encoder.shape, self.base_state(), self.slot_store, adapter.lora,
                              self.device, self.dtype, self.config.quantize == "int8")

    def merge(self, ref: str) -> None:
        """Serve a hot adapter from its own merged copy from now on."""
        adapter = self.load(ref)
        merged = self.merged_encoder(adapter)
        with self._lock:
            self.merged[adapter.key] = merged

    def _update_hot(self) -> None:
        """Merged copies for the pinned names and the `merge_top_k` busiest versions; no others."""
        wanted = set()
        for name in self.config.merged:
            try:
                wanted.add(self.registry.resolve(name).key)
            except Exception:
                pass
        wanted |= {key for key, _ in self.traffic.most_common(self.config.merge_top_k)
                   if self.registry.is_current(key)}
        for key in set(self.merged) - wanted:
            del self.merged[key]
        for key in wanted - set(self.merged):
            try:
                self.merge(key.partition("#")[0])
            except Exception:
                pass  # its requests report the error on the shared path

    def add_onnx(self, path: Path) -> str:
        """Serve an adapter from its ONNX export (see serving.batch.export_onnx); returns its ref."""
        from serving.engine.onnx_runner import OnnxModel

        model = OnnxModel(Path(path))
        if model.base_fingerprint != self.fingerprint:
            raise AdapterRefused(f"{path}: exported from another base ({model.base_fingerprint[:12]})")
        adapter = self.load(model.adapter)  # must still be in the registry and valid
        with self._lock:
            self.onnx[adapter.key] = model
        return adapter.ref

    # ---- inference ---------------------------------------------------------------------------
    def predict(self, requests: list[tuple]) -> list[Prediction | Exception]:
        """requests: (adapter, sequence[, want residue probabilities]), the adapter a ref or a
        LoadedAdapter already loaded. Each result is a Prediction or the error for that request
        alone (unknown/refused adapter, bad name, invalid sequence, a failure while computing it);
        the rest of the batch is unaffected."""
        results: list[Prediction | Exception | None] = [None] * len(requests)
        items: list[_Item] = []
        for i, (ref, sequence, *flags) in enumerate(requests):
            try:
                seq, _ = within_limit(normalise(sequence, f"sequence {i}"), f"sequence {i}")
                want = bool(flags[0]) if flags else self.config.return_residue_probabilities
                adapter = ref if isinstance(ref, LoadedAdapter) else self.load(ref)
                items.append(_Item(i, seq, adapter, probabilities=want))
            except Exception as exc:
                results[i] = exc
        with self._lock:
            for item in items:
                self.traffic[item.adapter.key] += 1
            if self.config.merged or self.config.merge_top_k:
                self._update_hot()
            dedicated: dict[str, list[_Item]] = {}  # served by an ONNX or merged model of their own
            shared: list[_Item] = []
            for item in items:
                key = item.adapter.key
                (dedicated.setdefault(key, []) if key in self.onnx or key in self.merged else shared).append(item)
            runs = {key: (self._run_onnx, self.onnx[key]) if key in self.onnx else (self._run, self.merged[key])
                    for key in dedicated}
        for key, group in dedicated.items():
            run, model = runs[key]
            for chunk in self._chunks(group):
                self._isolated(chunk, lambda part: run(part, model, results), results)
        self._run_shared(shared, results)
        return results  # type: ignore[return-value]

    def _isolated(self, chunk: list[_Item], run, results: list) -> None:
        """run(chunk); if it raises, run each adapter's part alone, so that an error reaches only
        the requests of the adapter it concerns and the rest of the chunk is answered."""
        try:
            run(chunk)
        except Exception as exc:
            groups: dict[str, list[_Item]] = {}
            for item in chunk:
                groups.setdefault(item.adapter.key, []).append(item)
            if len(groups) > 1:
                for group in groups.values():
                    self._isolated(group, run, results)
                return
            failure = InferenceError(f"adapter {chunk[0].adapter.ref}: the batch failed ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})")
            self.stats["failed_batches"] += 1
            for item in chunk:
                results[item.index] = failure

    def _run_shared(self, items: list[_Item], results: list) -> None:
        """Run batches through the shared encoder, holding a device slot for every adapter in the
        batch while it runs (reference counts keep those slots from being evicted)."""
        pending = list(items)
        while pending:
            chunk = next(self._chunks(pending))
            acquired: list[str] = []
            ready: list[_Item] = []
            try:
                with self._lock:
                    for item in chunk:
                        if item.adapter.has_lora:
                            try:
                                item.slot = self._acquire(item.adapter)
                            except NoFreeSlot:
                                break  # run what has slots; the rest waits for the next round
                            except Exception as exc:  # a slot copy failed: this adapter's requests only
                                results[item.index] = InferenceError(f"adapter {item.adapter.ref}: {exc}")
                                continue
                            acquired.append(item.adapter.key)
                        ready.append(item)
                if ready:
                    self._isolated(ready, lambda part: self._run(part, self.encoder, results, slots=True), results)
                elif not any(results[item.index] is not None for item in chunk):
                    # every slot held by other running batches: fail this one, never evict in use
                    results[chunk[0].index] = NoFreeSlot("no free adapter slot; retry")
                    ready = chunk[:1]
            finally:
                with self._lock:
                    for key in acquired:
                        self.slots.release(key)
                        if not self.registry.is_current(key):  # gone meanwhile: free its slot now
                            self.slots.drop(key)
            done = {id(item) for item in ready} | {id(item) for item in chunk if results[item.index] is not None}
            pending = [item for item in pending if id(item) not in done]

    def _acquire(self, adapter: LoadedAdapter) -> int:
        evictions = self.slots.evictions
        slot = self.slots.acquire(adapter.key, lambda s: self._to_slot(adapter, s))
        if self.slots.evictions > evictions:
            self._event("eviction", "device", 0.0)
        return slot

    def _chunks(self, items: list[_Item]):
        """Length-sorted batches bounded by max_batch_size (items) and max_batch_residues (padded
        encoder rows: head-only adapters asked for the same sequence share a row, see _run)."""
        batch: list[_Item] = []
        rows: set[tuple] = set()
        tokens = 0  # real tokens of the encoder rows so far (what a packed pass computes)
        for item in sorted(items, key=lambda it: (len(it.sequence), it.sequence)):
            row = (item.sequence, item.adapter.key if item.adapter.has_lora else None)
            new_row, width = row not in rows, len(item.sequence) + 2
            size = tokens + new_row * width if self.config.packed else (len(rows) + new_row) * width
            if batch and (len(batch) >= self.config.max_batch_size or size > self.config.max_batch_residues):
                yield batch
                batch, rows, tokens, new_row = [], set(), 0, True
            batch.append(item)
            tokens += new_row * width
            rows.add(row)
        if batch:
            yield batch

    @torch.no_grad()
    def _run(self, items: list[_Item], encoder: nn.Module, results: list, slots: bool = False) -> None:
        for chunk in self._chunks(items):
            start = time.perf_counter()
            # One encoder row per distinct (sequence, slot): head-only adapters (slot 0) asked for the
            # same sequence share one pass, and so does one adapter asked twice.
            row_of: dict[tuple[str, int], int] = {}
            rows_of_items = [row_of.setdefault((it.sequence, it.slot), len(row_of)) for it in chunk]
            encoded = list(row_of)
            sequences, slot_index = [sequence for sequence, _ in encoded], [slot for _, slot in encoded]
            if self.graphs is not None:  # a graph per bucket: padding rows and positions, as graphs.py says
                tokens, slot_index = padded_batch(sequences, slot_index)
            else:
                tokens = tokenize(sequences)
            tokens = to_device(tokens, self.device)
            with self._forward:
                if slots and self._copy_stream is not None:
                    compute = torch.cuda.current_stream(self.device)
                    for slot in {slot for _, slot in encoded}:
                        if slot in self._slot_ready:
                            compute.wait_event(self._slot_ready[slot])
                index = to_device(torch.tensor(slot_index), self.device) if slots else None
                if self.graphs is not None:
                    variant = tuple(layer.use_bias for layer in self.layers.values())
                    reps = self.graphs.run(encoder, tokens, index, variant)[:len(encoded)]
                else:
                    packing = Packing(tokens) if self.config.packed else None
                    reps = self.context.run(encoder, tokens, self.slot_store.gather(index) if slots else None, packing)
            lengths = [len(sequence) for sequence in sequences]
            reps, mask = residues(reps, to_device(torch.tensor(lengths), self.device), max(lengths))
            self.stats["batches"] += 1
            self.stats["sequences"] += len(chunk)
            self.stats["encoded"] += len(encoded)
            # what the linears computed: every position of the padded batch, or its real tokens only
            real = sum(lengths) + 2 * len(lengths)
            self.stats["tokens"] += real
            self.stats["positions"] += real if self.config.packed else tokens.numel()
            groups: dict[str, list[int]] = {}
            for k, it in enumerate(chunk):
                groups.setdefault(it.adapter.key, []).append(k)
            # Heads of one shape run stacked, whatever the number of adapters (serving/engine/head_batch.py).
            outputs = run_heads([chunk[members[0]].adapter.head for members in groups.values()],
                                [[rows_of_items[k] for k in members] for members in groups.values()], reps, mask)
            # One copy to the host for the whole batch: a copy per group waits on the device each time
            # (64 adapters in a batch: 64 round trips).
            host = torch.cat([out.reshape(-1) for out in outputs]).float().cpu().split([out.numel() for out in outputs])
            answers = {}
            for members, out, flat in zip(groups.values(), outputs, host):
                group = [chunk[k] for k in members]
                answers.update(zip(members, self._decode(group, flat.view(out.shape))))
            for k, prediction in answers.items():  # written once every group decoded: all or nothing
                results[chunk[k].index] = prediction
            self._observe(chunk, sequences, tokens.shape[1] - 2, time.perf_counter() - start)

    def _observe(self, chunk: list[_Item], encoded: list[str], width: int, seconds: float) -> None:
        """encoded: the sequences the encoder ran (one per row)."""
        residues_total = sum(map(len, encoded))
        stats = BatchStats(len(chunk), len({it.adapter.key for it in chunk}),
                           1.0 - residues_total / (len(encoded) * width), seconds, len(encoded))
        for observer in self.batch_observers:
            observer(stats)

    @torch.no_grad()
    def embed(self, sequences: list[str]) -> list[torch.Tensor]:
        """Final-layer residue representations (length x dim) from the bare base."""
        seqs = [within_limit(normalise(s, f"sequence {i}"), f"sequence {i}")[0] for i, s in enumerate(sequences)]
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.config.max_batch_size):
            idx = order[start:start + self.config.max_batch_size]
            tokens = tokenize([seqs[i] for i in idx]).to(self.device)
            packing = Packing(tokens) if self.config.packed else None
            with self._forward:
                reps = self.context.run(self.encoder, tokens, None, packing).float().cpu()  # base only
            for row, i in enumerate(idx):
                out[i] = reps[row, 1:len(seqs[i]) + 1]
        return out  # type: ignore[return-value]

    def _run_onnx(self, items: list[_Item], model, results: list) -> None:
        for chunk in self._chunks(items):
            start = time.perf_counter()
            tokens = tokenize([it.sequence for it in chunk])
            out = model(tokens).float()
            self.stats["batches"] += 1
            self.stats["sequences"] += len(chunk)
            for it, prediction in zip(chunk, self._decode(chunk, out)):
                results[it.index] = prediction
            self._observe(chunk, [it.sequence for it in chunk], tokens.shape[1] - 2, time.perf_counter() - start)

    @staticmethod
    def _decode(items: list[_Item], out: torch.Tensor) -> list[Prediction]:
        return decode(items[0].adapter, [len(it.sequence) for it in items], [it.probabilities for it in items], out)
