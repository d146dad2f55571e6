import concurrent.futures
import random
import shutil

import pytest
import torch

from bundles import make_bundle, refs
from conftest import random_sequences
from modeling import bundle as bundles
from modeling.alphabet import SequenceError, tokenize
from modeling.base import load_base
from modeling.heads import PER_RESIDUE, REGRESSION, SEQUENCE_CLASS
from modeling.lora import LoraSpec
from modeling.model import load_task_model
from serving.engine import Engine, EngineConfig, NoFreeSlot
from serving.engine.slots import SlotTable
from serving.registry import AdapterNotFound, AdapterRefused, RegistryUnavailable

ATOL = 1e-4  # stated tolerance: unmerged-batched vs merged vs peft, float32 on CPU
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def reference(base_dir, folder, sequence):
    """The plain single-adapter peft model, one sequence at a time."""
    model = load_task_model(load_base(str(base_dir)).encoder, bundles.read_bundle(folder))
    with torch.no_grad():
        out, _ = model(tokenize([sequence]))
    return out[0]


@pytest.fixture
def registry(tmp_path):
    return tmp_path / "adapters"


def test_mixed_batch_matches_peft_per_adapter(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    specs = [("r2", LoraSpec(rank=2, alpha=4), PER_RESIDUE), ("r8", LoraSpec(rank=8, alpha=8), SEQUENCE_CLASS),
             ("r4", LoraSpec(rank=4, targets=["q_proj", "v_proj"]), REGRESSION),
             ("tied", LoraSpec(rank=3, tie=True, position_embedding="add"), PER_RESIDUE),
             ("r1sel", LoraSpec(rank=1, layers=[1]), PER_RESIDUE)]
    folders = {name: make_bundle(base, registry, name, kind=kind, spec=spec, seed=i)
               for i, (name, spec, kind) in enumerate(specs)}
    folders["frozen"] = make_bundle(base, registry, "frozen", mode="frozen", seed=9)
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8, max_batch_size=64))
    rng = random.Random(0)
    sequences = random_sequences(30, 5, 60, seed=4)
    requests = [(rng.choice(list(folders)), s) for s in sequences]
    results = engine.predict(requests)
    engine_merged = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8, merged=tuple(folders)))
    merged_results = engine_merged.predict(requests)
    for (name, seq), got, merged in zip(requests, results, merged_results):
        expected = reference(tiny_base_dir, folders[name], seq)
        for result in (got, merged):
            assert result.adapter == f"{name}@1"
            if result.kind == PER_RESIDUE:
                labels = "".join("HEC"[i] for i in expected.argmax(-1).tolist())
                assert result.labels == labels and len(result.labels) == len(seq)
            elif result.kind == REGRESSION:
                assert result.value == pytest.approx(float(expected[0]) * 2.0 + 5.0, abs=ATOL * 10)
            else:
                probs = expected.softmax(-1)
                assert result.probabilities["abcd"[0]] == pytest.approx(float(probs[0]), abs=ATOL)
                assert result.label == "abcd"[int(probs.argmax())]
    assert len(engine_merged.merged) == len(folders)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_batches_answer_as_padded_ones(tiny_base_dir, registry, dtype):
    """Every output kind, mixed and merged, LoRA with and without a bias term, head-only adapters,
    embeddings: the packed engine (real tokens only, batches bounded by real tokens) answers as
    the padded one within float32's tolerance (bfloat16: its own rounding, 0.01)."""
    base = load_base(str(tiny_base_dir))
    specs = [("res", LoraSpec(rank=4), PER_RESIDUE), ("cls", LoraSpec(rank=8, alpha=8), SEQUENCE_CLASS),
             ("reg", LoraSpec(rank=2, targets=["q_proj", "v_proj", "fc1"]), REGRESSION),
             ("tied", LoraSpec(rank=3, tie=True, position_embedding="add"), PER_RESIDUE)]
    for i, (name, spec, kind) in enumerate(specs):
        make_bundle(base, registry, name, kind=kind, spec=spec, seed=i)
    make_bundle(base, registry, "frozen", mode="frozen", kind=SEQUENCE_CLASS, seed=7)
    names = [name for name, _, _ in specs] + ["frozen"]
    sequences = random_sequences(40, 3, 90, seed=11)  # lengths far apart: padding is most of a batch
    requests = [(names[i % len(names)], s, True) for i, s in enumerate(sequences)]
    tol = ATOL if dtype == "float32" else 0.01
    for merged in ((), ("res", "reg")):
        answers = {}
        for packed in (False, True):
            engine = Engine(load_base(str(tiny_base_dir)), registry,
                            EngineConfig(r_max=8, max_batch_size=16, max_batch_residues=600, dtype=dtype, targets=ALL_TARGETS,
                                         merged=merged, packed=packed))
            answers[packed] = (engine.predict(requests), engine.embed(sequences[:9]))
            assert engine.config.packed is packed
        (padded, padded_embed), (packed, packed_embed) = answers[False], answers[True]
        for (name, seq, _), want, got in zip(requests, padded, packed):
            assert not isinstance(got, Exception) and not isinstance(want, Exception), (got, want)
            assert got.adapter == want.adapter == f"{name}@1"
            if want.kind == PER_RESIDUE:
                torch.testing.assert_close(torch.tensor(got.residue_probabilities),
                                           torch.tensor(want.residue_probabilities), atol=tol, rtol=0)
            elif want.kind == REGRESSION:
                assert got.value == pytest.approx(want.value, abs=tol * 10)
            else:
                assert got.probabilities == pytest.approx(want.probabilities, abs=tol)
        for want, got in zip(padded_embed, packed_embed):
            torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)


