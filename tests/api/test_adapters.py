"""/v1/adapters over HTTP (TestClient) on a tiny base: import, list, promote/rollback, delete, bad archives."""

from __future__ import annotations

import base64
import io
import json
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.routes import adapters
from service.config import Settings
from service.model.lora import AdapterConfig, save_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors")


def png_data_url(color=(200, 20, 20)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_adapter(base, tmp_path: Path, seed: int, fingerprint: str | None = None, peft_type="DUAL_LORA") -> Path:
    """A random adapter directory written by ``save_adapter`` (large B, so answers change)."""
    config = AdapterConfig(
        peft_type=peft_type, r=4, lora_alpha=8, base_model_fingerprint=fingerprint or base.fingerprint
    )
    adapter = base.slots.new_adapter(config, seed=seed)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1.0, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"adapter-{seed}-{peft_type}-{fingerprint or 'base'}"
    save_adapter(path, config, adapter)
    return path


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode="w:gz", links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def files_of(directory: Path, folder: str = "") -> dict[str, bytes]:
    prefix = f"{folder}/" if folder else ""
    return {prefix + f: (directory / f).read_bytes() for f in FILES}


@pytest.fixture()
def env(tiny_base_dir, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    data = tmp_path / "data"
    settings = Settings(model=tiny_base_dir, adapter_dir=store, data_dir=data, max_image_pixels=512 * 512)
    app = create_app(settings, load_in_background=False)
    if not any(getattr(r, "path", None) == "/v1/adapters" for r in app.routes):
        app.include_router(adapters.router)
    with TestClient(app) as c:
        yield c, tiny_base, tmp_path, store, data


def upload(client, name, archive: bytes, filename="adapter.zip", **fields):
    return client.post(
        "/v1/adapters",
        data={"name": name, **fields},
        files={"archive": (filename, archive, "application/octet-stream")},
    )


def ask(client, adapter: str | None = None):
    body = {"instruction": "What colour?", "images": [png_data_url()], "max_new_tokens": 6}
    url = "/v1/answer" if adapter is None else f"/v1/answer?adapter={adapter}"
    return client.post(url, json=body)


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error["message"]


def test_import_zip_and_tar_then_list_info_and_models(env):
    client, base, tmp, store, data = env
    a1, a2 = make_adapter(base, tmp, 1), make_adapter(base, tmp, 2, peft_type="LORA")
    r = upload(client, "line-inspection", zip_bytes(files_of(a1)))
    assert r.status_code == 201, r.text
    assert {k: r.json()[k] for k in ("name", "version", "live")} == {
        "name": "line-inspection",
        "version": 1,
        "live": True,
    }
    # a .tar.gz with the files inside one folder
    r = upload(client, "line-inspection", tar_bytes(files_of(a2, "my-adapter")), filename="a.tar.gz")
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2 and r.json()["live"] and r.json()["peft_type"] == "LORA"
    stored = store / "line-inspection" / "2" / "adapter_model.safetensors"
    assert stored.read_bytes() == (a2 / "adapter_model.safetensors").read_bytes()

    listing = client.get("/v1/adapters").json()
    assert listing["object"] == "list"
    [entry] = listing["data"]
    assert entry["name"] == "line-inspection" and entry["versions"] == [1, 2] and entry["live_version"] == 2

    info = client.get("/v1/adapters/line-inspection").json()
    assert info["live_version"] == 2
    assert [(v["version"], v["live"], v["peft_type"]) for v in info["versions"]] == [
        (1, False, "DUAL_LORA"),
        (2, True, "LORA"),
    ]
    assert info["versions"][0]["source"] == "upload" and isinstance(info["versions"][0]["created_at"], int)
    assert info["versions"][0]["metrics"] == {}
    one = client.get("/v1/adapters/line-inspection@1").json()
    assert one["version"] == 1 and one["name"] == "line-inspection"

    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["line-inspection"]["versions"] == [1, 2] and models["line-inspection"]["live_version"] == 2
    assert list((data / "uploads").iterdir()) == []  # temp dirs are cleaned up


def test_promote_and_rollback_change_what_answer_uses(env):
    client, base, tmp, _, _ = env
    for seed in (1, 2):
        assert upload(client, "labels", zip_bytes(files_of(make_adapter(base, tmp, seed)))).status_code == 201
    plain = ask(client).json()["answer"]
    v1 = ask(client, "labels@1").json()["answer"]
    v2 = ask(client, "labels@2").json()["answer"]
    assert len({plain, v1, v2}) == 3
    live = ask(client, "labels").json()
    assert live["adapter"] == {"name": "labels", "version": 2} and live["answer"] == v2

    r = client.post("/v1/adapters/labels/promote", json={"version": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "labels", "live_version": 1, "previous_live_version": 2}
    live = ask(client, "labels").json()
    assert live["adapter"] == {"name": "labels", "version": 1} and live["answer"] == v1
    assert client.get("/v1/adapters/labels").json()["live_version"] == 1

    assert client.post("/v1/adapters/labels/promote", json={"version": 2}).status_code == 200  # roll forward again
    assert ask(client, "labels").json()["answer"] == v2


def test_import_without_promote_keeps_the_live_version(env):
    client, base, tmp, _, _ = env
    assert upload(client, "labels", zip_bytes(files_of(make_adapter(base, tmp, 1)))).status_code == 201
    r = upload(client, "labels", zip_bytes(files_of(make_adapter(base, tmp, 2))), promote="false")
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["live"] is False
    assert r.json()["live_version"] == 1
    assert ask(client, "labels").json()["adapter"] == {"name": "labels", "version": 1}
    assert_error(upload(client, "labels", b"x", promote="maybe"), 422, "invalid_request")


def _bad_archives(base, tmp) -> dict[str, tuple[bytes, int, str, str]]:
    good = files_of(make_adapter(base, tmp, 1))
    other_base = files_of(make_adapter(base, tmp, 3, fingerprint="0" * 16))
    corrupt = {**good, "adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"}
    bad_config = {**good, "adapter_config.json": b"{not json"}
    bad_rank = {
        **good,
        "adapter_config.json": json.dumps({**json.loads(good["adapter_config.json"]), "r": 512}).encode(),
    }
    many = {**good, **{f"extra/{i}.txt": b"x" for i in range(20)}}
    return {
        "zip-slip": (zip_bytes({**good, "../../evil.txt": b"x"}), 422, "invalid_archive", "outside"),
        "zip-slip-tar": (tar_bytes({**good, "a/../../evil.txt": b"x"}), 422, "invalid_archive", "outside"),
        "absolute": (zip_bytes({**good, "/etc/evil": b"x"}), 422, "invalid_archive", "absolute"),
        "zip-symlink": (zip_bytes(good, symlinks={"link": "/etc/passwd"}), 422, "invalid_archive", "link"),
        "tar-symlink": (tar_bytes(good, links={"link": "/etc/passwd"}), 422, "invalid_archive", "link"),
        "not-an-archive": (b"just some text, not an archive", 415, "unsupported_media_type", "zip"),
        "png": (base64.b64decode(png_data_url().split(",")[1]), 415, "unsupported_media_type", "zip"),
        "truncated-zip": (zip_bytes(good)[:200], 422, "invalid_archive", "corrupt"),
        "too-many-members": (zip_bytes(many), 422, "invalid_archive", "members"),
        "missing-weights": (
            zip_bytes({"adapter_config.json": good["adapter_config.json"]}),
            422,
            "invalid_archive",
            "must hold",
        ),
        "nested-too-deep": (
            zip_bytes(files_of(make_adapter(base, tmp, 1), "a/b")),
            422,
            "invalid_archive",
            "must hold",
        ),
        "two-adapters": (
            zip_bytes({**good, **{f"x/{k}": v for k, v in good.items()}}),
            422,
            "invalid_archive",
            "more than one",
        ),
        "other-base": (zip_bytes(other_base), 422, "invalid_adapter", "trained for base"),
        "corrupt-safetensors": (zip_bytes(corrupt), 422, "invalid_adapter", "safetensors"),
        "bad-config": (zip_bytes(bad_config), 422, "invalid_adapter", "JSON"),
        "rank-too-large": (zip_bytes(bad_rank), 422, "invalid_adapter", "rank"),
    }


def test_bad_archives_are_refused_and_nothing_is_published(env):
    client, base, tmp, store, data = env
    for label, (archive, status, code, words) in _bad_archives(base, tmp).items():
        message = assert_error(upload(client, "labels", archive), status, code)
        assert words in message, (label, message)
    assert client.get("/v1/adapters").json()["data"] == []
    assert_error(client.get("/v1/adapters/labels"), 404, "adapter_not_found")
    assert not (tmp / "evil.txt").exists() and not (data / "evil.txt").exists()
    assert list((data / "uploads").iterdir()) == []


def test_size_caps_and_bombs(env, monkeypatch):
    client, base, tmp, _, _ = env
    good = files_of(make_adapter(base, tmp, 1))
    bomb = zip_bytes({**good, "padding.bin": bytes(4 * 1024 * 1024)})  # 4 MiB of zeros, a few KiB zipped
    assert len(bomb) < 64 * 1024
    monkeypatch.setattr(adapters, "MAX_EXTRACTED_BYTES", 1024 * 1024)
    assert_error(upload(client, "labels", bomb), 413, "payload_too_large")
    assert_error(
        upload(client, "labels", tar_bytes({**good, "padding.bin": bytes(4 * 1024 * 1024)})), 413, "payload_too_large"
    )
    monkeypatch.setattr(adapters, "MAX_UPLOAD_BYTES", 1024)
    assert_error(upload(client, "labels", zip_bytes(good)), 413, "payload_too_large")
    assert client.get("/v1/adapters").json()["data"] == []


def test_an_archive_member_larger_than_declared_is_refused(tmp_path):
    """A zip whose header understates a member's size (a classic bomb trick) never writes more."""
    data = b"A" * 4096
    raw = bytearray(zip_bytes({"adapter_config.json": b"{}", "adapter_model.safetensors": data}))
    # Patch the declared uncompressed size (local header and central directory) of the weights to 16.
    needle = (4096).to_bytes(4, "little")
    assert raw.count(needle) == 2
    raw = raw.replace(needle, (16).to_bytes(4, "little"))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(adapters.InvalidArchive):
        adapters.extract_adapter_archive(io.BytesIO(bytes(raw)), target)
    assert (
        not (target / "adapter_model.safetensors").exists()
        or (target / "adapter_model.safetensors").stat().st_size <= 16
    )


@pytest.mark.parametrize("name", ["../evil", "Bad Name", "base", "none", "x@2", "a/b", ".hidden", "a" * 80, ""])
def test_bad_names_are_refused(env, name):
    client, base, tmp, store, _ = env
    r = upload(client, name, zip_bytes(files_of(make_adapter(base, tmp, 1))))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("invalid_adapter_name", "invalid_request")
    assert not store.exists() or [p for p in store.iterdir() if not p.name.startswith(".")] == []


def test_wrong_request_shapes(env):
    client, base, tmp, _, _ = env
    assert_error(client.post("/v1/adapters", json={"name": "x"}), 415, "unsupported_media_type")
    assert_error(client.post("/v1/adapters", data={"name": "x"}), 415, "unsupported_media_type")  # urlencoded
    r = client.post("/v1/adapters", data={"name": "x"}, files={"other": ("a.txt", b"x")})
    assert_error(r, 422, "invalid_request")
    r = client.post("/v1/adapters", files={"archive": ("a.zip", zip_bytes(files_of(make_adapter(base, tmp, 1))))})
    assert_error(r, 422, "invalid_request")


def test_unknown_adapters_and_versions_are_404(env):
    client, base, tmp, _, _ = env
    assert_error(client.get("/v1/adapters/nope"), 404, "adapter_not_found")
    assert_error(client.post("/v1/adapters/nope/promote", json={"version": 1}), 404, "adapter_not_found")
    assert_error(client.delete("/v1/adapters/nope"), 404, "adapter_not_found")
    assert_error(client.delete("/v1/adapters/nope@1"), 404, "adapter_not_found")
    assert upload(client, "labels", zip_bytes(files_of(make_adapter(base, tmp, 1)))).status_code == 201
    assert_error(client.get("/v1/adapters/labels@5"), 404, "adapter_not_found")
    assert_error(client.post("/v1/adapters/labels/promote", json={"version": 5}), 404, "adapter_not_found")
    assert_error(client.delete("/v1/adapters/labels@5"), 404, "adapter_not_found")
    assert_error(client.post("/v1/adapters/labels/promote", json={"version": 0}), 422, "invalid_request")
    assert_error(client.post("/v1/adapters/labels/promote", json={"version": "x"}), 422, "invalid_request")
    assert_error(client.post("/v1/adapters/labels/promote", json={}), 422, "invalid_request")
    assert_error(client.post("/v1/adapters/labels@1/promote", json={"version": 1}), 422, "invalid_adapter_name")
    assert_error(client.get("/v1/adapters/..%2Fetc"), 404, "not_found")
    assert_error(client.get("/v1/adapters/Bad"), 422, "invalid_adapter_name")
    assert_error(client.delete("/v1/adapters/base"), 422, "invalid_adapter_name")


def test_delete_versions_and_adapters(env):
    client, base, tmp, store, _ = env
    for seed in (1, 2, 3):
        assert upload(client, "labels", zip_bytes(files_of(make_adapter(base, tmp, seed)))).status_code == 201
    assert ask(client, "labels@1").status_code == 200  # loaded into a slot
    message = assert_error(client.delete("/v1/adapters/labels@3"), 409, "conflict")
    assert "live" in message

    r = client.delete("/v1/adapters/labels@1")
    assert r.status_code == 200 and r.json()["deleted"] and r.json()["version"] == 1
    assert_error(ask(client, "labels@1"), 404, "adapter_not_found")
    assert client.get("/v1/adapters/labels").json()["latest_version"] == 3
    assert [v["version"] for v in client.get("/v1/adapters/labels").json()["versions"]] == [2, 3]

    assert client.delete("/v1/adapters/labels").status_code == 200  # the whole adapter, live version included
    assert_error(ask(client, "labels"), 404, "adapter_not_found")
    assert_error(ask(client, "labels@2"), 404, "adapter_not_found")
    assert_error(client.get("/v1/adapters/labels"), 404, "adapter_not_found")
    assert "labels" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.get("/v1/adapters").json()["data"] == []
    assert not (store / "labels").exists()

    # a re-created adapter never reuses a version number (caches keyed on name@version stay right)
    r = upload(client, "labels", zip_bytes(files_of(make_adapter(base, tmp, 2))))
    assert r.status_code == 201 and r.json()["version"] == 4
    assert ask(client, "labels").json()["answer"] == ask(client, "labels@4").json()["answer"]


def test_reads_work_before_the_model_loads_and_import_needs_it(tmp_path):
    store = tmp_path / "adapters"
    (store / "labels" / "1").mkdir(parents=True)
    (store / "labels" / "1" / "adapter_config.json").write_text("{}")
    settings = Settings(model=tmp_path / "missing", adapter_dir=store, data_dir=tmp_path / "data")
    app = create_app(settings, load_in_background=False)
    if not any(getattr(r, "path", None) == "/v1/adapters" for r in app.routes):
        app.include_router(adapters.router)
    with TestClient(app) as c:
        assert [a["name"] for a in c.get("/v1/adapters").json()["data"]] == ["labels"]
        assert c.get("/v1/adapters/labels").json()["live_version"] == 1
        r = c.post("/v1/adapters", data={"name": "x"}, files={"archive": ("a.zip", b"PK")})
        assert_error(r, 503, "not_ready")


def test_the_adapters_routes_and_store_do_not_import_torch():
    code = (
        "import sys, service.api.routes.adapters, service.registry.store; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_a_peft_saved_lora_directory(env):
    """People bring adapters saved by ``peft``: the whole directory zipped (README included) imports."""
    peft = pytest.importorskip("peft")
    from transformers import LlavaForConditionalGeneration

    client, base, tmp, _, _ = env
    plain = LlavaForConditionalGeneration.from_pretrained(client.app.state.settings.model).eval()
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, exclude_modules=r".*vision_tower.*"
    )
    peft_model = peft.get_peft_model(plain, lora_config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp / "peft-adapter")
    members = {p.name: p.read_bytes() for p in (tmp / "peft-adapter").iterdir() if p.is_file()}
    assert set(FILES) <= set(members)
    r = upload(client, "peft-lora", zip_bytes({f"peft-adapter/{k}": v for k, v in members.items()}))
    assert r.status_code == 201, r.text
    assert r.json()["peft_type"] == "LORA" and r.json()["version"] == 1
    answer = ask(client, "peft-lora")
    assert answer.status_code == 200 and answer.json()["adapter"] == {"name": "peft-lora", "version": 1}
