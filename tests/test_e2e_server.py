"""End to end: a real uvicorn server in a subprocess, the official openai client, SSE, hot swap."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import free_port, png, publish_random_adapter


@pytest.fixture()
def server(tiny_base_dir, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    publish_random_adapter(tiny_base, store, "line-inspection", 1, seed=1)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--model", str(tiny_base_dir), "--adapter-dir", str(store),
         "--data-dir", str(tmp_path / "data"), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("server did not become ready")
        yield url, store, tiny_base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def data_url(color=(200, 20, 20)) -> str:
    return "data:image/png;base64," + base64.b64encode(png(color)).decode()


def test_answer_with_and_without_adapter_and_hot_swap(server):
    url, store, base = server
    files = {"image": ("part.png", png(), "image/png")}
    plain = httpx.post(url + "/v1/answer", data={"instruction": "What colour?", "max_new_tokens": "6"}, files=files)
    v1 = httpx.post(url + "/v1/answer?adapter=line-inspection", data={"instruction": "What colour?", "max_new_tokens": "6"}, files=files)
    assert plain.status_code == v1.status_code == 200
    assert plain.json()["adapter"] is None and v1.json()["adapter"] == {"name": "line-inspection", "version": 1}
    assert plain.json()["answer"] != v1.json()["answer"]
    assert plain.headers["x-request-id"]

    publish_random_adapter(base, store, "line-inspection", 2, seed=2)  # no restart
    v2 = httpx.post(url + "/v1/answer?adapter=line-inspection", data={"instruction": "What colour?", "max_new_tokens": "6"}, files=files)
    assert v2.json()["adapter"]["version"] == 2 and v2.json()["answer"] != v1.json()["answer"]

    # The same image and question on the base again: its image prefix comes from the cache, same answer.
    again = httpx.post(url + "/v1/answer", data={"instruction": "What colour?", "max_new_tokens": "6"}, files=files)
    assert again.json()["answer"] == plain.json()["answer"]

    metrics = httpx.get(url + "/metrics").text
    assert 'service_adapter_requests_total{adapter="line-inspection"}' in metrics
    assert 'service_prefix_cache_lookups_total{result="hit"} 1.0' in metrics
    assert 'service_prefix_cache_lookups_total{result="miss"} 3.0' in metrics
    assert "service_batch_size_bucket" in metrics


def test_answer_streams_server_sent_events(server):
    url, _, _ = server
    body = {"instruction": "What colour?", "images": [data_url()], "max_new_tokens": 8, "stream": True}
    deltas, done = [], None
    with httpx.stream("POST", url + "/v1/answer", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                payload = json.loads(line[6:])
                if event == "done":
                    done = payload
                else:
                    deltas.append(payload["delta"])
                event = None
    plain = httpx.post(url + "/v1/answer", json={**body, "stream": False}, timeout=60).json()
    assert done is not None and done["answer"] == plain["answer"]
    assert "".join(deltas).strip() == plain["answer"]


def test_openai_client_chat_completions_streaming_and_not(server):
    openai = pytest.importorskip("openai")
    url, _, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert "line-inspection" in models
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What colour is the part?"},
        {"type": "image_url", "image_url": {"url": data_url()}},
    ]}]
    full = client.chat.completions.create(model="line-inspection", messages=messages, max_tokens=6)
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens >= 1
    base_model = models[0]
    on_base = client.chat.completions.create(model=base_model, messages=messages, max_tokens=6)
    assert on_base.choices[0].message.content != full.choices[0].message.content

    pieces = []
    for chunk in client.chat.completions.create(model="line-inspection", messages=messages, max_tokens=6, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces).strip() == full.choices[0].message.content

    with pytest.raises(openai.UnprocessableEntityError, match="remote image URLs"):
        client.chat.completions.create(model="line-inspection", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_concurrent_clients_get_batched(server):
    url, _, _ = server
    import concurrent.futures

    def ask(i):
        adapter = "line-inspection" if i % 2 else "base"
        return httpx.post(url + f"/v1/answer?adapter={adapter}", json={"instruction": "What colour?",
                          "images": [data_url((i * 20 % 255, 40, 40))], "max_new_tokens": 8}, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert all("answer" in r for r in results)
    assert max(r["timing_ms"]["batch_size"] for r in results) > 1


def test_finetune_cli_uploads_and_follows_the_job(server, tmp_path):
    from tests.api.test_finetune import colour_zip

    url, _, _ = server
    dataset = tmp_path / "colours.zip"
    dataset.write_bytes(colour_zip(2))
    done = subprocess.run(
        [sys.executable, "-m", "service", "finetune", str(dataset), "--adapter", "cli-colours", "--url", url, "--wait",
         "--epochs", "2", "--rank", "4", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded" and result["result"]["adapter"] == "cli-colours"
    assert "queued ftjob-" in done.stderr and "step" in done.stderr  # the progress bar
    answer = httpx.post(url + "/v1/answer?adapter=cli-colours", json={"instruction": "What colour?", "max_new_tokens": 3})
    assert answer.json()["adapter"]["name"] == "cli-colours"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n')
    refused = subprocess.run([sys.executable, "-m", "service", "finetune", str(bad), "--adapter", "x", "--url", url],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "line 1" in refused.stderr
