"""The answer always comes from the adapter version that was named: the engine on real registry
folders that operators change under it (numbers reused by hand, files edited in place, copies that
land manifest first, bad bundles beside good ones, batches that fail). The two bundles compared
here differ only in their LoRA weights (same head), so an answer shows which LoRA computed it."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from bundles import make_bundle, refs, resign, with_other_lora
from modeling import bundle as bundles
from modeling import registry as store
from modeling.base import load_base
from modeling.heads import REGRESSION
from serving.engine import Engine, EngineConfig
from serving.engine import InferenceError
from serving.engine.slots import SlotTable
from serving.registry import AdapterRefused, RegistryUnavailable

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


@pytest.fixture
def pair(tiny_base_dir, tmp_path):
    """Bundles A and B (same head, other LoRA) built aside, and the answer each gives alone."""
    base = load_base(str(tiny_base_dir))
    a = make_bundle(base, tmp_path / "built", "a", rank=2, kind=REGRESSION, seed=1)
    b = with_other_lora(a, tmp_path / "built" / "b", seed=2)
    values = {}
    for name, folder in (("A", a), ("B", b)):
        alone = tmp_path / f"alone-{name}"
        shutil.copytree(folder, alone / "x" / "1")
        values[name] = Engine(load_base(str(tiny_base_dir)), alone, EngineConfig(r_max=4)).predict(
            [("x", SEQUENCE)])[0].value
    assert abs(values["A"] - values["B"]) > 1e-3  # the LoRA terms alone tell them apart
    return {"A": a, "B": b, "values": values}


def which(value: float, values: dict) -> str:
    return next((name for name, v in values.items() if abs(v - value) < 1e-5), f"neither ({value})")


def test_a_number_reused_by_hand_serves_the_new_bytes_not_the_old_lora(tiny_base_dir, tmp_path, pair):
    """An operator bypasses `registry remove/push`: rm -r x/1, then cp -r another bundle to x/1.
    Caches keyed by content identity never run the old LoRA (still in a slot) for the new bundle.
    If no scan saw x/1 gone in between, the new files are an in-place edit of x@1: refused."""
    root = tmp_path / "adapters"
    shutil.copytree(pair["A"], root / "x" / "1")
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4))
    for expected in ("A", "B", "A"):
        engine.registry.refresh()
        result = engine.predict([("x", SEQUENCE)])[0]
        assert not isinstance(result, Exception), result
        assert result.adapter == "x@1" and which(result.value, pair["values"]) == expected
        shutil.rmtree(root / "x" / "1")
        engine.registry.refresh()  # the watcher sees the version gone
        shutil.copytree(pair["B" if expected == "A" else "A"], root / "x" / "1")
    assert len(engine.slots.slot_of) <= 1  # the retired versions' slots were given back
    engine.registry.refresh()
    assert which(engine.predict([("x", SEQUENCE)])[0].value, pair["values"]) == "B"  # served: sealed
    shutil.rmtree(root / "x" / "1")  # and with no scan between: an edit of a served version
    shutil.copytree(pair["A"], root / "x" / "1")
    engine.registry.refresh()
    result = engine.predict([("x", SEQUENCE)])[0]
    assert isinstance(result, AdapterRefused) and "edited in place" in str(result)


def test_an_in_place_edit_is_refused_and_its_new_bytes_never_served(tiny_base_dir, tmp_path, pair):
    """B's files copied over x@1 (A, served) one by one, manifest last, while traffic runs and the
    CPU tier holds one adapter (so x is re-read from disk between calls, also mid-edit). Every
    answer is A's until the edit is detected; after that x@1 is refused, naming the file."""
    root = tmp_path / "adapters"
    folder = root / "x" / "1"
    shutil.copytree(pair["A"], folder)
    make_bundle(load_base(str(tiny_base_dir)), root, "y", rank=2, kind=REGRESSION, seed=5)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4, max_cpu_bytes=1))
    assert which(engine.predict([("x", SEQUENCE)])[0].value, pair["values"]) == "A"  # served: sealed
    engine.registry.watch(interval=0.02)
    outcomes, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            x, _ = engine.predict([("x", SEQUENCE), ("y", SEQUENCE)])  # y evicts x from the CPU tier
            outcomes.append((time.monotonic(), x))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.2)
        for name in sorted(p.name for p in pair["B"].iterdir() if p.name != bundles.MANIFEST) + [bundles.MANIFEST]:
            shutil.copy(pair["B"] / name, folder / name)
            time.sleep(0.1)
        deadline = time.monotonic() + 60  # the watch polls every 20 ms; this only bounds "never"
        while "edited in place" not in str(engine.registry.entries()[0].reason) and time.monotonic() < deadline:
            time.sleep(0.02)
        detected = time.monotonic()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(60)
        engine.registry.close()
    entry = next(e for e in engine.registry.entries() if e.name == "x")
    # names the first changed file its scan found: a weights file, or the manifest on a busy machine
    assert entry.status == "refused" and "edited in place" in entry.reason
    assert any(f"{p.name} changed" in entry.reason for p in pair["B"].iterdir())
    answered = [which(r.value, pair["values"]) for _, r in outcomes if not isinstance(r, Exception)]
    assert answered and set(answered) == {"A"}  # never B's bytes under A's identity, never a mix
    assert all(isinstance(r, (AdapterRefused, RegistryUnavailable)) or which(r.value, pair["values"]) == "A"
               for _, r in outcomes)
    after = [r for t, r in outcomes if t > detected + 0.05]
    assert after and all(isinstance(r, AdapterRefused) for r in after)


