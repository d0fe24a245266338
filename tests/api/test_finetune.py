"""/v1/finetune over HTTP on a tiny base: queue → train → publish → serve, with bad input, cancel, recovery."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.config import Settings
from service.training.jobs import JobStore

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def colour_image(name: str, shade: int) -> bytes:
    r, g, b = COLOURS[name]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (max(0, r - shade), max(0, g - shade), max(0, b - shade))).save(buf, format="PNG")
    return buf.getvalue()


def colour_zip(n_per_colour: int = 8) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        lines = []
        for name in COLOURS:
            for k in range(n_per_colour):
                path = f"imgs/{name}-{k}.png"
                zf.writestr(path, colour_image(name, 3 * k))
                lines.append(json.dumps({"image": path, "instruction": "What colour is it?", "answer": name}))
        zf.writestr("data.jsonl", "\n".join(lines) + "\n")
    return buf.getvalue()


HYPER = {"rank": "8", "alpha": "16", "epochs": "6", "learning_rate": "0.003", "batch_size": "8",
         "validation_split": "0.25", "seed": "1"}


def make_client(base_dir, tmp_path, **overrides) -> TestClient:
    settings = Settings(model=base_dir, adapter_dir=tmp_path / "adapters", data_dir=tmp_path / "data",
                        n_slots=2, max_rank=16, **overrides)
    return TestClient(create_app(settings, load_in_background=False))


def wait_for(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/finetune/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    pytest.fail(f"job stuck: {job}")


def held_out_accuracy(client, adapter: str | None) -> float:
    hits = total = 0
    for name in COLOURS:
        for shade in (1, 10, 20):
            files = {"image": ("x.png", colour_image(name, shade), "image/png")}
            url = "/v1/answer" + (f"?adapter={adapter}" if adapter else "")
            r = client.post(url, data={"instruction": "What colour is it?", "max_new_tokens": "4"}, files=files)
            assert r.status_code == 200, r.text
            hits += r.json()["answer"].strip() == name
            total += 1
    return hits / total


def test_finetune_publishes_a_version_that_answers_better_while_serving(learnable_base_dir, tmp_path):
    with make_client(learnable_base_dir, tmp_path) as client:
        before = held_out_accuracy(client, None)
        r = client.post("/v1/finetune", data={"adapter": "colours", **HYPER},
                        files={"dataset": ("colours.zip", colour_zip(), "application/zip")})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["n_examples"] == 24

        served, stop = [], threading.Event()

        def keep_asking():  # other traffic while the job trains
            while not stop.is_set():
                served.append(client.post("/v1/answer", json={"instruction": "hi", "max_new_tokens": 2}).status_code)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            done = wait_for(client, job["id"])
        finally:
            stop.set()
            asker.join()
        assert done["status"] == "succeeded", done
        assert served and set(served) == {200}
        assert done["result"]["adapter"] == "colours" and done["result"]["version"] == 1
        assert done["progress"]["step"] == done["progress"]["total_steps"] == 6 * 3
        assert done["metrics"]["val_accuracy"] >= 0.8

        events = client.get(f"/v1/finetune/{job['id']}/events").json()["data"]
        messages = " | ".join(e["message"] for e in events)
        assert "step 18/18" in messages and "validation" in messages and "published colours@1" in messages

        info = client.get("/v1/adapters/colours").json()
        assert info["live_version"] == 1
        # No target_modules in the request: the job adapts every linear the server has slots on.
        assert sorted(info["versions"][0]["target_modules"]) == sorted(Settings().adapter_targets)
        assert len(Settings().adapter_targets) == 7
        after = held_out_accuracy(client, "colours")
        assert after >= before + 0.3 and after >= 0.8, (before, after)
        assert [j["id"] for j in client.get("/v1/finetune").json()["data"]] == [job["id"]]

        # if_better: a job that cannot beat the live version publishes without going live.
        worse = client.post("/v1/finetune", data={"adapter": "colours", **HYPER, "epochs": "1", "learning_rate": "0.00001",
                                                  "promote": "if_better"},
                            files={"dataset": ("colours.zip", colour_zip(), "application/zip")}).json()
        done = wait_for(client, worse["id"])
        assert done["status"] == "succeeded" and done["result"] == {"adapter": "colours", "version": 2, "live": False}
        assert client.get("/v1/adapters/colours").json()["live_version"] == 1


@pytest.mark.parametrize(
    "files,data,status,fragment",
    [
        ({"dataset": ("d.zip", b"PK\x03\x04garbage", "application/zip")}, {"adapter": "x"}, 422, ""),
        ({"dataset": ("d.txt", b"hello world", "text/plain")}, {"adapter": "x"}, 415, ""),
        ({"dataset": ("d.jsonl", b'{"instruction": "q", "answer": ""}\n', "application/jsonl")}, {"adapter": "x"}, 422, "line 1"),
        ({"dataset": ("d.zip", colour_zip(1), "application/zip")}, {"adapter": "../x"}, 422, ""),
        ({"dataset": ("d.zip", colour_zip(1), "application/zip")}, {"adapter": "x", "rank": "999"}, 422, "rank"),
        ({"dataset": ("d.zip", colour_zip(1), "application/zip")}, {"adapter": "x", "epochs": "0"}, 422, "epochs"),
        ({"dataset": ("d.zip", colour_zip(1), "application/zip")}, {"adapter": "x", "method": "moe"}, 422, "method"),
        ({"dataset": ("d.zip", colour_zip(1), "application/zip")}, {"adapter": "x", "bogus": "1"}, 422, "bogus"),
        ({}, {"adapter": "x"}, 415, "multipart"),
        ({"other": ("o.txt", b"x", "text/plain")}, {"adapter": "x"}, 422, "dataset"),
    ],
)
def test_invalid_requests_are_refused_and_nothing_is_queued(tiny_base_dir, tmp_path, files, data, status, fragment):
    with make_client(tiny_base_dir, tmp_path, embedded_trainer=False) as client:
        r = client.post("/v1/finetune", data=data, files=files or None)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]["message"]
        assert client.get("/v1/finetune").json()["data"] == []


def test_cancel_a_queued_job_and_unknown_jobs(tiny_base_dir, tmp_path):
    with make_client(tiny_base_dir, tmp_path, embedded_trainer=False) as client:
        job = client.post("/v1/finetune", data={"adapter": "c", **HYPER},
                          files={"dataset": ("c.zip", colour_zip(2), "application/zip")}).json()
        assert job["status"] == "queued"
        assert client.post(f"/v1/finetune/{job['id']}/cancel").json()["status"] == "cancelled"
        assert client.post(f"/v1/finetune/{job['id']}/cancel").status_code == 409
        assert client.get("/v1/finetune/ftjob-nope").status_code == 404


def test_cancel_a_running_job(tiny_base_dir, tmp_path):
    with make_client(tiny_base_dir, tmp_path) as client:
        job = client.post("/v1/finetune", data={"adapter": "c", **HYPER, "epochs": "100", "batch_size": "1"},
                          files={"dataset": ("c.zip", colour_zip(2), "application/zip")}).json()
        deadline = time.time() + 120
        while client.get(f"/v1/finetune/{job['id']}").json()["progress"].get("step", 0) < 1:
            assert time.time() < deadline, "the job never started stepping"
            time.sleep(0.1)
        client.post(f"/v1/finetune/{job['id']}/cancel")
        done = wait_for(client, job["id"])
        assert done["status"] == "cancelled"
        assert 0 < done["progress"]["step"] < done["progress"]["total_steps"]
        assert client.get("/v1/adapters/c").status_code == 404


def test_a_job_left_running_by_a_dead_process_is_resumed_on_restart(tiny_base_dir, tmp_path):
    with make_client(tiny_base_dir, tmp_path, embedded_trainer=False) as client:
        job = client.post("/v1/finetune", data={"adapter": "r", **HYPER, "epochs": "2"},
                          files={"dataset": ("r.zip", colour_zip(2), "application/zip")}).json()
    jobs = JobStore(tmp_path / "data" / "jobs.db")
    assert jobs.claim(job["id"], "a-worker-that-died")
    jobs.age_heartbeat(job["id"], 3600)

    with make_client(tiny_base_dir, tmp_path) as client:  # the restart
        done = wait_for(client, job["id"])
        assert done["status"] == "succeeded"
        messages = [e["message"] for e in client.get(f"/v1/finetune/{job['id']}/events").json()["data"]]
        assert any("re-queued" in m for m in messages)
        assert any("attempt 2" in m for m in messages)


def test_events_stream_as_server_sent_events(tiny_base_dir, tmp_path):
    with make_client(tiny_base_dir, tmp_path) as client:
        job = client.post("/v1/finetune", data={"adapter": "s", **HYPER, "epochs": "1"},
                          files={"dataset": ("s.zip", colour_zip(2), "application/zip")}).json()
        with client.stream("GET", f"/v1/finetune/{job['id']}/events?stream=true") as r:
            body = "".join(r.iter_text())
        assert "event: done" in body and '"status": "succeeded"' in body


def test_a_job_that_breaks_fails_with_a_code_and_message(tiny_base_dir, tmp_path):
    import shutil as _shutil

    with make_client(tiny_base_dir, tmp_path, embedded_trainer=False) as client:
        job = client.post("/v1/finetune", data={"adapter": "f", **HYPER},
                          files={"dataset": ("f.zip", colour_zip(2), "application/zip")}).json()
    jobs = JobStore(tmp_path / "data" / "jobs.db")
    _shutil.rmtree(jobs.internal(job["id"])["dataset"])  # e.g. the shared volume lost it
    with make_client(tiny_base_dir, tmp_path) as client:
        done = wait_for(client, job["id"])
        assert done["status"] == "failed"
        assert done["error"]["code"] == "training_error" and done["error"]["message"]
        assert client.get("/v1/adapters/f").status_code == 404


def test_the_learning_rate_decays_on_a_cosine_over_the_job(tiny_base_dir, tmp_path, monkeypatch):
    """Each step runs at ``cosine_lr(peak, step, total)``: read back from the optimizer as it steps."""
    import torch

    from service.model.training import cosine_lr

    seen: list[float] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    with make_client(tiny_base_dir, tmp_path) as client:
        job = client.post("/v1/finetune", data={"adapter": "lr", **HYPER, "epochs": "3", "batch_size": "4",
                                                "validation_split": "0"},
                          files={"dataset": ("lr.zip", colour_zip(2), "application/zip")}).json()
        done = wait_for(client, job["id"])
    assert done["status"] == "succeeded"
    total = done["progress"]["total_steps"]
    assert len(seen) == total > 2
    assert seen == pytest.approx([cosine_lr(0.003, step, total) for step in range(total)])
    assert seen[0] == pytest.approx(0.003) and seen[-1] < 0.003 * 0.2


@pytest.mark.parametrize(
    ("step", "total", "expected"),
    [(0, 10, 1.0), (5, 10, 0.5), (10, 10, 0.0), (12, 10, 0.0), (0, 0, 1.0), (1, 4, 0.5 * (1 + 2**-0.5))],
)
def test_cosine_lr(step, total, expected):
    from service.model.training import cosine_lr

    assert cosine_lr(1.0, step, total) == pytest.approx(expected)


def test_a_bfloat16_server_fine_tunes_and_serves_the_result(tiny_base_dir, tmp_path):
    """A job on a bfloat16 base (what a GPU server runs) trains, publishes and answers."""
    with make_client(tiny_base_dir, tmp_path, dtype="bfloat16") as client:
        job = client.post("/v1/finetune", data={"adapter": "bf16", **HYPER, "epochs": "1"},
                          files={"dataset": ("c.zip", colour_zip(2), "application/zip")}).json()
        done = wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["metrics"]["train_loss"] > 0
        r = client.post("/v1/answer?adapter=bf16", json={"instruction": "hi", "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["adapter"] == {"name": "bf16", "version": 1}