def test_a_packed_batch_is_bounded_by_real_tokens(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "a", rank=2)
    requests = [("a", "ACDEFGHIKL"[i:] + "M" * i) for i in range(8)] + [("a", "M" * 98)]  # 8 short rows, 1 long
    for packed, batches in ((False, 2), (True, 1)):  # padded: 9 x 100 > 200 + 100; packed: 8 x 12 + 100
        engine = Engine(load_base(str(tiny_base_dir)), registry,
                        EngineConfig(r_max=4, max_batch_residues=300, packed=packed))
        engine.predict(requests)
        assert engine.stats["batches"] == batches


def test_the_fused_rotary_answers_as_the_eager_one(tiny_base_dir, registry):
    """torch.compile's rotary kernel (what a GPU engine may turn on), packed and padded, bfloat16."""
    make_bundle(load_base(str(tiny_base_dir)), registry, "a", rank=4)
    requests = [("a", s, True) for s in random_sequences(6, 5, 70, seed=3)]
    for packed in (True, False):
        config = dict(r_max=4, dtype="bfloat16", packed=packed)
        eager = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(**config)).predict(requests)
        fused = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(**config, fused_rotary=True))
        assert all(layer.fused_rotary for layer in fused.encoder.layers)
        for want, got in zip(eager, fused.predict(requests)):
            torch.testing.assert_close(torch.tensor(got.residue_probabilities),
                                       torch.tensor(want.residue_probabilities), atol=0.01, rtol=0)


def test_probabilities_match_within_tolerance(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    folder = make_bundle(base, registry, "a", rank=8)
    make_bundle(base, registry, "b", rank=2, seed=1)
    engine = Engine(load_base(str(tiny_base_dir)), registry,
                    EngineConfig(r_max=8, return_residue_probabilities=True))
    seqs = random_sequences(6, 10, 50, seed=2)
    # The last two name one adapter in one batch, one with probabilities and one without.
    results = engine.predict([("a" if i % 2 else "b", s) for i, s in enumerate(seqs)]
                             + [("a", seqs[0]), ("a", seqs[0], False)])
    expected = reference(tiny_base_dir, folder, seqs[0]).softmax(-1)
    torch.testing.assert_close(torch.tensor(results[-2].residue_probabilities), expected, atol=ATOL, rtol=0)
    assert results[-1].residue_probabilities is None and results[-1].labels == results[-2].labels


def test_bad_requests_fail_alone(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "good")
    make_bundle(base, registry, "other-base", base_fingerprint_override=True)
    manifest_path = registry / "other-base" / "1" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace(base.fingerprint, "0" * 64))
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8))
    results = engine.predict([("good", "MKTAY"), ("missing", "MKTAY"), ("other-base", "MKTAY"),
                              ("good", "MKJAY"), ("../etc", "MKTAY"), ("good@7", "MKT"), ("good", "MKTAAA")])
    assert results[0].labels and results[6].labels
    assert isinstance(results[1], AdapterNotFound)
    assert isinstance(results[2], AdapterRefused) and "fingerprint" in str(results[2])
    assert isinstance(results[3], SequenceError) and results[3].char == "J"
    assert isinstance(results[4], bundles.BundleError)
    assert isinstance(results[5], AdapterNotFound)


