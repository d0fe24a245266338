"""Property-based fuzzing of every parser of untrusted input: only clean 4xx-class errors, never a crash.

Runs derandomised (the same examples every run) with bounded example counts, so CI is stable;
`HYPOTHESIS_PROFILE=deep pytest tests/test_fuzz.py` runs many more.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.api.auth import KeyFile
from service.api.images import decode_base64, decode_image
from service.config import Settings
from service.errors import ServiceError
from service.model.lora.config import AdapterConfig, AdapterConfigError
from service.registry.store import parse_reference
from service.training.dataset import DatasetLimits, parse_dataset

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@given(st.text(max_size=80))
def test_adapter_references(text):
    try:
        parsed = parse_reference(text)
    except ServiceError as exc:
        assert exc.status == 422
        return
    if parsed is not None:
        name, version = parsed
        assert "/" not in name and ".." not in name and (version is None or version >= 0)


@given(st.binary(max_size=2048))
def test_image_bytes(data):
    try:
        image = decode_image(data, max_bytes=1 << 20, max_pixels=1 << 16)
    except ServiceError as exc:
        assert exc.status in (413, 422)
    else:
        assert image.mode == "RGB"


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()))
def test_base64_images_and_data_urls(text):
    for candidate in (text, "data:image/png;base64," + text):
        try:
            decode_image(decode_base64(candidate, max_bytes=1 << 20), max_bytes=1 << 20, max_pixels=1 << 16)
        except ServiceError as exc:
            assert exc.status in (413, 422)


def _valid_zip() -> bytes:
    buf = io.BytesIO()
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(png, format="PNG")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("imgs/a.png", png.getvalue())
        zf.writestr("data.jsonl", json.dumps({"image": "imgs/a.png", "instruction": "q", "answer": "a"}) + "\n")
    return buf.getvalue()


VALID_ZIP = _valid_zip()


@given(st.data())
def test_dataset_archives_mutated(data):
    blob = bytearray(VALID_ZIP)
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        parse_dataset(bytes(blob), "d.zip", DatasetLimits())
    except ServiceError as exc:
        assert exc.status in (413, 415, 422)


@given(st.lists(json_values, max_size=5))
def test_dataset_jsonl_records(records):
    text = "\n".join(json.dumps(r) for r in records).encode()
    try:
        parse_dataset(text, "d.jsonl", DatasetLimits())
    except ServiceError as exc:
        assert exc.status in (413, 415, 422)


@given(st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "use_dora", "bias",
                                        "lora_dropout", "use_rslora"]), json_values, max_size=8))
def test_adapter_configs(data):
    try:
        AdapterConfig.from_dict(data)
    except AdapterConfigError:
        pass


@given(json_values)
def test_key_files(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(value))
    try:
        KeyFile.load(path)
    except ValueError:
        pass


@pytest.fixture(scope="module")
def client(tiny_base_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    app_settings = Settings(model=tiny_base_dir, adapter_dir=tmp / "a", data_dir=tmp / "d", embedded_trainer=False,
                            max_new_tokens=8)
    with TestClient(create_app(app_settings, load_in_background=False)) as c:
        yield c


answer_bodies = st.fixed_dictionaries(
    {}, optional={"instruction": json_values | st.text(max_size=30), "images": json_values, "adapter": json_values,
                  "max_new_tokens": json_values, "temperature": json_values, "stream": json_values},
)


@given(answer_bodies)
def test_answer_endpoint_never_fails_with_5xx(client, body):
    r = client.post("/v1/answer", json=body)
    assert r.status_code < 500, r.text
    assert r.status_code == 200 or "error" in r.json()


chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["base", "nope", ""]) | json_values},
    optional={"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"])},
                                                         optional={"content": json_values}), max_size=3) | json_values,
              "max_tokens": json_values, "temperature": json_values, "n": json_values},
)


@given(chat_bodies)
def test_chat_endpoint_never_fails_with_5xx(client, body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code < 500, r.text


@given(st.text(max_size=40), st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4))
def test_job_and_adapter_routes_never_fail_with_5xx(client, ident, params):
    from urllib.parse import quote

    if not ident:
        return
    quoted = quote(ident, safe="")
    for path in (f"/v1/finetune/{quoted}", f"/v1/finetune/{quoted}/events", f"/v1/adapters/{quoted}"):
        r = client.get(path, params=params)
        assert r.status_code < 500, (path, r.text)
