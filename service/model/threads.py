"""Keeping one long-lived thread per process on the model: the rest of torch's work on short-lived ones.

PyTorch's CPU build runs its parallel operators on GNU OpenMP, which gives every thread that
starts a parallel region a team of worker threads of its own, kept until that thread exits. When
the process holds more such workers than it has cores, libgomp stops letting idle workers spin
and puts them to sleep at once, so every parallel operator on every thread pays for waking its
team. oneDNN's bfloat16 matmuls start a parallel region even for a decode step's tiny products:
on a 2-core CPU a bfloat16 server decoded 1.87 times slower per token after its first fine-tune,
for as long as the queue's worker thread that had trained it lived (float32, whose small matmuls
run on one thread, lost under 10 %; ``bench/serve_after_finetune.py``, docs/benchmarks.md). A
program that loaded the base on its main thread before starting the engine's thread lost as much
(``bench/engine_policies.py`` did: 36 against 54 requests/s at batch size 1, in bfloat16), and so
would a long-lived thread pool that validated a large base's adapter upload.

So work that is not the engine's forward passes runs on a thread of its own that ends with it
(:func:`run_in_own_thread`), and takes its worker team with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[..., T], *args, name: str = "torch-task", **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a new thread, waited for; returns its result or raises its exception."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
