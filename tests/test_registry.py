import shutil
import time

import pytest

from bundles import make_bundle
from modeling import bundle as bundles
from modeling import registry as store
from serving import registry as reg
from modeling.registry import ServeLimits, ServeRule


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
    registry = reg.Registry(tmp_path / "adapters", ServeRule(tiny_base.fingerprint, tiny_base.encoder.embed_dim, ServeLimits(r_max=8)))
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
    registry = reg.Registry(root, ServeRule(tiny_base.fingerprint, tiny_base.encoder.embed_dim, ServeLimits(r_max=8)))
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
    registry = reg.Registry(tmp_path / "adapters", ServeRule(tiny_base.fingerprint, tiny_base.encoder.embed_dim, ServeLimits(r_max=8)))
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
    registry = reg.Registry(tmp_path / "adapters", ServeRule(tiny_base.fingerprint, tiny_base.encoder.embed_dim, ServeLimits(r_max=8)))
    [entry] = registry.entries()
    assert entry.status == "refused" and "not valid JSON" in entry.reason
    with pytest.raises(reg.AdapterRefused, match="not valid JSON"):
        registry.resolve("broken")