def test_the_same_bytes_copied_again_are_no_edit(tiny_base_dir, tmp_path, pair):
    root = tmp_path / "adapters"
    shutil.copytree(pair["A"], root / "x" / "1")
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4))
    engine.predict([("x", SEQUENCE)])
    time.sleep(0.01)  # a new mtime
    shutil.copytree(pair["A"], root / "x" / "1", dirs_exist_ok=True)  # a repeated `cp -r`
    engine.registry.refresh()
    assert which(engine.predict([("x", SEQUENCE)])[0].value, pair["values"]) == "A"


def test_a_half_copy_becomes_servable_once_complete(tiny_base_dir, tmp_path, pair):
    """cp/kubectl cp/tar may write the manifest first: refused while files are missing, retried on
    every change of the version's files, served once the copy is complete."""
    root = tmp_path / "adapters"
    folder = root / "x" / "1"
    folder.mkdir(parents=True)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4))
    names = [bundles.MANIFEST] + sorted(p.name for p in pair["A"].iterdir() if p.name != bundles.MANIFEST)
    for i, name in enumerate(names):
        shutil.copy(pair["A"] / name, folder / name)
        engine.registry.refresh()
        result = engine.predict([("x", SEQUENCE)])[0]
        if i < len(names) - 1:
            assert isinstance(result, AdapterRefused) and "missing" in str(result), (name, result)
    assert which(result.value, pair["values"]) == "A" and engine.registry.resolve("x").status == "ok"


def _bad(base, root, name, change, seed):
    folder = make_bundle(base, root, name, rank=2, seed=seed)
    change(folder)
    resign(folder)  # valid checksums: the later checks must catch it


def _edit_json(file: str, change):
    def apply(folder):
        path = folder / file
        data = bundles.json.loads(path.read_text())
        change(data)
        path.write_text(bundles.json.dumps(data))
    return apply


def test_bad_bundles_fail_only_their_own_requests_and_are_not_retried(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir))
    root = tmp_path / "adapters"
    make_bundle(base, root, "good", rank=2)
    make_bundle(base, root, "good2", rank=2, seed=7)
    bad = {
        "unknown_head_key": _edit_json(bundles.MANIFEST, lambda m: m["head"].update(colour="red")),
        "r_zero": _edit_json(bundles.ADAPTER_CONFIG, lambda c: c.update(r=0)),
        "alpha_text": _edit_json(bundles.ADAPTER_CONFIG, lambda c: c.update(lora_alpha="big")),
        "fewer_labels": _edit_json(bundles.MANIFEST, lambda m: m["output"].update(labels=["H", "E"])),
        "kind_mismatch": _edit_json(bundles.MANIFEST, lambda m: m["output"].update(kind="regression", labels=[])),
        "head_missing_tensor": lambda f: _drop_tensor(f / bundles.HEAD_WEIGHTS),
        "lora_missing_b": lambda f: _drop_tensor(f / bundles.ADAPTER_WEIGHTS, "lora_B"),
    }
    for i, (name, change) in enumerate(bad.items()):
        _bad(base, root, name, change, seed=i)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4))
    requests = [("good", SEQUENCE)] + [(name, SEQUENCE) for name in bad] + [("good2", SEQUENCE)]
    results = engine.predict(requests)
    alone = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4)).predict(
        [("good", SEQUENCE), ("good2", SEQUENCE)])
    assert results[0].labels == alone[0].labels and results[-1].labels == alone[1].labels
    for (name, _), result in zip(requests[1:-1], results[1:-1]):
        assert isinstance(result, AdapterRefused), (name, result)
        assert engine.registry.entries()[[e.name for e in engine.registry.entries()].index(name)].status == "refused"
    loads = engine.stats["loads"] + engine.stats["refusals"]
    again = engine.predict(requests)  # refused versions are marked: not read again on every call
    assert engine.stats["loads"] + engine.stats["refusals"] == loads
    assert [type(r) for r in again] == [type(r) for r in results]


