"""The registry store (modeling/registry.py) and the watcher (serving/registry/watcher.py) on real
folders: names and versions, numbers never reused, and a scan no entry can break."""
import json
import multiprocessing
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bundles import make_bundle, push_and_remove
from modeling import bundle as bundles
from modeling import registry as store
from modeling.registry import ServeLimits, ServeRule
from serving import registry as reg
from serving.serve.app import adapter_info


def rule(base, r_max: int = 8) -> ServeRule:
    return ServeRule(base.fingerprint, base.encoder.embed_dim, ServeLimits(r_max=r_max))


@pytest.mark.parametrize("bad", ["../x", "..", "/etc/passwd", "a/b", "a\0b", "x" * 65, "", ".hidden",
                                 "a b", "name@", "name@0", "name@-1", "name@1@2", "name@abc"])
def test_names_that_could_escape_the_registry_are_refused(bad):
    with pytest.raises(bundles.BundleError):
        store.parse_ref(bad)


def test_valid_names():
    assert store.parse_ref("sec_str-r16") == ("sec_str-r16", None)
    assert store.parse_ref("scl.v2@12") == ("scl.v2", 12)


def test_half_copied_folder_is_invisible_until_the_manifest_lands(tiny_base, tmp_path):
    source = make_bundle(tiny_base, tmp_path / "src", "a")
    registry = reg.Registry(tmp_path / "adapters", rule(tiny_base))
    target = tmp_path / "adapters" / "copied" / "1"
    target.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if f.name != "manifest.json":  # copied file by file, manifest last
            shutil.copy(f, target / f.name)
            registry.refresh()
            assert registry.entries() == []
    shutil.copy(source / "manifest.json", target / "manifest.json")
    registry.refresh()
    assert [e.ref for e in registry.entries()] == ["copied@1"]
    assert registry.resolve("copied").status == "ok"


def test_names_resolve_to_their_newest_version_or_the_one_pinned(tiny_base, tmp_path):
    source = make_bundle(tiny_base, tmp_path / "src", "a")
    root = tmp_path / "adapters"
    for version in (1, 2, 10):  # 10 is newer than 2: numbers, not strings
        shutil.copytree(source, root / "mine" / str(version))
    shutil.copytree(source, root / "other" / "3")
    registry = reg.Registry(root, rule(tiny_base))
    assert [registry.resolve(ref).ref for ref in ("mine", "mine@2", "other", "other@3")] == [
        "mine@10", "mine@2", "other@3", "other@3"]
    for missing in ("mine@3", "nobody", "nobody@1"):
        with pytest.raises(reg.AdapterNotFound):
            registry.resolve(missing)
    shutil.rmtree(root / "mine" / "10")
    registry.refresh()
    assert registry.resolve("mine").ref == "mine@2"
    with pytest.raises(reg.AdapterNotFound):
        registry.resolve("mine@10")


