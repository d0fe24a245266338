"""/v1/answer over HTTP (TestClient) on a tiny base, with and without adapters, and bad input."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.config import Settings
from tests.helpers import png, publish_random_adapter


@pytest.fixture()
def client(tiny_base_dir, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    publish_random_adapter(tiny_base, store, "line-inspection", 1, seed=1)
    publish_random_adapter(tiny_base, store, "line-inspection", 2, seed=2)
    (store / "line-inspection" / "live").write_text("1\n")
    settings = Settings(model=tiny_base_dir, adapter_dir=store, data_dir=tmp_path / "data", max_image_pixels=512 * 512)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "line-inspection" in ids


def test_json_and_multipart_answers_agree(client):
    image = png()
    as_json = client.post(
        "/v1/answer",
        json={"instruction": "What colour is the part?", "images": [base64.b64encode(image).decode()], "max_new_tokens": 5},
    )
    as_form = client.post(
        "/v1/answer",
        data={"instruction": "What colour is the part?", "max_new_tokens": "5"},
        files={"image": ("a.png", image, "image/png")},
    )
    assert as_json.status_code == 200, as_json.text
    assert as_form.status_code == 200, as_form.text
    a, b = as_json.json(), as_form.json()
    assert a["answer"] == b["answer"] and a["adapter"] is None
    assert a["usage"]["completion_tokens"] <= 5 and a["usage"]["prompt_tokens"] > 16
    # The documented timing fields, with the batch size a JSON integer (docs/api.md).
    assert set(a["timing_ms"]) == {"queue", "batch", "vision", "prefill", "decode", "batch_size"}
    assert type(a["timing_ms"]["batch_size"]) is int and a["timing_ms"]["batch_size"] >= 1
    assert all(a["timing_ms"][k] >= 0 for k in ("queue", "batch", "vision", "prefill", "decode"))


def test_adapter_selection_by_query_body_and_version(client):
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = {"instruction": "What colour?", "images": [image], "max_new_tokens": 6}
    base = client.post("/v1/answer", json=body).json()
    live = client.post("/v1/answer?adapter=line-inspection", json=body).json()
    v1 = client.post("/v1/answer", json={**body, "adapter": "line-inspection@1"}).json()
    v2 = client.post("/v1/answer", json={**body, "adapter": "line-inspection@2"}).json()
    assert live["adapter"] == {"name": "line-inspection", "version": 1}
    assert v2["adapter"] == {"name": "line-inspection", "version": 2}
    assert live["answer"] == v1["answer"]
    assert len({base["answer"], v1["answer"], v2["answer"]}) == 3


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"json": {"instruction": "", "max_new_tokens": 2}}, 422, "invalid_request"),
        ({"json": {"instruction": "   "}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "max_new_tokens": 100000}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "temperature": -1}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "surprise": 1}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "images": ["not base64!"]}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "images": [base64.b64encode(b"not an image").decode()]}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "images": ["https://example.com/a.png"]}}, 422, "invalid_request"),
        ({"json": {"instruction": "hi", "images": ["x"] * 5}}, 413, "payload_too_large"),
        ({"json": {"instruction": "hi", "adapter": "nope"}}, 404, "adapter_not_found"),
        ({"json": {"instruction": "hi", "adapter": "line-inspection@9"}}, 404, "adapter_not_found"),
        ({"json": {"instruction": "hi", "adapter": "../../etc"}}, 422, "invalid_adapter_name"),
        ({"json": {"instruction": "hi", "adapter": "line-inspection@x"}}, 422, "invalid_adapter_name"),
        ({"json": {"instruction": "word " * 400}}, 422, "invalid_request"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"{bad", "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
        ({"content": b"[1]", "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client, kwargs, status, code):
    response = client.post("/v1/answer", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


def test_oversized_and_corrupt_image_uploads(client):
    huge = png(size=(600, 600))  # over the 512*512 pixel cap set in the fixture
    r = client.post("/v1/answer", data={"instruction": "hi"}, files={"image": ("a.png", huge, "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
    corrupt = png()[:60]
    r = client.post("/v1/answer", data={"instruction": "hi"}, files={"image": ("a.png", corrupt, "image/png")})
    assert r.status_code == 422


def test_not_ready_is_503(tiny_base_dir, tmp_path):
    settings = Settings(model=tmp_path / "missing", adapter_dir=tmp_path)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert c.post("/v1/answer", json={"instruction": "hi"}).status_code == 503


def test_the_http_layer_does_not_import_torch():
    code = "import sys, service.api.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decompression_bomb_is_refused_before_decoding(client):
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")  # 144 Mpixel in a few hundred KB
    assert len(buf.getvalue()) < 1_000_000
    r = client.post("/v1/answer", data={"instruction": "hi"}, files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_too_many_uploaded_images(client):
    files = [("image", (f"{i}.png", png(), "image/png")) for i in range(5)]
    r = client.post("/v1/answer", data={"instruction": "hi"}, files=files)
    assert r.status_code in (400, 413) and "error" in r.json()


def test_a_full_queue_answers_429_with_retry_after(tiny_base_dir, tmp_path):
    import threading
    import time

    settings = Settings(model=tiny_base_dir, adapter_dir=tmp_path / "a", data_dir=tmp_path / "d",
                        max_queue=1, max_batch_size=1, embedded_trainer=False)
    with TestClient(create_app(settings, load_in_background=False)) as client:
        engine = client.app.state.engine
        gate, entered, original = threading.Event(), threading.Event(), engine._admit

        def held(batch):
            entered.set()
            gate.wait(30)
            original(batch)

        engine._admit = held
        body = {"instruction": "hi", "max_new_tokens": 2}
        results = []

        def ask():
            results.append(client.post("/v1/answer", json=body))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        threads[0].start()
        assert entered.wait(30)  # the worker holds the first request
        threads[1].start()
        deadline = time.time() + 30
        while engine._queue.qsize() < 1 and time.time() < deadline:  # the second fills the queue
            time.sleep(0.01)
        refused = client.post("/v1/answer", json=body)
        gate.set()
        for t in threads:
            t.join()
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        assert [r.status_code for r in results] == [200, 200]


def test_image_over_the_byte_cap_is_413(tiny_base_dir, tmp_path):
    settings = Settings(model=tiny_base_dir, adapter_dir=tmp_path / "a", data_dir=tmp_path / "d",
                        max_image_bytes=2048, embedded_trainer=False)
    noisy = Image.effect_noise((64, 64), 64).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert len(buf.getvalue()) > 2048
    with TestClient(create_app(settings, load_in_background=False)) as client:
        r = client.post("/v1/answer", data={"instruction": "hi"}, files={"image": ("n.png", buf.getvalue(), "image/png")})
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


def png_of(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 20, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_only_small_images_are_decoded_on_the_event_loop():
    from service.api.images import INLINE_MAX_BYTES, cheap_to_decode, small_base64

    small, wide = png_of(96, 96), png_of(2048, 1024)  # the wide one is a few kB, but 2 megapixels
    assert len(wide) < INLINE_MAX_BYTES
    assert cheap_to_decode([]) and cheap_to_decode([small, small])
    assert not cheap_to_decode([wide]) and not cheap_to_decode([small, wide])
    assert not cheap_to_decode([b"not an image"])
    assert not cheap_to_decode([small + bytes(INLINE_MAX_BYTES)])  # too many bytes, whatever they are
    text = base64.b64encode(small).decode()
    assert small_base64([text, "data:image/png;base64," + text])
    assert not small_base64([base64.b64encode(bytes(INLINE_MAX_BYTES + 10)).decode()])


def test_small_requests_skip_the_thread_pool_and_large_ones_take_it(client, monkeypatch):
    """Decoding a small image costs less than handing it to the thread pool and back, so it runs on
    the event loop; a large one (or a bad one) still goes to the pool. Answers are the same."""
    import service.api.rows as rows

    trips: list[str] = []
    original = rows.run_in_threadpool

    async def counted(fn, *args, **kwargs):
        trips.append("pool")
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(rows, "run_in_threadpool", counted)
    big = png_of(1100, 1000)  # over INLINE_MAX_PIXELS (and over this server's 512x512 cap: refused)
    small = png_of(200, 200)
    ask = {"instruction": "What colour?", "max_new_tokens": "4"}
    inline = client.post("/v1/answer", data=ask, files={"image": ("a.png", small, "image/png")})
    as_json = client.post("/v1/answer", json={**ask, "max_new_tokens": 4, "images": [base64.b64encode(small).decode()]})
    assert inline.status_code == as_json.status_code == 200 and trips == []
    assert inline.json()["answer"] == as_json.json()["answer"]
    refused = client.post("/v1/answer", data=ask, files={"image": ("b.png", big, "image/png")})
    assert refused.status_code == 413 and trips == ["pool"]  # (decoded off the loop, refused there)
    bad = client.post("/v1/answer", data=ask, files={"image": ("c.png", b"not an image", "image/png")})
    assert bad.status_code == 422 and trips == ["pool", "pool"]
    text_only = client.post("/v1/answer", json={"instruction": "hi", "max_new_tokens": 2})
    assert text_only.status_code == 200 and len(trips) == 2


def test_an_image_sent_again_is_not_decoded_or_hashed_again(client, monkeypatch):
    """Uploads decoded before are known by a hash of their bytes: the same bytes again, as a file or
    as base64, skip decoding and reach the engine under the same key (so its caches hit); bad or
    refused uploads are never kept, and are refused again."""
    import service.api.images as images

    decoded: list[int] = []
    original = images.decode_image

    def counted(data, *args, **kwargs):
        decoded.append(len(data))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(images, "decode_image", counted)
    engine = client.app.state.engine
    submitted = []
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda job, *a: submitted.append(job) or real_submit(job, *a))
    first, second = png_of(90, 60), png_of(60, 90)
    ask = {"instruction": "What colour?", "max_new_tokens": "4"}
    as_file = client.post("/v1/answer", data=ask, files={"image": ("a.png", first, "image/png")})
    assert as_file.status_code == 200 and len(decoded) == 1
    as_json = client.post("/v1/answer", json={**ask, "max_new_tokens": 4, "images": [base64.b64encode(first).decode()]})
    assert as_json.status_code == 200 and len(decoded) == 1
    assert as_json.json()["answer"] == as_file.json()["answer"]
    both = client.post("/v1/answer", data=ask, files=[("image", ("a.png", first, "image/png")),
                                                      ("image", ("b.png", second, "image/png"))])
    assert both.status_code == 200 and decoded == [len(first), len(second)]  # only the new one
    keys = [job.image_keys for job in submitted]
    assert keys[0] == keys[1] == [images.content_key(first)] and keys[2] == [keys[0][0], images.content_key(second)]
    assert submitted[1].images[0].size == (90, 60)
    assert engine.cache.get(images.content_key(second)) is not None  # (the engine's features, under that key)
    url = "data:image/png;base64," + base64.b64encode(first).decode()
    chat = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert chat.status_code == 200 and len(decoded) == 2 and submitted[-1].image_keys == keys[0]
    for _ in range(2):
        bad = client.post("/v1/answer", data=ask, files={"image": ("c.png", b"not an image", "image/png")})
        refused = client.post("/v1/answer", data=ask, files={"image": ("d.png", png_of(600, 600), "image/png")})
        assert (bad.status_code, refused.status_code) == (422, 413)
    assert len(decoded) == 2 + 4
    metrics = client.get("/metrics").text
    assert 'service_decoded_image_lookups_total{result="hit"}' in metrics


def test_decoded_images_are_bounded_and_can_be_turned_off(monkeypatch):
    import service.api.images as images
    from service.api.images import INLINE_MAX_BYTES, DecodedImages

    small = [png_of(10 + i, 10) for i in range(3)]  # 300, 330 and 360 bytes of RGB
    cache = DecodedImages(capacity_bytes=400)
    for data in small:
        cache.decode(data, 1 << 20, 1 << 20)
    found, looked_up = cache.known(small)
    assert looked_up and [entry is not None for entry in found] == [False, False, True]  # the last one fits
    assert cache.known([small[2]])[0][0].image.size == (12, 10)
    off = DecodedImages(capacity_bytes=0)
    off.decode(small[0], 1 << 20, 1 << 20)
    assert off.known([small[0]]) == ([None], False)
    large = png_of(1100, 1000) + bytes(INLINE_MAX_BYTES)  # (a PNG decoder ignores bytes after the end)
    roomy = DecodedImages(capacity_bytes=1 << 30)
    first = roomy.decode(large, 1 << 30, 1 << 30)
    assert roomy.decode(large, 1 << 30, 1 << 30) is first  # looked up off the event loop
    hashed: list[int] = []
    monkeypatch.setattr(images, "content_key", lambda data: hashed.append(len(data)) or "k")
    assert roomy.known([large]) == ([None], False) and hashed == []  # (not hashed on the event loop)
