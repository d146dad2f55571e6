"""The serving engine: one shared ESM-2, many adapters, mixed-adapter batches.

Tiers (vLLM/S-LoRA style): device slots (LRU, reference-counted: a slot used by a queued or
running batch is never evicted) <- CPU cache (LRU of verified, rank-padded tensors and heads)
<- the registry on disk. Hot adapters can be served from a merged copy of the encoder
(W + s·B·A); the shared base is never modified in place.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modeling import bundle as bundles
from modeling.alphabet import SequenceError, normalise, tokenize, within_limit
from modeling.base import Base
from modeling.encoder import EsmEncoder
from modeling.heads import PER_RESIDUE, REGRESSION, HeadSpec, build_head, residues
from modeling.lora import ATTENTION_TARGETS, PEFT_PREFIX
from serving.graphs import EncoderGraphs, padded_batch
from serving.head_batch import run_heads
from serving.int8 import check_quantize, quantize_linears
from serving.multilora import PackedLora, SlotContext, wrap_targets
from serving.registry import AdapterRefused, Registry, RegistryUnavailable
from serving.transfer import to_device


class NoFreeSlot(RuntimeError):
    pass


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: one of {sorted(DTYPES)}")
    return DTYPES[name]


REFUSAL_KINDS = ("fingerprint", "checksum", "r_max", "targets", "full fine-tuned", "shapes", "symlink", "finite",
                 "dtype", "safetensors", "manifest")


def refusal_kind(reason: str) -> str:
    """A bounded label for a refusal reason (metrics must not carry free text)."""
    return next((k.split()[0] for k in REFUSAL_KINDS if k in reason), "other")


@dataclass
class Prediction:
    adapter: str  # the resolved NAME@VERSION
    kind: str
    labels: str | None = None  # per-residue label string
    residue_probabilities: list[list[float]] | None = None
    label: str | None = None  # sequence class
    probabilities: dict[str, float] | None = None
    value: float | None = None  # regression


@dataclass
class LoadedAdapter:
    """CPU tier: a verified bundle, ready to copy into a device slot."""
    ref: str
    manifest: dict
    lora: PackedLora | None  # in slot layout (serving/multilora.py); None once copied to a CPU device
    head: nn.Module
    nbytes: int
    folder: Path | None = None
    has_lora: bool = False

    @property
    def kind(self) -> str:
        return self.manifest["output"]["kind"]


def manifest_checker(base: Base, r_max: int = 64, targets: tuple[str, ...] = ATTENTION_TARGETS):
    """What a server on `base` can serve; returns a refusal reason or None."""
    def check(manifest: dict) -> str | None:
        if manifest["base"]["fingerprint"] != base.fingerprint:
            return (f"base fingerprint mismatch: trained on {manifest['base']['fingerprint'][:12]}, "
                    f"serving {base.fingerprint[:12]}")
        if manifest["mode"] == "full":
            return "full fine-tuned bundle: it replaces the whole encoder and cannot share the base"
        if manifest["head"].get("embed_dim") != base.encoder.embed_dim:
            return f"head expects embed_dim {manifest['head'].get('embed_dim')}, base has {base.encoder.embed_dim}"
        lora = manifest.get("lora")
        if lora:
            if lora["rank"] > r_max:
                return f"rank {lora['rank']} exceeds this server's r_max {r_max}"
            if missing := set(lora.get("targets", [])) - set(targets):
                return f"targets {sorted(missing)} are not enabled on this server (targets: {list(targets)})"
        return None
    return check


class SlotTable:
    """Device slots 1..n (0 = no adapter): LRU order plus a reference count per slot."""

    def __init__(self, num_slots: int):
        self.free = list(range(num_slots, 0, -1))
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # LRU first
        self.refs: Counter[str] = Counter()
        self.evictions = 0

    def acquire(self, ref: str, load, evict: bool = True) -> int:
        if ref in self.slot_of:
            self.slot_of.move_to_end(ref)
        else:
            if not self.free and not evict:
                raise NoFreeSlot("no free device slot")
            if not self.free:
                victim = next((r for r in self.slot_of if self.refs[r] == 0), None)
                if victim is None:
                    raise NoFreeSlot("every device slot is in use by a queued or running batch")
                self.free.append(self.slot_of.pop(victim))
                self.evictions += 1
            slot = self.free.pop()
            load(slot)
            self.slot_of[ref] = slot
        self.refs[ref] += 1
        return self.slot_of[ref]

    def release(self, ref: str) -> None:
        self.refs[ref] -= 1
        if self.refs[ref] <= 0:
            del self.refs[ref]

    def drop(self, ref: str) -> None:
        """Forget a removed adapter's slot once nothing uses it."""
        if ref in self.slot_of and self.refs[ref] == 0:
            self.free.append(self.slot_of.pop(ref))


