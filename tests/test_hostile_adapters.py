"""Corrupted and hostile adapters: each is refused with its reason, holds no memory afterwards,
and every other adapter keeps serving. Corruptions that keep valid checksums (the manifest is
re-signed) prove that the later checks, not only the checksum, catch them."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from bundles import make_bundle, refs, resign, rewrite_adapter
from modeling import bundle as bundles
from modeling.base import load_base
from serving.engine import Engine, EngineConfig
from serving.registry import AdapterRefused

ADAPTER = bundles.ADAPTER_WEIGHTS


class Boom:
    """Unpickling this would create a file: proof that nothing was unpickled."""
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def first_a(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith("lora_A.weight"))


@pytest.fixture
def zoo(tiny_base_dir, tmp_path):
    """One good adapter and one of every kind of bad one."""
    registry = tmp_path / "adapters"
    base = load_base(str(tiny_base_dir))
    make_bundle(base, registry, "good", rank=2)
    folders = {name: make_bundle(base, registry, name, rank=2, seed=i) for i, name in enumerate([
        "truncated", "shape", "dtype", "nan", "inf", "checksum", "pickle", "pickle_only", "huge_rank", "no_manifest"])}
    data = (folders["truncated"] / ADAPTER).read_bytes()
    (folders["truncated"] / ADAPTER).write_bytes(data[:len(data) // 2])
    resign(folders["truncated"])
    rewrite_adapter(folders["shape"], lambda t: t.update({first_a(t): torch.zeros(2, 7)}))
    rewrite_adapter(folders["dtype"], lambda t: t.update({first_a(t): t[first_a(t)].to(torch.int32)}))
    rewrite_adapter(folders["nan"], lambda t: t[first_a(t)].view(-1).__setitem__(0, float("nan")))
    rewrite_adapter(folders["inf"], lambda t: t[first_a(t)].view(-1).__setitem__(0, float("inf")))
    (folders["checksum"] / bundles.HEAD_WEIGHTS).write_bytes(b"\0" * 64)  # not re-signed
    marker = tmp_path / "unpickled"
    for name in ("pickle", "pickle_only"):  # a .bin beside the safetensors, or instead of them
        (folders[name] / "adapter_model.bin").write_bytes(pickle.dumps(Boom(str(marker))))
        manifest = json.loads((folders[name] / bundles.MANIFEST).read_text())
        manifest["files"]["adapter_model.bin"] = ""
        if name == "pickle_only":
            (folders[name] / ADAPTER).unlink()
            del manifest["files"][ADAPTER]
        (folders[name] / bundles.MANIFEST).write_text(json.dumps(manifest))
        resign(folders[name])
    manifest = json.loads((folders["huge_rank"] / bundles.MANIFEST).read_text())
    manifest["lora"]["rank"] = 10**9
    (folders["huge_rank"] / bundles.MANIFEST).write_text(json.dumps(manifest))
    (folders["no_manifest"] / bundles.MANIFEST).unlink()
    # A symlinked version folder and a symlinked file, both pointing outside the registry.
    outside = tmp_path / "outside"
    shutil.copytree(folders["nan"].parent.parent / "good" / "1", outside)
    (registry / "linked").mkdir()
    (registry / "linked" / "1").symlink_to(outside, target_is_directory=True)
    linked_file = make_bundle(base, registry, "linked_file", rank=2)
    secret = tmp_path / "secret.safetensors"
    shutil.copy(linked_file / ADAPTER, secret)
    (linked_file / ADAPTER).unlink()
    (linked_file / ADAPTER).symlink_to(secret)
    return registry, marker


EXPECTED = {
    "truncated": "not a valid safetensors file",
    "shape": "do not fit",
    "dtype": "dtype",
    "nan": "not finite",
    "inf": "not finite",
    "checksum": "checksum mismatch",
    "pickle": "neither safetensors nor JSON",
    "pickle_only": "are required for mode lora",
    "huge_rank": "lora.rank",
    "linked": "symlink",
    "linked_file": "symlink",
}


def test_each_hostile_adapter_is_refused_with_its_reason(tiny_base_dir, zoo):
    registry, marker = zoo
    engine = Engine(load_base(str(tiny_base_dir)), registry, EngineConfig(r_max=4))
    requests = [(name, "MKTAYIAK") for name in EXPECTED] + [("good", "MKTAYIAK")]
    results = engine.predict(requests)
    for (name, _), result in zip(requests, results):
        if name == "good":
            assert result.labels and len(result.labels) == 8  # every other adapter keeps serving
            continue
        assert isinstance(result, AdapterRefused), (name, result)
        assert EXPECTED[name] in str(result), (name, str(result))
    listed = {e.name: e for e in engine.registry.entries()}
    assert "no_manifest" not in listed  # a folder without a manifest does not exist yet
    for name, reason in EXPECTED.items():  # ListAdapters shows the same reasons
        assert listed[name].status == "refused" and reason in listed[name].reason, (name, listed[name].reason)
    assert not marker.exists()  # the pickle was never unpickled
    # Refused adapters hold nothing: not in the CPU tier, not in a device slot.
    assert refs(engine.cpu_cache) == {"good@1"} and refs(engine.slots.slot_of) == {"good@1"}
    # And asking again does not retry the load: the refusal sticks until the files change.
    loads = engine.stats["loads"]
    assert isinstance(engine.predict([("nan", "MKT")])[0], AdapterRefused) and engine.stats["loads"] == loads


def test_the_finiteness_check_names_the_tensor_and_survives_overflowing_sums():
    from modeling.bundle import first_non_finite
    big = torch.full((4, 4), 3e38)  # finite, but its sum overflows to inf
    assert first_non_finite({"a": torch.ones(3), "big": big}) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.ones(5, dtype=torch.bfloat16)
        poisoned[3] = bad
        assert first_non_finite({"a": torch.ones(3), "big": big, "b": poisoned, "c": poisoned}) == "b"


def test_what_is_prepared_while_the_checksums_run_is_kept_only_if_they_match(tiny_base_dir, tmp_path):
    folder = make_bundle(load_base(str(tiny_base_dir)), tmp_path / "adapters", "a", rank=2)
    prepared = []

    def keep(bundle):
        prepared.append(bundle)
        return "kept"

    def refuse(bundle):
        raise bundles.BundleError("prepare refused it")

    assert bundles.read_bundle(folder, keep) == "kept" and prepared[0].adapter
    with pytest.raises(bundles.BundleError, match="prepare refused it"):
        bundles.read_bundle(folder, refuse)
    # A changed value in a still-valid safetensors file: parsed and prepared, then refused.
    rewrite_adapter(folder, lambda t: t[first_a(t)].add_(1))
    manifest = json.loads((folder / bundles.MANIFEST).read_text())
    manifest["files"][ADAPTER] = "0" * 64
    (folder / bundles.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(bundles.BundleError, match="checksum mismatch"):
        bundles.read_bundle(folder, keep)
    assert len(prepared) == 2  # it ran, and its result was dropped
    with pytest.raises(bundles.BundleError, match="checksum mismatch") as refused:
        bundles.read_bundle(folder, refuse)  # the mismatch is the reason given, not prepare's error
    assert "prepare refused it" in str(refused.value.__cause__)
