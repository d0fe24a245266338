"""Across processes: an API process and two `python -m service trainer` processes on a real Redis.

Two jobs for the same adapter run in parallel on different trainers and publish distinct
versions; killing a trainer mid-job does not lose its job: the other trainer re-queues it and
resumes it from its checkpoint.
"""

from __future__ import annotations

import os
import signal

import httpx

from tests.api.test_finetune import HYPER, colour_zip
from tests.helpers import free_port, start_service, stop_all, wait_ready, wait_until


def test_two_trainers_share_a_redis_queue_and_a_killed_trainer_loses_nothing(learnable_base_dir, redis_url, tmp_path):
    env = {"SERVICE_MODEL": str(learnable_base_dir), "SERVICE_DATA_DIR": str(tmp_path / "data"),
           "SERVICE_ADAPTER_DIR": str(tmp_path / "adapters"), "SERVICE_REDIS_URL": redis_url,
           "SERVICE_MAX_RANK": "16", "SERVICE_JOB_STALE_AFTER_S": "3"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [start_service(["serve", "--port", str(port), "--no-embedded-trainer", "--log-level", "warning"], env)]
    trainers = [start_service(["trainer", "--log-level", "warning"], env) for _ in range(2)]
    procs += trainers
    try:
        wait_ready(url, procs[0])
        form = {"adapter": "shared", **HYPER, "epochs": "60", "batch_size": "1", "checkpoint_every": "10"}
        ids = []
        for _ in range(2):
            r = httpx.post(url + "/v1/finetune", data=form, files={"dataset": ("c.zip", colour_zip(2), "application/zip")})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        def job(i):
            return httpx.get(f"{url}/v1/finetune/{ids[i]}").json()

        def events(i):
            return [e["message"] for e in httpx.get(f"{url}/v1/finetune/{ids[i]}/events").json()["data"]]

        # Both run at once, on different trainer processes.
        wait_until(lambda: all(job(i)["status"] == "running" for i in range(2)), 120, "both jobs to run")
        runners = {next(m for m in events(i) if m.startswith("running on")) for i in range(2)}
        assert len(runners) == 2, runners

        # Kill the trainer of job 0 after its first checkpoint.
        wait_until(lambda: any("checkpoint at step" in m for m in events(0)), 120, "a checkpoint")
        victim_pid = int(next(m for m in events(0) if m.startswith("running on")).split(":")[1].split()[0])
        victim = next(p for p in trainers if p.pid == victim_pid)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)

        finished = [wait_until(lambda i=i: job(i) if job(i)["status"] in ("succeeded", "failed", "cancelled") else None,
                         300, f"job {i}") for i in range(2)]
        assert [f["status"] for f in finished] == ["succeeded", "succeeded"], finished
        assert sorted(f["result"]["version"] for f in finished) == [1, 2]
        log0 = " | ".join(events(0))
        assert "re-queued" in log0 and "resumed from the checkpoint" in log0 and "attempt 2" in log0
        versions = [v["version"] for v in httpx.get(url + "/v1/adapters/shared").json()["versions"]]
        assert sorted(versions) == [1, 2]
    finally:
        stop_all(procs)