@dataclass
class EngineConfig:
    r_max: int = 16
    max_device_adapters: int = 64
    max_cpu_adapters: int = 256
    max_batch_size: int = 64
    # Padded residues per forward pass. None = by device: 512 on CPU (throughput is flat from 512
    # up there, bench/engine.py, and shorter passes answer sooner), 2048 for int8 on CPU (its faster
    # linears leave per-pass costs to amortise: +46% over 512, README), large on GPU.
    max_batch_residues: int | None = None
    targets: tuple[str, ...] = ATTENTION_TARGETS
    merged: tuple[str, ...] = ()  # adapter names always served from a merged copy
    merge_top_k: int = 0  # also merge the K adapters with the most traffic
    device: str = "cpu"
    return_residue_probabilities: bool = False
    # Load adapters named by queued requests in the background. None = on a GPU only: there the
    # host idles during the forward; on CPU the forward already uses every core and a concurrent
    # load slows it (bench/engine.py: cold_traffic_prefetch_speedup 0.76-0.88 on 2 cores).
    prefetch: bool | None = None
    # Weights and activations of the shared encoder, merged copies and heads. bfloat16/float16 trade
    # accuracy (tests/test_engine.py states the tolerance) for speed: tensor cores on a GPU, bf16
    # instructions on recent CPUs. Adapters stay fp32 on disk and in the CPU tier.
    dtype: str = "float32"
    # "int8": the shared encoder's linear layers (and merged copies') run W8A8 on the CPU
    # (serving/int8.py); LoRA terms, heads, norms and attention stay float32. Tolerance: tests.
    quantize: str = "none"
    # Replay encoder passes from CUDA graphs, one per padded batch shape (serving/graphs.py): the host
    # then queues one graph instead of thousands of kernels. CUDA only; batches are padded to
    # buckets (rows to a multiple of 8, positions to a multiple of 64).
    cuda_graphs: bool = False


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
        if self.config.max_batch_residues is None:
            cpu = 2048 if self.config.quantize == "int8" else 512
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
        if isinstance(registry, Path) or isinstance(registry, str):
            registry = Registry(Path(registry), manifest_checker(base, self.config.r_max, self.config.targets))
        self.registry = registry
        self.registry.on_change(self._on_registry_change)
        self.cpu_cache: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.slots = SlotTable(self.config.max_device_adapters)
        self.merged: dict[str, nn.Module] = {}
        self.onnx: dict[str, object] = {}  # ref -> OnnxModel (merged export run by onnxruntime)
        self.traffic: Counter[str] = Counter()
        self.stats = Counter()
        self.batch_observers: list = []  # called with BatchStats after every forward pass
        self.event_observers: list = []  # called with (event, detail, seconds): load/eviction/refusal
        self._lock = threading.RLock()
        self._forward = threading.Lock()  # one forward at a time: the slot context is shared
        self._loading: dict[str, Future] = {}  # ref -> the load in progress (one read per adapter)
        if self.config.prefetch is None:
            self.config.prefetch = self.device.type == "cuda"
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch")
        # On a GPU, slot copies run on their own stream so they overlap the forward on the default
        # stream; a batch waits (on the GPU, not the host) for the copies of the slots it reads.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._slot_ready: dict[int, torch.cuda.Event] = {}

    # ---- tiers -------------------------------------------------------------------------------
    def load(self, ref: str) -> LoadedAdapter:
        """Resolve NAME[@VERSION] and return the verified adapter (CPU tier, LRU)."""
        entry = self.registry.resolve(ref)
        with self._lock:
            if entry.ref in self.cpu_cache:
                self.cpu_cache.move_to_end(entry.ref)
                return self.cpu_cache[entry.ref]
            # A loader fills the CPU cache before it leaves _loading: missing from both, nobody has it.
            pending = self._loading.get(entry.ref)
            owner = pending is None
            if owner:
                pending = self._loading[entry.ref] = Future()
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
                self._loading.pop(entry.ref, None)

    def prefetch(self, ref: str) -> Future | None:
        """Start making an adapter servable in the background (disk -> CPU tier -> a free device
        slot), so that the load overlaps the batch running now instead of delaying the next one.
        Never evicts; errors are left for predict() to report on the request itself."""
        if not self.config.prefetch:
            return None
        try:
            entry = self.registry.resolve(ref)
        except (LookupError, RuntimeError, ValueError):
            return None
        with self._lock:
            if entry.ref in self.slots.slot_of or entry.ref in self._loading:
                return None
        return self._prefetcher.submit(self._stage, entry.ref)

    def _stage(self, ref: str) -> None:
        try:
            adapter = self.load(ref)
            if adapter.has_lora:
                with self._lock:
                    self.slots.acquire(ref, lambda s: self._to_slot(adapter, s), evict=False)
                    self.slots.release(ref)
        except (NoFreeSlot, LookupError, RuntimeError, ValueError):
            pass  # predict() loads (or refuses) it on its own path

    def _load_entry(self, entry) -> LoadedAdapter:
        start = time.perf_counter()
        try:
            adapter = self._read(entry.ref, entry.folder)
        except (bundles.BundleError, ValueError, RuntimeError, KeyError, OSError) as exc:
            if not self.registry.readable():  # the volume went away, the bundle did not go bad
                raise RegistryUnavailable(f"adapter {entry.ref}: registry unreadable; retry later") from exc
            self.registry.mark_refused(entry.ref, str(exc))
            self.stats["refusals"] += 1
            self._event("refusal", refusal_kind(str(exc)), 0.0)
            raise AdapterRefused(f"adapter {entry.ref} refused: {exc}") from exc
        self._event("load", entry.ref, time.perf_counter() - start)
        with self._lock:
            self.cpu_cache[entry.ref] = adapter
            self.stats["loads"] += 1
            while len(self.cpu_cache) > self.config.max_cpu_adapters:
                victim = next((r for r in self.cpu_cache if r not in self.slots.refs), None)
                if victim is None:
                    break
                del self.cpu_cache[victim]
        return adapter

    def _read(self, ref: str, folder: Path) -> LoadedAdapter:
        # Checksums and safetensors only; the adapter is packed while its checksums are computed.
        return bundles.read_bundle(folder, lambda bundle: self._adapter(ref, folder, bundle))

    def _adapter(self, ref: str, folder: Path, bundle: bundles.Bundle) -> LoadedAdapter:
        reason = manifest_checker(self.base, self.config.r_max, self.config.targets)(bundle.manifest)
        if reason:
            raise bundles.BundleError(reason)
        manifest = bundle.manifest
        layers, scale = {}, 1.0
        if manifest["mode"] == "lora":
            config = bundle.adapter_config or {}
            scale = float(config.get("lora_alpha", manifest["lora"]["rank"])) / int(config.get("r", manifest["lora"]["rank"]))
            paths = {k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in bundle.adapter}
            for path in sorted(paths):
                if path not in self.layers:
                    raise bundles.BundleError(f"adapter targets {path}, which this base/server does not have")
                target = self.layers[path]
                a = bundle.adapter[f"{PEFT_PREFIX}{path}.lora_A.weight"]
                b = bundle.adapter[f"{PEFT_PREFIX}{path}.lora_B.weight"]
                bias = bundle.adapter.get(f"{PEFT_PREFIX}{path}.lora_B.bias")
                d_out, d_in = target.shape
                if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                    raise bundles.BundleError(f"{path}: adapter shapes {tuple(a.shape)}/{tuple(b.shape)} "
                                              f"do not fit the base linear ({d_out}x{d_in})")
                if a.shape[0] > self.config.r_max:
                    raise bundles.BundleError(f"rank {a.shape[0]} exceeds r_max {self.config.r_max}")
                layers[path] = (a, b, bias)
        # Packed once here, so a device slot fills with one copy; pinned so that copy is asynchronous.
        lora = self.slot_store.pack(layers, scale, pin=self.device.type == "cuda") if layers else None
        nbytes = lora.nbytes if lora else 0
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            head = build_head(HeadSpec(**manifest["head"]))
        head.load_state_dict(bundle.head, assign=True)
        head = head.to(self.device, self.dtype).eval()
        nbytes += sum(p.numel() * p.element_size() for p in head.parameters())
        return LoadedAdapter(ref, manifest, lora, head, nbytes, Path(folder), lora is not None)

    def _event(self, event: str, detail: str, seconds: float) -> None:
        for observer in self.event_observers:
            observer(event, detail, seconds)

    def tiers(self) -> dict[str, int]:
        """Adapters resident per tier (for gauges)."""
        with self._lock:
            return {"device": len(self.slots.slot_of), "cpu": len(self.cpu_cache),
                    "merged": len(self.merged), "onnx": len(self.onnx),
                    "registry": len(self.registry)}

    def _packed(self, adapter: LoadedAdapter) -> PackedLora:
        if adapter.lora is not None:
            return adapter.lora
        return self._read(adapter.ref, adapter.folder).lora  # released earlier (CPU device)

    def _to_slot(self, adapter: LoadedAdapter, slot: int) -> None:
        packed = self._packed(adapter)
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext()
        with stream:
            self.slot_store.load(slot, packed)
        for path in packed.bias_paths:
            self.layers[path].use_bias = True
        if self._copy_stream is not None:
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
            self._slot_ready[slot] = ready
        if self.device.type == "cpu":
            # On a CPU device the slot already lives in host memory: keeping the CPU-tier copy too
            # would double each adapter's footprint. Re-read from disk (~10 ms) if it is evicted.
            adapter.lora = None

    def _on_registry_change(self, added: set[str], removed: set[str]) -> None:
        with self._lock:
            for ref in removed:
                self.cpu_cache.pop(ref, None)
                self.merged.pop(ref, None)
                self.onnx.pop(ref, None)
                self.slots.drop(ref)

    # ---- merged mode -------------------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        """The shared base's own weights (the wrapped Linears' originals, no LoRA buffers)."""
        return {k.replace(".base.", "."): v for k, v in self.encoder.state_dict().items() if ".lora_" not in k}

    def merged_encoder(self, adapter: LoadedAdapter) -> nn.Module:
        """A dedicated copy with W + s·B·A (and s·bias) folded in; the shared base is untouched."""
        with torch.device(self.device):  # built where it will run: a 650M init on the host takes seconds
            merged = EsmEncoder(self.base.encoder.shape)
        merged.load_state_dict(self.base_state())  # a copy: the shared weights stay untouched
        merged = merged.eval()  # merged in fp32, then cast to the serving dtype
        modules = dict(merged.named_modules())
        with torch.no_grad():
            if adapter.has_lora:
                for path, (a, b, bias) in self.slot_store.unpack(self._packed(adapter)).items():
                    linear = modules[path]
                    linear.weight += (b @ a).to(self.device)  # the scale is in b already
                    if bias is not None:
                        linear.bias += bias.to(self.device)
        if self.config.quantize == "int8":
            quantize_linears(merged)  # after merging: the copy runs as the shared encoder does
        return merged.to(self.dtype)

    def merge(self, ref: str) -> None:
        """Serve a hot adapter from its own merged copy from now on."""
        adapter = self.load(ref)
        merged = self.merged_encoder(adapter)
        with self._lock:
            self.merged[adapter.ref] = merged

    def _update_hot(self) -> None:
        wanted = set()
        for name in self.config.merged:
            try:
                wanted.add(self.registry.resolve(name).ref)
            except (LookupError, RuntimeError, ValueError):
                pass
        wanted |= {ref for ref, _ in self.traffic.most_common(self.config.merge_top_k)}
        for ref in wanted - set(self.merged):
            try:
                self.merge(ref)
            except (LookupError, RuntimeError, ValueError):
                pass

    def add_onnx(self, path: Path) -> str:
        """Serve an adapter from its ONNX export (see serving.export_onnx); returns its ref."""
        from serving.onnx_runner import OnnxModel

        model = OnnxModel(Path(path))
        if model.base_fingerprint != self.fingerprint:
            raise AdapterRefused(f"{path}: exported from another base ({model.base_fingerprint[:12]})")
        adapter = self.load(model.adapter)  # must still be in the registry and valid
        with self._lock:
            self.onnx[adapter.ref] = model
        return adapter.ref

    # ---- inference ---------------------------------------------------------------------------
    def predict(self, requests: list[tuple]) -> list[Prediction | Exception]:
        """requests: (adapter ref, sequence[, want residue probabilities]). Each result is a
        Prediction or the error for that request alone (unknown/refused adapter, bad name,
        invalid sequence); the rest of the batch is unaffected."""
        results: list[Prediction | Exception | None] = [None] * len(requests)
        items: list[_Item] = []
        for i, (ref, sequence, *flags) in enumerate(requests):
            try:
                seq, _ = within_limit(normalise(sequence, f"sequence {i}"), f"sequence {i}")
                want = bool(flags[0]) if flags else self.config.return_residue_probabilities
                items.append(_Item(i, seq, self.load(ref), probabilities=want))
            except (SequenceError, LookupError, RuntimeError, ValueError) as exc:
                results[i] = exc
        with self._lock:
            for item in items:
                self.traffic[item.adapter.ref] += 1
            if self.config.merged or self.config.merge_top_k:
                self._update_hot()
            dedicated: dict[str, list[_Item]] = {}  # served by an ONNX or merged model of their own
            shared: list[_Item] = []
            for item in items:
                ref = item.adapter.ref
                (dedicated.setdefault(ref, []) if ref in self.onnx or ref in self.merged else shared).append(item)
        for ref, group in dedicated.items():
            if ref in self.onnx:
                self._run_onnx(group, self.onnx[ref], results)
            else:
                self._run(group, self.merged[ref], results)
        self._run_shared(shared, results)
        return results  # type: ignore[return-value]

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
                            acquired.append(item.adapter.ref)
                        ready.append(item)
                if ready:
                    self._run(ready, self.encoder, results, slots=True)
                else:  # every slot held by other running batches: fail this one, never evict in use
                    results[chunk[0].index] = NoFreeSlot("no free adapter slot; retry")
                    ready = chunk[:1]
            finally:
                with self._lock:
                    for ref in acquired:
                        self.slots.release(ref)
            done = {id(item) for item in ready}
            pending = [item for item in pending if id(item) not in done]

    def _acquire(self, adapter: LoadedAdapter) -> int:
        evictions = self.slots.evictions
        slot = self.slots.acquire(adapter.ref, lambda s: self._to_slot(adapter, s))
        if self.slots.evictions > evictions:
            self._event("eviction", "device", 0.0)
        return slot

    def _chunks(self, items: list[_Item]):
        """Length-sorted batches bounded by max_batch_size (items) and max_batch_residues (padded
        encoder rows: head-only adapters asked for the same sequence share a row, see _run)."""
        batch: list[_Item] = []
        rows: set[tuple] = set()
        for item in sorted(items, key=lambda it: (len(it.sequence), it.sequence)):
            row = (item.sequence, item.adapter.ref if item.adapter.has_lora else None)
            padded = (len(rows | {row})) * (len(item.sequence) + 2)
            if batch and (len(batch) >= self.config.max_batch_size or padded > self.config.max_batch_residues):
                yield batch
                batch, rows = [], set()
            batch.append(item)
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
                    reps = self.context.run(encoder, tokens, self.slot_store.gather(index) if slots else None)
            lengths = [len(sequence) for sequence in sequences]
            reps, mask = residues(reps, to_device(torch.tensor(lengths), self.device), max(lengths))
            self.stats["batches"] += 1
            self.stats["sequences"] += len(chunk)
            self.stats["encoded"] += len(encoded)
            groups: dict[str, list[int]] = {}
            for k, it in enumerate(chunk):
                groups.setdefault(it.adapter.ref, []).append(k)
            # Heads of one shape run stacked, whatever the number of adapters (serving/head_batch.py).
            outputs = run_heads([chunk[members[0]].adapter.head for members in groups.values()],
                                [[rows_of_items[k] for k in members] for members in groups.values()], reps, mask)
            # One copy to the host for the whole batch: a copy per group waits on the device each time
            # (64 adapters in a batch: 64 round trips).
            host = torch.cat([out.reshape(-1) for out in outputs]).float().cpu().split([out.numel() for out in outputs])
            for members, out, flat in zip(groups.values(), outputs, host):
                decoded = self._decode([chunk[k] for k in members], flat.view(out.shape))
                for k, prediction in zip(members, decoded):
                    results[chunk[k].index] = prediction
            self._observe(chunk, sequences, tokens.shape[1] - 2, time.perf_counter() - start)

    def _observe(self, chunk: list[_Item], encoded: list[str], width: int, seconds: float) -> None:
        """encoded: the sequences the encoder ran (one per row)."""
        residues_total = sum(map(len, encoded))
        stats = BatchStats(len(chunk), len({it.adapter.ref for it in chunk}),
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
            with self._forward:
                reps = self.encoder(tokens).float().cpu()  # slot context None: base only
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

    def _decode(self, items: list[_Item], out: torch.Tensor) -> list[Prediction]:
        """Predictions of items that share one adapter, from their head outputs stacked in `out`
        (one row per item, on the host), decoded as a group in numpy: per-item tensor operations
        and a Python lookup per residue cost ~12 ms of host time per 256 sequences (2-core machine)."""
        adapter = items[0].adapter
        output = adapter.manifest["output"]
        labels = output["labels"]
        out = out.numpy()
        if adapter.kind == REGRESSION:
            std, mean = output.get("target_std", 1.0), output.get("target_mean", 0.0)
            return [Prediction(adapter.ref, adapter.kind, value=v * std + mean)
                    for v in out.reshape(len(items), -1)[:, 0].tolist()]
        if adapter.kind == PER_RESIDUE:
            # Label strings through a table of code points, from the logits' argmax (the probabilities'
            # too); probabilities only for the rows that asked for them.
            letters = np.array([ord(label) for label in labels], dtype="<u4")[out.argmax(-1)]
            predictions = []
            for row, item in enumerate(items):
                length = len(item.sequence)
                probs = softmax(out[row, :length]).tolist() if item.probabilities else None
                predictions.append(Prediction(adapter.ref, adapter.kind, residue_probabilities=probs,
                                              labels=letters[row, :length].tobytes().decode("utf-32-le")))
            return predictions
        probs = softmax(out)
        return [Prediction(adapter.ref, adapter.kind, label=labels[best], probabilities=dict(zip(labels, row)))
                for best, row in zip(probs.argmax(-1).tolist(), probs.tolist())]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)