def test_refusal_reasons(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "big", rank=16)
    make_bundle(base, registry, "fc", spec=LoraSpec(rank=2, targets=["fc1"]))
    make_bundle(base, registry, "full", mode="frozen")
    m = registry / "full" / "1" / "manifest.json"
    m.write_text(m.read_text().replace('"mode": "frozen"', '"mode": "full"'))
    make_bundle(base, registry, "tampered")
    (registry / "tampered" / "1" / "head.safetensors").write_bytes(b"\0" * 64)
    make_bundle(base, registry, "pickle")
    attention_only = EngineConfig(r_max=8, targets=ALL_TARGETS[:4])  # the default serves fc1/fc2 too
    engine = Engine(load_base(str(tiny_base_dir)), registry, attention_only)
    reasons = {e.name: e.reason for e in engine.registry.entries()}
    assert "exceeds this server's r_max 8" in reasons["big"]
    assert "not enabled on this server" in reasons["fc"]
    assert "full fine-tuned" in reasons["full"] or "files" in reasons["full"]
    results = engine.predict([("tampered", "MKT"), ("big", "MKT"), ("pickle", "MKT")])
    assert isinstance(results[0], AdapterRefused) and "checksum mismatch" in str(results[0])
    assert isinstance(results[1], AdapterRefused) and "r_max" in str(results[1])
    assert results[2].labels  # everything else keeps serving
    assert engine.registry.resolve  # refused state is listed with its reason
    assert "checksum" in {e.name: e.reason for e in engine.registry.entries()}["tampered"]


def test_eviction_never_drops_a_slot_in_use():
    table = SlotTable(2)
    loads = []
    table.acquire("a", loads.append)  # a in use (running batch)
    table.acquire("b", loads.append)
    table.release("b")  # b idle
    table.acquire("c", loads.append)  # must evict b, the only idle one, even though a is older
    assert set(table.slot_of) == {"a", "c"} and table.evictions == 1
    with pytest.raises(NoFreeSlot):
        table.acquire("d", loads.append)  # a and c both in use
    table.release("a")
    assert table.acquire("d", loads.append) == table.slot_of["d"] and "a" not in table.slot_of