def _drop_tensor(path, part: str = ""):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    del tensors[next(k for k in sorted(tensors) if part in k)]
    save_file(tensors, path)


def test_an_error_inside_a_batch_fails_only_the_requests_it_concerns(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir))
    root = tmp_path / "adapters"
    for i, name in enumerate(("a", "b", "c")):
        make_bundle(base, root, name, rank=2, seed=i)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4))
    requests = [(name, SEQUENCE[:10 + i]) for i in range(3) for name in ("a", "b", "c")]
    expected = engine.predict(requests)
    broken = engine.load("b").head.net[0]
    broken.weight.data = torch.zeros(3)  # a head that cannot run: its batch raises
    results = engine.predict(requests)
    for (name, _), got, want in zip(requests, results, expected):
        if name == "b":
            assert isinstance(got, InferenceError) and "b@1" in str(got)
        else:
            assert got.labels == want.labels
    assert engine.stats["failed_batches"] >= 1


def test_a_failing_slot_load_gives_its_slot_back(tiny_base_dir, tmp_path, monkeypatch):
    table = SlotTable(2)

    def fail(slot):
        raise RuntimeError("copy failed")

    for _ in range(5):
        with pytest.raises(RuntimeError):
            table.acquire("x", fail)
    assert sorted(table.free) == [1, 2] and not table.slot_of
    base = load_base(str(tiny_base_dir))
    root = tmp_path / "adapters"
    for i in range(3):
        make_bundle(base, root, f"s{i}", rank=2, seed=i)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4, max_device_adapters=2))
    real = engine.slot_store.load
    failing = {"left": 4}

    def flaky(slot, packed):
        if failing["left"]:
            failing["left"] -= 1
            raise RuntimeError("device copy failed")
        real(slot, packed)

    monkeypatch.setattr(engine.slot_store, "load", flaky)
    for _ in range(4):
        results = engine.predict([("s0", SEQUENCE)])
        assert isinstance(results[0], InferenceError)
    results = engine.predict([("s0", SEQUENCE), ("s1", SEQUENCE)])  # both slots still there
    assert all(r.labels for r in results)
    assert len(engine.slots.free) + len(engine.slots.slot_of) == 2


def test_a_removed_version_held_by_a_batch_frees_its_slot_on_release(tiny_base_dir, tmp_path):
    table = SlotTable(1)
    table.acquire("x#1", lambda slot: None)
    table.drop("x#1")  # removed while a batch holds it
    assert table.slot_of == {"x#1": 1}  # still there for the batch that runs it
    table.release("x#1")
    assert table.free == [1] and not table.slot_of
    base = load_base(str(tiny_base_dir))
    root = tmp_path / "adapters"
    make_bundle(base, root, "x", rank=2)
    make_bundle(base, root, "y", rank=2, seed=3)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4, max_device_adapters=1))
    adapter = engine.load("x")
    expected = engine.predict([(adapter, SEQUENCE)])[0].labels  # x in the one slot
    store.remove(root, "x")
    engine.registry.refresh()  # x's slot freed; on a CPU device its packed LoRA was a view of it
    assert not engine.slots.slot_of and engine.slots.free == [1]
    assert engine.predict([("y", SEQUENCE)])[0].labels != expected  # y now fills that slot
    held = engine.predict([(adapter, SEQUENCE)])[0]  # a request that loaded x before its removal
    assert held.adapter == "x@1" and held.labels == expected  # computed with x's own weights
    assert not any(key.startswith("x@") for key in engine.slots.slot_of)  # and its slot freed at once after


def test_merged_copies_follow_traffic_and_stay_bounded(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir))
    root = tmp_path / "adapters"
    for i in range(3):
        make_bundle(base, root, f"m{i}", rank=2, seed=i)
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4, merge_top_k=1))
    for name in ("m0", "m1", "m1", "m2", "m2", "m2"):
        engine.predict([(name, SEQUENCE)] * 2)
        assert len(engine.merged) <= 1
    assert refs(engine.merged) == {"m2@1"}


def test_the_cpu_tier_is_bounded_by_bytes(tiny_base_dir, tmp_path):
    base = load_base(str(tiny_base_dir))
    root = tmp_path / "adapters"
    for i in range(6):
        make_bundle(base, root, f"c{i}", rank=2, seed=i)
    one = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4)).load("c0").nbytes
    engine = Engine(load_base(str(tiny_base_dir)), root, EngineConfig(r_max=4, max_cpu_bytes=3 * one))
    for i in range(6):
        assert engine.predict([(f"c{i}", SEQUENCE)])[0].labels
        assert engine.cpu_cache.nbytes <= 3 * one
    assert refs(engine.cpu_cache) == {"c3@1", "c4@1", "c5@1"}