def test_push_list_remove_cli(tiny_base, tmp_path, capsys, monkeypatch):
    source = make_bundle(tiny_base, tmp_path / "src", "a")
    registry = tmp_path / "adapters"
    assert reg.main(["push", str(source), "--registry", str(registry), "--name", "mine"]) == 0
    assert reg.main(["push", str(source), "--registry", str(registry), "--name", "mine"]) == 0
    assert store.versions(registry, "mine") == [1, 2]
    monkeypatch.setenv("ESM_ADAPTERS_BASE", tiny_base.source)
    assert reg.main(["list", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "mine@1" in out and "mine@2" in out and "ok" in out
    assert reg.main(["remove", "mine@1", "--registry", str(registry)]) == 0
    assert store.versions(registry, "mine") == [2]
    assert reg.main(["remove", "mine", "--registry", str(registry)]) == 0
    assert store.versions(registry, "mine") == []
    assert reg.main(["push", str(source), "--registry", str(registry), "--name", "mine"]) == 0
    assert store.versions(registry, "mine") == [3]  # removed numbers are never handed out again
    assert reg.main(["remove", "../../etc", "--registry", str(registry)]) == 2
    (source / "head.safetensors").write_bytes(b"tampered")
    assert reg.main(["push", str(source), "--registry", str(registry)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_watch_notices_additions_and_removals(tiny_base, tmp_path):
    registry = reg.Registry(tmp_path / "adapters", rule(tiny_base))
    registry.watch(interval=0.2)
    try:
        make_bundle(tiny_base, tmp_path / "adapters", "late")
        deadline = time.monotonic() + 120  # polls every 0.2 s; the deadline only bounds "never"
        while time.monotonic() < deadline and not registry.entries():
            time.sleep(0.05)
        assert [e.ref for e in registry.entries()] == ["late@1"]
        store.remove(tmp_path / "adapters", "late")
        deadline = time.monotonic() + 120  # polls every 0.2 s; the deadline only bounds "never"
        while time.monotonic() < deadline and registry.entries():
            time.sleep(0.05)
        assert registry.entries() == []
    finally:
        registry.close()


def test_malformed_manifest_is_listed_as_refused(tiny_base, tmp_path):
    folder = make_bundle(tiny_base, tmp_path / "adapters", "broken")
    (folder / "manifest.json").write_text("{not json")
    registry = reg.Registry(tmp_path / "adapters", rule(tiny_base))
    [entry] = registry.entries()
    assert entry.status == "refused" and "not valid JSON" in entry.reason
    with pytest.raises(reg.AdapterRefused, match="not valid JSON"):
        registry.resolve("broken")


# ---- a scan that no entry can break ---------------------------------------------------------------
MALFORMED = {  # manifest changes that a schema must refuse, each with the reason's key words
    "labels_not_strings": (lambda m: m["output"].update(labels=[1, 2, 3]), "output.labels"),
    "targets_not_a_list": (lambda m: m["lora"].update(targets="q_proj"), "lora.targets"),
    "metrics_not_a_dict": (lambda m: m.update(metrics=[1, 2]), "metrics"),
    "metrics_split_not_a_dict": (lambda m: m.update(metrics={"test": 3}), "metrics"),
    "rank_2_63": (lambda m: m["lora"].update(rank=2**63), "lora.rank"),
    "rank_zero": (lambda m: m["lora"].update(rank=0), "lora.rank"),
    "rank_bool": (lambda m: m["lora"].update(rank=True), "lora.rank"),
    "deep": (lambda m: _raw(m, "[" * 100_000 + "]" * 100_000), "JSON"),  # beyond json's recursion limit
    "nested_40": (lambda m: m.update(extra=_nested(40)), "nested deeper"),
    "huge_int": (lambda m: _raw(m, "9" * 5000), "JSON"),  # beyond Python's int-from-text limit
    "huge_file": (lambda m: _raw(m, '"' + "x" * (2 << 20) + '"'), "larger than"),
    "nan": (lambda m: _raw(m, "NaN"), "JSON"),
    "head_unknown_key": (lambda m: m["head"].update(colour="red"), "unknown head keys"),
    "head_kind_mismatch": (lambda m: m["head"].update(kind="regression"), "head.kind"),
    "fewer_labels_than_outputs": (lambda m: m["output"].update(labels=["H", "E"]), "num_outputs"),
    "two_char_residue_labels": (lambda m: m["output"].update(labels=["HH", "E", "C"]), "one character"),
    "file_name_escapes": (lambda m: m["files"].update({"../x.json": "0" * 64}), "bad file entry"),
    "digest_not_hex": (lambda m: m["files"].update({"head.safetensors": "zz"}), "bad file entry"),
    "not_an_object": (lambda m: m.clear() or m.update(format=[1]), "format"),
}


def _nested(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def _raw(manifest: dict, extra: str) -> str:
    """The manifest's text with an `extra` field whose JSON text is given as is."""
    return json.dumps(manifest)[:-1] + ', "extra": ' + extra + "}"


def write_manifest(folder, change) -> None:
    manifest = json.loads((folder / bundles.MANIFEST).read_text())
    text = change(manifest)
    (folder / bundles.MANIFEST).write_text(text if isinstance(text, str) else json.dumps(manifest))


def test_each_malformed_entry_is_refused_alone_and_the_scan_goes_on(tiny_base, tmp_path):
    root = tmp_path / "adapters"
    make_bundle(tiny_base, root, "good", rank=2)
    for name, (change, _) in MALFORMED.items():
        write_manifest(make_bundle(tiny_base, root, name, rank=2), change)
    (root / "good" / "²").mkdir()  # str.isdigit() is true, int() raises
    (root / "good" / ("9" * 20)).mkdir()  # beyond int64
    (root / "good" / "007").mkdir()  # a leading zero would alias 7
    (root / "bad name!").mkdir()
    (root / "nothing-here").write_text("a file where a name folder should be")
    registry = reg.Registry(root, rule(tiny_base))
    listed = {e.name: e for e in registry.entries()}
    assert listed["good"].status == "ok" and registry.resolve("good").ref == "good@1"
    for name, (_, words) in MALFORMED.items():
        assert listed[name].status == "refused" and words in listed[name].reason, (name, listed[name].reason)
        with pytest.raises(reg.AdapterRefused):
            registry.resolve(name)
        adapter_info(listed[name].summary())  # what ListAdapters sends: every entry can be shown
    skipped = "\n".join(registry.health.skipped)
    assert "'²'" in skipped and "9" * 20 in skipped and "'007'" in skipped and "'bad name!'" in skipped
    assert registry.health.errors == 0 and registry.problem is None and registry.health.last_ok > 0


def test_the_watch_survives_every_entry_and_removals_still_take_effect(tiny_base, tmp_path):
    root = tmp_path / "adapters"
    make_bundle(tiny_base, root, "keep", rank=2)
    make_bundle(tiny_base, root, "gone", rank=2)
    registry = reg.Registry(root, rule(tiny_base))
    retired = []
    registry.on_change(retired.append)
    registry.watch(interval=0.05)
    try:
        for name, (change, _) in MALFORMED.items():  # bad entries arrive while the watch runs
            write_manifest(make_bundle(tiny_base, root, name, rank=2), change)
        (root / "keep" / "²").mkdir()
        store.remove(root, "gone")
        late = make_bundle(tiny_base, root, "late", rank=2)
        deadline = time.monotonic() + 120  # the deadline only bounds "never"
        while time.monotonic() < deadline and not ({"late", *MALFORMED} <= {e.name for e in registry.entries()}
                                                   and "gone" not in {e.name for e in registry.entries()}):
            time.sleep(0.05)
        names = {e.name for e in registry.entries()}
        assert "gone" not in names and "late" in names and set(MALFORMED) <= names  # later pushes appear
        assert registry.resolve("late").folder == late and registry.health.errors == 0
        assert any(key.startswith("gone@1#") for keys in retired for key in keys)  # caches were told
    finally:
        registry.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_manifests_and_folder_names_never_break_the_scan(tiny_base, tmp_path_factory, data):
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                               max_leaves=12)
    root = tmp_path_factory.mktemp("fuzz") / "adapters"
    make_bundle(tiny_base, root, "anchor", rank=2)
    bad = make_bundle(tiny_base, root, "fuzzed", rank=2)
    manifest = json.loads((bad / bundles.MANIFEST).read_text())
    for _ in range(data.draw(st.integers(1, 4))):  # replace fields, at any depth the manifest has
        path = data.draw(st.sampled_from([("task",), ("mode",), ("output",), ("output", "labels"), ("output", "kind"),
                                          ("head",), ("head", "num_outputs"), ("head", "kernel"), ("lora",),
                                          ("lora", "rank"), ("lora", "targets"), ("metrics",), ("files",),
                                          ("base", "fingerprint"), ("version",), ("name",)]))
        target = manifest
        for key in path[:-1]:
            target = target.setdefault(key, {}) if isinstance(target, dict) else {}
        if isinstance(target, dict):
            target[path[-1]] = data.draw(json_values)
    raw = json.dumps(manifest) if data.draw(st.booleans()) else data.draw(st.text(max_size=40))
    (bad / bundles.MANIFEST).write_text(raw)
    folder_name = data.draw(st.text(st.characters(exclude_characters="/\0", exclude_categories=("Cs",)),
                                    min_size=1, max_size=30))
    if folder_name not in (".", ".."):
        try:
            (root / "anchor" / folder_name).mkdir(exist_ok=True)
        except OSError:
            pass  # a name this filesystem refuses
    registry = reg.Registry(root, rule(tiny_base))  # the scan never raises
    assert registry.resolve("anchor").status == "ok"  # a bad entry never hides or breaks another
    for entry in registry.entries():
        adapter_info(entry.summary())  # and ListAdapters can always show every entry
    assert registry.health.errors == 0


# ---- version numbers are never reused -----------------------------------------------------------
def test_two_processes_pushing_and_removing_one_name_never_share_or_reuse_a_number(tiny_base, tmp_path):
    source = make_bundle(tiny_base, tmp_path / "src", "a", rank=2)
    root = tmp_path / "adapters"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=push_and_remove, args=(str(root), str(source), 50, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    numbers = [v for got in results for v in got]
    assert len(numbers) == 100 and len(set(numbers)) == 100  # distinct across both processes
    assert all(got == sorted(got) for got in results)  # and only ever growing
    assert store.versions(root, "shared") == []
    assert int(store.push(source, root, "shared").name) == max(numbers) + 1  # also after every remove


def test_a_version_copied_in_by_hand_is_not_reused_after_its_removal(tiny_base, tmp_path):
    source = make_bundle(tiny_base, tmp_path / "src", "a", rank=2)
    root = tmp_path / "adapters"
    shutil.copytree(source, root / "x" / "7")
    assert store.push(source, root, "x").name == "8"
    store.remove(root, "x")
    assert store.push(source, root, "x").name == "9"


def test_registry_list_checks_what_the_server_would(tiny_base, tmp_path, capsys, monkeypatch):
    root = tmp_path / "adapters"
    make_bundle(tiny_base, root, "r8", rank=8)
    make_bundle(tiny_base, root, "r32", rank=32)
    monkeypatch.setenv("ESM_ADAPTERS_BASE", tiny_base.source)

    def statuses(*flags):
        assert reg.main(["list", "--registry", str(root), "--json", *flags]) == 0
        return {a["name"]: a["status"] for a in json.loads(capsys.readouterr().out)["adapters"]}

    assert statuses() == {"r8": "ok", "r32": "refused"}  # the service's own default r_max (16)
    assert statuses("--r-max", "4") == {"r8": "refused", "r32": "refused"}
    assert statuses("--r-max", "64") == {"r8": "ok", "r32": "ok"}
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n- name: x\n  import_path: serving.serve.app:build\n  args: {r_max: 32}\n")
    assert statuses("--serve-config", str(config)) == {"r8": "ok", "r32": "ok"}
    assert statuses("--serve-config", str(config), "--targets", "q_proj") == {"r8": "refused", "r32": "refused"}