def test_more_adapters_than_device_slots_still_correct(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    folders = {f"a{i}": make_bundle(base, registry, f"a{i}", rank=2, seed=i) for i in range(5)}
    engine = Engine(load_base(str(tiny_base_dir)), registry,
                    EngineConfig(r_max=4, max_device_adapters=2, max_cpu_bytes=1))
    seqs = random_sequences(10, 8, 30, seed=7)
    requests = [(f"a{i % 5}", s) for i, s in enumerate(seqs)]
    for _ in range(2):
        results = engine.predict(requests)
        for (name, seq), got in zip(requests, results):
            expected = "".join("HEC"[i] for i in reference(tiny_base_dir, folders[name], seq).argmax(-1).tolist())
            assert got.labels == expected
    assert engine.slots.evictions > 0 and len(engine.cpu_cache) == 1  # the byte bound keeps only the newest


def labels_of(base_dir, folder, sequence) -> str:
    return "".join("HEC"[i] for i in reference(base_dir, folder, sequence).argmax(-1).tolist())


def test_prefetch_loads_once_into_a_free_slot_while_batches_run(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    folders = {f"p{i}": make_bundle(base, registry, f"p{i}", rank=2, seed=i) for i in range(6)}
    engine = Engine(load_base(str(tiny_base_dir)), registry,
                    EngineConfig(r_max=4, max_device_adapters=8, prefetch=True))
    loads = []
    engine.event_observers.append(lambda event, ref, _: loads.append(ref) if event == "load" else None)
    seqs = random_sequences(12, 20, 60, seed=11)
    running = [(f"p{i % 3}", s) for i, s in enumerate(seqs)]
    expected = [labels_of(tiny_base_dir, folders[name], seq) for name, seq in running]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batches = pool.submit(lambda: [engine.predict(running) for _ in range(3)])
        prefetched = [engine.prefetch(f"p{i}") for i in range(3, 6)]
        for future in prefetched:
            future.result()
        for results in batches.result():  # slot writes beside running forwards change nothing
            assert [r.labels for r in results] == expected
    assert {f"p{i}@1" for i in range(3, 6)} <= refs(engine.slots.slot_of)
    later = [(f"p{3 + i % 3}", s) for i, s in enumerate(seqs)]
    assert [r.labels for r in engine.predict(later)] == [labels_of(tiny_base_dir, folders[n], s) for n, s in later]
    assert sorted(loads) == sorted(f"p{i}@1" for i in range(6))  # each adapter read from disk once
    assert engine.prefetch("p3") is None  # already resident: nothing to do


def test_prefetch_never_evicts_and_leaves_errors_to_predict(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    for i in range(2):
        make_bundle(base, registry, f"q{i}", rank=2, seed=i)
    engine = Engine(load_base(str(tiny_base_dir)), registry,
                    EngineConfig(r_max=4, max_device_adapters=1, prefetch=True))
    engine.predict([("q0", "MKTAYIAK")])
    engine.prefetch("q1").result()
    assert list(refs(engine.slots.slot_of)) == ["q0@1"] and engine.slots.evictions == 0
    assert "q1@1" in refs(engine.cpu_cache)  # read and verified, waiting for a slot
    assert engine.prefetch("missing") is None and engine.prefetch("../etc") is None
    assert isinstance(engine.predict([("missing", "MKT")])[0], AdapterNotFound)
    off = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=4))  # CPU default: off
    assert off.prefetch("q1") is None and not off.cpu_cache


def test_concurrent_loads_of_one_adapter_read_it_once(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "c", rank=2)
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=4))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        adapters = list(pool.map(lambda _: engine.load("c"), range(8)))
    assert all(a is adapters[0] for a in adapters) and engine.stats["loads"] == 1


def test_a_vanished_registry_keeps_what_is_loaded_serving(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "a", rank=2)
    make_bundle(base, registry, "b", rank=2, seed=1)
    make_bundle(base, registry, "c", rank=2, seed=2)
    # One device slot: a and c take turns in it, refilled from the CPU tier, never from the disk.
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=4, max_device_adapters=1))
    served = engine.predict([("a", "MKTAYIAK")])[0].labels
    other = engine.predict([("c", "MKTAYIAK")])[0].labels
    gone = registry.rename(registry.parent / "unmounted")
    for _ in range(3):
        assert [r.labels for r in engine.predict([("a", "MKTAYIAK")]) + engine.predict([("c", "MKTAYIAK")])] == [
            served, other]
    # Before the next scan notices: a load that finds files missing is transient, not a refusal.
    result = engine.predict([("a", "MKTAYIAK"), ("b", "MKTAYIAK")])
    assert result[0].labels == served and isinstance(result[1], RegistryUnavailable)
    engine.registry.refresh()
    assert "registry unreadable" in engine.registry.problem
    assert {e.ref for e in engine.registry.entries()} == {"a@1", "b@1", "c@1"}  # nothing dropped
    assert all(e.status == "ok" for e in engine.registry.entries())
    assert engine.predict([("a", "MKTAYIAK")])[0].labels == served
    gone.rename(registry)  # the volume comes back
    engine.registry.refresh()
    assert engine.registry.problem is None and engine.predict([("b", "MKTAYIAK")])[0].labels


def test_hot_add_and_remove(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "x")
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8))
    assert isinstance(engine.predict([("y", "MKT")])[0], AdapterNotFound)
    make_bundle(base, registry, "y")
    engine.registry.refresh()
    assert engine.predict([("y", "MKT")])[0].adapter == "y@1"
    make_bundle(base, registry, "y", seed=3)
    engine.registry.refresh()
    assert engine.predict([("y", "MKT")])[0].adapter == "y@2"
    assert engine.predict([("y@1", "MKT")])[0].adapter == "y@1"
    shutil.rmtree(registry / "y")
    engine.registry.refresh()
    assert isinstance(engine.predict([("y", "MKT")])[0], AdapterNotFound)
    assert not any(ref.startswith("y@") for ref in engine.cpu_cache)


