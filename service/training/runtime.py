"""The process-wide fine-tuning runner that queue tasks execute on (imports torch)."""

from __future__ import annotations

import threading

from service.model.threads import run_in_own_thread
from service.training.trainer import FinetuneRunner

_runner: FinetuneRunner | None = None
_ready = threading.Event()


def install(runner: FinetuneRunner) -> None:
    global _runner
    _runner = runner
    _ready.set()


def run(job_id: str, wait_s: float = 600.0) -> None:
    if not _ready.wait(wait_s):
        raise RuntimeError("no fine-tuning runner installed in this process (is the model loaded?)")
    assert _runner is not None
    # Each job trains on a thread that ends with it, not on the queue's long-lived worker thread:
    # a thread that keeps an OpenMP team slows every other thread's operators (see threads.py).
    run_in_own_thread(_runner.run, job_id, name=f"finetune-{job_id}")
