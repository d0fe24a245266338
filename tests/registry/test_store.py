"""The adapter store with plain files: publish, versions, live pointer, promote, delete, concurrency."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from service.registry.store import (
    AdapterNotFound,
    AdapterStore,
    Conflict,
    InvalidAdapterName,
    parse_reference,
    validate_name,
)


def make_source(tmp_path: Path, tag: str = "a") -> Path:
    src = tmp_path / f"src-{tag}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(
        json.dumps({"peft_type": "DUAL_LORA", "r": 4, "lora_alpha": 8, "tag": tag})
    )
    (src / "adapter_model.safetensors").write_bytes(b"weights-" + tag.encode())
    (src / "junk.txt").write_text("not copied")
    return src


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".deleted-")))


@pytest.fixture()
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def test_publish_gives_distinct_immutable_versions(store, tmp_path):
    r1 = store.publish(
        "line-inspection",
        make_source(tmp_path, "one"),
        {"source": "test", "job_id": "ft-1", "metrics": {"val_loss": 0.5}},
    )
    r2 = store.publish("line-inspection", make_source(tmp_path, "two"))
    assert (r1.version, r2.version) == (1, 2)
    assert r1.path == store.root / "line-inspection" / "1"
    assert sorted(p.name for p in r1.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
        "metrics.json",
    ]
    assert (r1.path / "adapter_model.safetensors").read_bytes() == b"weights-one"
    assert (r2.path / "adapter_model.safetensors").read_bytes() == b"weights-two"
    assert json.loads((r1.path / "metrics.json").read_text()) == {"val_loss": 0.5}
    meta = json.loads((r1.path / "metadata.json").read_text())
    assert meta["source"] == "test" and meta["job_id"] == "ft-1" and isinstance(meta["created_at"], int)
    assert store.versions("line-inspection") == [1, 2]
    assert store.live_version("line-inspection") == 2
    assert (store.root / "line-inspection" / "live").read_text().strip() == "2"
    assert store.resolve("line-inspection").version == 2
    assert store.resolve("line-inspection@1").path == r1.path
    assert leftovers(store.root / "line-inspection") == []


def test_publish_without_promote_keeps_the_live_version(store, tmp_path):
    first = store.publish("meters", make_source(tmp_path), make_live=False)
    assert store.live_version("meters") == first.version == 1  # the only version is live anyway
    store.publish("meters", make_source(tmp_path), make_live=False)
    assert store.live_version("meters") == 1


def test_publish_without_promote_pins_an_implicit_live_version(store, tmp_path):
    store.publish("meters", make_source(tmp_path))
    (store.root / "meters" / "live").unlink()  # hand-made stores: live = newest version
    store.publish("meters", make_source(tmp_path), make_live=False)
    assert store.live_version("meters") == 1


def test_publish_refuses_bad_names_and_missing_files(store, tmp_path):
    src = make_source(tmp_path)
    for bad in [
        "../evil",
        "..",
        "a/b",
        "/abs",
        "Base",
        "base",
        "none",
        "",
        "x@2",
        "UPPER",
        ".hidden",
        "a" * 65,
        " pad",
    ]:
        with pytest.raises(InvalidAdapterName):
            store.publish(bad, src)
    assert not (tmp_path / "evil").exists()
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(Exception, match="adapter_model.safetensors is missing"):
        store.publish("ok", src)
    assert store.names() == []


def test_metadata_must_be_json(store, tmp_path):
    with pytest.raises(Exception, match="JSON"):
        store.publish("ok", make_source(tmp_path), {"metrics": {"x": object()}})
    assert store.versions("ok") == [] and leftovers(store.root / "ok") == []


def test_promote_and_rollback(store, tmp_path):
    for tag in "abc":
        store.publish("labels", make_source(tmp_path, tag))
    assert store.promote("labels", 1) == {"name": "labels", "live_version": 1, "previous_live_version": 3}
    assert store.resolve("labels").version == 1
    assert store.promote("labels", 3)["live_version"] == 3
    with pytest.raises(AdapterNotFound):
        store.promote("labels", 7)
    with pytest.raises(AdapterNotFound):
        store.promote("unknown", 1)
    assert leftovers(store.root / "labels") == []


def test_info_and_list(store, tmp_path):
    store.publish(
        "labels", make_source(tmp_path, "a"), {"metrics": {"val_accuracy": 0.5}, "source": "finetune", "job_id": "ft-9"}
    )
    store.publish("labels", make_source(tmp_path, "b"), {"metrics": {"val_accuracy": 0.9}})
    store.promote("labels", 1)
    store.publish("meters", make_source(tmp_path, "c"))
    info = store.info("labels")
    assert info["name"] == "labels" and info["live_version"] == 1 and info["latest_version"] == 2
    v1, v2 = info["versions"]
    assert v1["version"] == 1 and v1["live"] and v1["metrics"] == {"val_accuracy": 0.5}
    assert v1["source"] == "finetune" and v1["job_id"] == "ft-9" and v1["peft_type"] == "DUAL_LORA" and v1["r"] == 4
    assert v2["version"] == 2 and not v2["live"] and isinstance(v2["created_at"], int)
    listing = store.list()
    assert [a["name"] for a in listing] == ["labels", "meters"]
    assert listing[0]["live_version"] == 1 and listing[0]["versions"] == [1, 2]
    assert listing[0]["metrics"] == {"val_accuracy": 0.5}
    with pytest.raises(AdapterNotFound):
        store.info("nope")
    with pytest.raises(InvalidAdapterName):
        store.info("../adapters")


def test_info_of_a_hand_made_version_without_metadata(store, tmp_path):
    folder = store.root / "manual" / "1"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    info = store.info("manual")
    assert info["live_version"] == 1 and info["versions"][0]["metrics"] == {}
    assert isinstance(info["versions"][0]["created_at"], int)


def test_delete_versions_and_adapters(store, tmp_path):
    for tag in "abc":
        store.publish("labels", make_source(tmp_path, tag))
    with pytest.raises(Conflict):
        store.delete("labels", 3)  # live, with other versions
    assert store.delete("labels", 1)["deleted"]
    assert store.versions("labels") == [2, 3]
    with pytest.raises(AdapterNotFound):
        store.resolve("labels@1")
    with pytest.raises(AdapterNotFound):
        store.delete("labels", 1)
    store.promote("labels", 2)
    store.delete("labels", 3)
    assert store.versions("labels") == [2]
    store.delete("labels", 2)  # the only version, live: deletes the adapter
    assert store.names() == [] and not (store.root / "labels").exists()
    with pytest.raises(AdapterNotFound):
        store.resolve("labels")
    with pytest.raises(AdapterNotFound):
        store.delete("labels")

    store.publish("meters", make_source(tmp_path))
    store.publish("meters", make_source(tmp_path))
    store.delete("meters")  # the whole adapter, live version included
    assert not (store.root / "meters").exists()
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".")] == []
    assert not [p for p in store.root.iterdir() if p.name.startswith(".deleted-")]


def test_delete_keeps_an_implicit_live_version_live(store, tmp_path):
    store.publish("x", make_source(tmp_path))
    store.publish("x", make_source(tmp_path))
    (store.root / "x" / "live").unlink()
    with pytest.raises(Conflict):
        store.delete("x", 2)  # implicitly live (newest)
    store.delete("x", 1)
    assert store.live_version("x") == 2


def test_version_numbers_are_never_reused(store, tmp_path):
    store.publish("x", make_source(tmp_path))
    store.publish("x", make_source(tmp_path))
    store.promote("x", 1)
    store.delete("x", 2)
    assert store.publish("x", make_source(tmp_path)).version == 3
    store.delete("x")
    assert store.publish("x", make_source(tmp_path)).version == 4


def test_parse_reference():
    assert parse_reference("base") is None and parse_reference("") is None
    assert parse_reference("a-b.c_d@12") == ("a-b.c_d", 12)
    assert validate_name("line-inspection") == "line-inspection"
    for bad in ["a..b", "-x", "x@y", "x@1234567890"]:
        with pytest.raises(InvalidAdapterName):
            parse_reference(bad)


def _publish_many(root: str, source: str, count: int, queue) -> None:
    store = AdapterStore(Path(root))
    queue.put([store.publish("shared", Path(source), {"source": "proc"}).version for _ in range(count)])


def test_concurrent_publishers_in_processes_get_distinct_versions(store, tmp_path):
    src = make_source(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    n_procs, per_proc = 4, 5
    procs = [
        ctx.Process(target=_publish_many, args=(str(store.root), str(src), per_proc, queue)) for _ in range(n_procs)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    versions = sorted(v for r in results for v in r)
    assert versions == list(range(1, n_procs * per_proc + 1))
    assert store.versions("shared") == versions
    folder = store.root / "shared"
    assert leftovers(folder) == []
    for v in versions:  # every version is complete
        assert sorted(p.name for p in (folder / str(v)).iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "metadata.json",
            "metrics.json",
        ]
    assert store.live_version("shared") in versions
