"""The multi-machine shape on loopback, without Docker: two API replicas behind the same Redis
queue, PostgreSQL job records and shared adapter/data directories, plus one trainer process."""

from __future__ import annotations

import io
import zipfile

import httpx
import torch

from service.model.lora import AdapterConfig, save_adapter
from tests.api.test_finetune import HYPER, colour_zip
from tests.helpers import free_port, start_service, stop_all, wait_ready, wait_until


def adapter_zip(base, tmp_path) -> bytes:
    config = AdapterConfig(r=4, lora_alpha=8, base_model_fingerprint=base.fingerprint)
    adapter = base.slots.new_adapter(config, seed=3)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1.0)
    save_adapter(tmp_path / "imported", config, adapter)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in (tmp_path / "imported").iterdir():
            zf.write(f, f.name)
    return buf.getvalue()


def test_two_replicas_share_adapters_and_jobs(learnable_base_dir, redis_url, postgres_url, tmp_path):
    env = {"SERVICE_MODEL": str(learnable_base_dir), "SERVICE_DATA_DIR": str(tmp_path / "data"),
           "SERVICE_ADAPTER_DIR": str(tmp_path / "adapters"), "SERVICE_REDIS_URL": redis_url,
           "SERVICE_DATABASE_URL": postgres_url, "SERVICE_MAX_RANK": "16", "SERVICE_EMBEDDED_TRAINER": "false"}
    ports = [free_port(), free_port()]
    procs = [start_service(["serve", "--port", str(p), "--log-level", "warning"], env) for p in ports]
    procs.append(start_service(["trainer", "--log-level", "warning"], env))
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        for url, proc in zip((a, b), procs, strict=False):
            wait_ready(url, proc)

        # An adapter imported through replica A is served by replica B.
        from service.model.base import load_base

        base = load_base(learnable_base_dir, n_slots=1, max_rank=16)
        r = httpx.post(a + "/v1/adapters", data={"name": "imported"},
                       files={"archive": ("a.zip", adapter_zip(base, tmp_path), "application/zip")})
        assert r.status_code == 201, r.text
        answer = httpx.post(b + "/v1/answer?adapter=imported", json={"instruction": "What colour?", "max_new_tokens": 3})
        assert answer.status_code == 200 and answer.json()["adapter"] == {"name": "imported", "version": 1}
        assert "imported" in [m["id"] for m in httpx.get(b + "/v1/models").json()["data"]]

        # A job submitted to replica A is visible from replica B and runs on the trainer.
        r = httpx.post(a + "/v1/finetune", data={"adapter": "colours", **HYPER, "epochs": "3"},
                       files={"dataset": ("c.zip", colour_zip(2), "application/zip")})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert httpx.get(f"{b}/v1/finetune/{job_id}").status_code == 200
        assert job_id in [j["id"] for j in httpx.get(b + "/v1/finetune").json()["data"]]
        done = wait_until(lambda: (j := httpx.get(f"{b}/v1/finetune/{job_id}").json())["status"] in
                     ("succeeded", "failed", "cancelled") and j, 180, "the job")
        assert done["status"] == "succeeded", done
        served = httpx.post(b + "/v1/answer?adapter=colours", json={"instruction": "What colour?", "max_new_tokens": 3})
        assert served.json()["adapter"] == {"name": "colours", "version": 1}
        cancel_from_b = httpx.post(f"{b}/v1/finetune/{job_id}/cancel")
        assert cancel_from_b.status_code == 409  # B sees A's job as finished
    finally:
        stop_all(procs)
