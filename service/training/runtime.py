"""The process-wide fine-tuning runner that queue tasks execute on (imports torch)."""

from __future__ import annotations

import threading

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
    _runner.run(job_id)