def test_shared_base_is_never_modified(tiny_base_dir, registry):
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "hot")
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8, merge_top_k=1))
    pristine = load_base(str(tiny_base_dir)).encoder.state_dict()
    engine.predict([("hot", "MKTAYIAK")] * 3)
    assert refs(engine.merged) == {"hot@1"}
    for name, layer in engine.layers.items():
        assert torch.equal(layer.base.weight, pristine[f"{name}.weight"])
    merged = dict(next(iter(engine.merged.values())).named_parameters())
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], pristine["layers.0.self_attn.q_proj.weight"])


def test_onnx_export_agrees_with_the_unmerged_path(tiny_base_dir, registry, tmp_path):
    from serving.batch.export_onnx import main as export_main
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "ss", rank=4)
    make_bundle(base, registry, "cls", rank=2, kind=SEQUENCE_CLASS, seed=1)
    for name in ("ss", "cls"):
        assert export_main(["--adapter", name, "--out", str(tmp_path / f"{name}.onnx"), "--registry",
                            str(registry), "--base", str(tiny_base_dir), "--r-max", "8"]) == 0
    plain = Engine(load_base(str(tiny_base_dir)), registry,
                   EngineConfig(r_max=8, return_residue_probabilities=True))
    onnx = Engine(load_base(str(tiny_base_dir)), registry,
                  EngineConfig(r_max=8, return_residue_probabilities=True))
    assert onnx.add_onnx(tmp_path / "ss.onnx") == "ss@1" and onnx.add_onnx(tmp_path / "cls.onnx") == "cls@1"
    # lengths and batch sizes other than the traced example, with padding
    requests = [("ss" if i % 3 else "cls", s) for i, s in enumerate(random_sequences(9, 3, 90, seed=5))]
    for expected, got in zip(plain.predict(requests), onnx.predict(requests)):
        if expected.kind == PER_RESIDUE:
            assert got.labels == expected.labels
            torch.testing.assert_close(torch.tensor(got.residue_probabilities),
                                       torch.tensor(expected.residue_probabilities), atol=ATOL, rtol=0)
        else:
            assert got.label == expected.label
            for k in expected.probabilities:
                assert got.probabilities[k] == pytest.approx(expected.probabilities[k], abs=ATOL)
    assert onnx.stats["batches"] >= 2 and not onnx.slots.slot_of  # ONNX path, no LoRA slots used


# Stated tolerances of the reduced-precision engines against float32 (probabilities absolute,
# regression values relative); a label may differ only where float32's top two are that close.
# int8 (serving/engine/int8.py) measured on the 8M base: 0.0025 unmerged, 0.0057 merged (residue probabilities).
REDUCED_TOLERANCE = {"bfloat16": 0.01, "float16": 0.002, "int8": 0.02}


@pytest.mark.parametrize("precision", sorted(REDUCED_TOLERANCE))
def test_reduced_precision_agrees_with_float32_within_stated_tolerance(tiny_base_dir, registry, tmp_path, precision):
    from serving.engine.onnx_export import export
    from serving.engine.int8 import Int8Linear
    option = {"quantize": precision} if precision == "int8" else {"dtype": precision}
    base = load_base(str(tiny_base_dir))
    for i, kind in enumerate((PER_RESIDUE, SEQUENCE_CLASS, REGRESSION)):
        make_bundle(base, registry, kind, kind=kind, seed=i)
    requests = [(kind, s, True) for kind in (PER_RESIDUE, SEQUENCE_CLASS, REGRESSION)
                for s in random_sequences(8, 5, 120, seed=2)]
    full = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8)).predict(requests)
    tol = REDUCED_TOLERANCE[precision]
    for merged in ((), (PER_RESIDUE, SEQUENCE_CLASS, REGRESSION)):
        half = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8, merged=merged, **option))
        if precision != "int8":
            assert half.encoder.embed_tokens.weight.dtype == getattr(torch, precision)
        for expected, got in zip(full, half.predict(requests)):
            if expected.kind == PER_RESIDUE:
                want, have = torch.tensor(expected.residue_probabilities), torch.tensor(got.residue_probabilities)
                assert (want - have).abs().max() <= tol
                top2 = want.topk(2, dim=-1).values
                clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
                assert all(a == b for a, b, c in zip(expected.labels, got.labels, clear) if c)
            elif expected.kind == REGRESSION:
                assert got.value == pytest.approx(expected.value, rel=2 * tol)
            else:
                assert max(abs(expected.probabilities[k] - got.probabilities[k]) for k in expected.probabilities) <= tol
        if precision == "int8":  # every linear ran int8: the shared encoder's and the merged copies'
            assert len(half.merged) == len(merged)
            for encoder in [half.encoder, *half.merged.values()]:
                linears = [m for m in encoder.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
                assert linears and all(isinstance(m, Int8Linear) for m in linears)
    if precision == "int8":  # torch's quantized kernels do not export: refused, with the reason
        with pytest.raises(ValueError, match="float32 engine"):
            export(half, SEQUENCE_CLASS, tmp_path / "cls.onnx")
        return
    # an export from a half-precision engine runs in float32 (on the half-precision-rounded weights)
    onnx = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8))
    onnx.add_onnx(export(half, SEQUENCE_CLASS, tmp_path / "cls.onnx"))
    for expected, got in zip(full, onnx.predict(requests)):
        if expected.kind == SEQUENCE_CLASS:
            assert got.probabilities == pytest.approx(expected.probabilities, abs=tol)


def test_unknown_dtype_is_refused(tiny_base_dir, registry):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(dtype="float8"))


def test_head_only_adapters_asked_for_one_sequence_share_one_encoder_pass(tiny_base_dir, registry):
    """Annotating a sequence with N frozen-mode adapters costs one encoder row plus N heads; LoRA
    adapters still take a row each; every answer equals the adapter asked alone."""
    base = load_base(str(tiny_base_dir))
    frozen = [f"f{i}" for i in range(4)]
    for i, name in enumerate(frozen):
        make_bundle(base, registry, name, mode="frozen", kind=(PER_RESIDUE, SEQUENCE_CLASS)[i % 2], seed=i)
    make_bundle(base, registry, "lora", rank=4, seed=9)
    sequences = random_sequences(6, 10, 30, seed=5)
    requests = [(name, s, True) for s in sequences for name in frozen + ["lora"]]
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8, max_batch_size=64))
    together = engine.predict(requests)
    assert engine.stats["encoded"] == 2 * len(sequences)  # one row for the 4 head-only adapters, one for LoRA
    for (name, seq, _), got in zip(requests, together):
        alone = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=8)).predict([(name, seq, True)])[0]
        assert got.adapter == alone.adapter
        if got.kind == PER_RESIDUE:
            torch.testing.assert_close(torch.tensor(got.residue_probabilities),
                                       torch.tensor(alone.residue_probabilities), atol=ATOL, rtol=0)
        else:
            assert got.probabilities == pytest.approx(alone.probabilities, abs=ATOL)


def test_int8_linear_computes_the_linear_within_int8_rounding():
    from serving.engine.int8 import Int8Linear, quantize_linears
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 7, 64)
    quantized = Int8Linear(linear)
    with torch.no_grad():
        want, got = linear(x), quantized(x)
    # int8 weights and activations: each product off by well under 1%; far from float32-exact
    error = (got - want).abs().max().item()
    assert 1e-5 < error < 0.02 * want.abs().max().item()
    # its state is an nn.Linear's (a merged copy is built from it): the dequantized weight, the bias
    state = quantized.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["bias"], linear.bias.detach())
    assert (state["weight"] - linear.weight).abs().max() <= linear.weight.abs().amax(1, keepdim=True).max() / 254 + 1e-7
    model = quantize_linears(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    assert [type(m).__name__ for m in model] == ["Int8Linear", "ReLU", "Int8Linear"]


@pytest.mark.parametrize("options, message", [
    ({"quantize": "int4"}, "quantize 'int4'"),
    ({"quantize": "int8", "dtype": "bfloat16"}, "cannot be combined"),
])
def test_unservable_quantize_options_are_refused(tiny_base_dir, registry, options, message):
    with pytest.raises(ValueError, match=message):
        Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(**options))


def test_int8_on_a_gpu_is_refused_before_any_replica_starts():
    from serving.serve.config import ServiceConfig
    with pytest.raises(ValueError, match="CPU only"):
        ServiceConfig.from_args({"quantize": "int8", "device": "cuda"})
    assert ServiceConfig.from_args({"quantize": "int8"}).quantize == "int8"
