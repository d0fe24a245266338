"""The inference engine: the loaded base, adapters in slots (LRU), and a dynamic-batching worker.

Requests are validated and their adapter version resolved when submitted (so a request finishes
on the version it started with even if ``live`` moves), then wait in a bounded queue. One worker
thread takes the first waiting request, waits up to ``max_wait_ms`` for more (up to
``max_batch_size``) if the previous batch had more than one row, loads any missing adapters into
slots, and runs the whole batch — rows with different adapters, images and sampling settings —
through one :func:`generate` call. Waiting only after a shared batch means a lone client never
waits for rows that are not coming, while under load (where batches fill) the wait gathers them;
a burst's first request runs at once and the rest form the next batch. In :func:`generate`, rows
that finish leave the batch, so a short answer does not decode until the longest one ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service import metrics
from service.config import Settings
from service.engine.jobs import AnswerJob
from service.errors import InvalidInput, Overloaded, ServiceError
from service.model.base import BaseModel, load_base
from service.model.generate import (
    BatchTiming,
    GenerationRequest,
    ImageFeatureCache,
    PromptTooLongError,
    check_request,
    generate,
)
from service.model.lora import AdapterLoadError, load_adapter
from service.registry.store import AdapterRef, AdapterStore

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass
class PendingRow:
    """One submitted request: its job, resolved adapter, result future and streaming hook."""

    job: AnswerJob
    ref: AdapterRef | None
    request_id: str
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class SlotTable:
    """Which adapter version sits in which slot; the least recently used is evicted first."""

    def __init__(self, n_slots: int):
        self.free = list(range(1, n_slots + 1))
        self.resident: OrderedDict[tuple[str, int], int] = OrderedDict()

    def lookup(self, key: tuple[str, int]) -> int | None:
        slot = self.resident.get(key)
        if slot is not None:
            self.resident.move_to_end(key)
        return slot

    def assign(self, key: tuple[str, int], pinned: set[int]) -> tuple[int, tuple[str, int] | None]:
        """A slot for ``key`` and the adapter evicted for it; slots in ``pinned`` are in use."""
        if self.free:
            slot = self.free.pop(0)
            self.resident[key] = slot
            return slot, None
        for victim, slot in self.resident.items():
            if slot not in pinned:
                del self.resident[victim]
                self.resident[key] = slot
                return slot, victim
        raise RuntimeError("every slot is in use by the current batch")


class Engine:
    def __init__(self, settings: Settings, base: BaseModel | None = None):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        t0 = time.perf_counter()
        self.base: BaseModel = base or load_base(
            settings.model, device=self.device, dtype=self.dtype, n_slots=settings.n_slots, max_rank=settings.max_rank,
            target_modules=settings.adapter_targets,
        )
        log.info("loaded base %s (%s) in %.1fs on %s", settings.model, self.base.fingerprint,
                 time.perf_counter() - t0, self.device)
        self.store = AdapterStore(settings.adapter_dir)
        self.store.cleanup(max_age_s=6 * 3600)  # temp dirs left by writers that crashed
        self.slots = SlotTable(settings.n_slots)
        self.cache = ImageFeatureCache()
        self._queue: queue.Queue[PendingRow] = queue.Queue(maxsize=settings.max_queue)
        self._deferred: list[PendingRow] = []
        self._last_batch_size = 1
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._worker.start()

    @property
    def model_id(self) -> str:
        return self.base.model_id

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)

    # -- submitting ------------------------------------------------------------------------
    def submit(self, job: AnswerJob, on_text: Callable[[str], None] | None = None) -> PendingRow:
        """Validate, resolve the adapter version and queue; raises a ServiceError on bad input."""
        ref = self.store.resolve(job.adapter or "")
        try:
            check_request(self.base, GenerationRequest(job.instruction, job.images, max_new_tokens=job.max_new_tokens))
        except (PromptTooLongError, ValueError) as exc:
            raise InvalidInput(str(exc)) from exc
        row = PendingRow(job, ref, "ans-" + uuid.uuid4().hex[:16], on_text)
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            raise Overloaded("the request queue is full; retry shortly", retry_after=1.0) from None
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return row

    def answer(self, job: AnswerJob) -> dict:
        """Submit and wait (for callers that are threads, e.g. tests and the trainer)."""
        return self.submit(job).future.result(timeout=self.settings.request_timeout_s)

    def validate_adapter(self, path: Path) -> dict:
        """Check an adapter directory can be served on this base; returns its config."""
        try:
            config, _ = load_adapter(path, self.base.slots, self.base.fingerprint, dtype=self.dtype)
        except AdapterLoadError as exc:
            raise InvalidInput(f"adapter cannot be served on this base: {exc}") from exc
        return config.to_dict()

    # -- the worker ------------------------------------------------------------------------
    def _next_batch(self) -> list[PendingRow]:
        batch, self._deferred = self._deferred[: self.settings.max_batch_size], self._deferred[self.settings.max_batch_size :]
        if not batch:
            try:
                batch.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
        wait_s = self.settings.max_wait_ms / 1e3 if self._last_batch_size > 1 else 0.0
        deadline = time.perf_counter() + wait_s
        while len(batch) < self.settings.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        self._last_batch_size = len(batch)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            batch = [row for row in batch if not self._drop_if_cancelled(row)]
            if batch:
                self._execute(batch)

    def _drop_if_cancelled(self, row: PendingRow) -> bool:
        if row.cancelled.is_set():
            if not row.future.done():
                row.future.set_exception(ServiceError("cancelled"))
            return True
        return False

    def _assign_slots(self, batch: list[PendingRow]) -> list[tuple[PendingRow, int]]:
        """Slots for the batch's adapters; rows whose adapter finds no free slot wait for the next batch."""
        placed: list[tuple[PendingRow, int]] = []
        pinned: set[int] = set()
        for row in batch:
            if row.ref is None:
                placed.append((row, 0))
                continue
            key = (row.ref.name, row.ref.version)
            slot = self.slots.lookup(key)
            if slot is None:
                if len(pinned) >= self.settings.n_slots:
                    self._deferred.append(row)
                    continue
                try:
                    _, weights = load_adapter(row.ref.path, self.base.slots, self.base.fingerprint, dtype=self.dtype)
                except AdapterLoadError as exc:
                    row.future.set_exception(InvalidInput(f"adapter {row.ref.name}@{row.ref.version} cannot be served: {exc}"))
                    continue
                slot, evicted = self.slots.assign(key, pinned)
                self.base.slots.load(slot, weights)
                metrics.ADAPTERS_LOADED.set(len(self.slots.resident))
                log.info("loaded adapter %s@%d into slot %d%s", *key, slot, f" (evicted {evicted[0]}@{evicted[1]})" if evicted else "")
            pinned.add(slot)
            placed.append((row, slot))
        return placed

    def _execute(self, batch: list[PendingRow]) -> None:
        placed = self._assign_slots(batch)
        if not placed:
            return
        requests = [
            GenerationRequest(
                row.job.instruction, row.job.images, slot=slot, max_new_tokens=row.job.max_new_tokens,
                temperature=row.job.temperature, on_text=row.on_text, is_cancelled=row.cancelled.is_set,
            )
            for row, slot in placed
        ]
        metrics.BATCH_SIZE.observe(len(requests))
        started = time.perf_counter()
        timing = BatchTiming()
        try:
            results = generate(self.base, requests, cache=self.cache, timing=timing)
        except Exception as exc:  # one bad row must not fail the others: retry them one by one
            if len(placed) > 1:
                log.warning("batch of %d failed (%s); running its rows alone", len(placed), exc)
                for row, _ in placed:
                    self._execute([row])
                return
            log.exception("request %s failed", placed[0][0].request_id)
            placed[0][0].future.set_exception(exc)
            return
        batch_ms = (time.perf_counter() - started) * 1e3
        for (row, _), result in zip(placed, results, strict=True):
            metrics.ADAPTER_REQUESTS.labels(row.ref.name if row.ref else "base").inc()
            metrics.GENERATED_TOKENS.inc(result.completion_tokens)
            row.future.set_result(
                {
                    "id": row.request_id,
                    "answer": result.text,
                    "adapter": None if row.ref is None else {"name": row.ref.name, "version": row.ref.version},
                    "finish_reason": result.finish_reason,
                    "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                    "timing_ms": {
                        "queue": round((started - row.submitted) * 1e3, 2),
                        "batch": round(batch_ms, 2),
                        "vision": round(timing.vision_ms, 2),
                        "prefill": round(timing.prefill_ms, 2),
                        "decode": round(timing.decode_ms, 2),
                        "batch_size": len(placed),
                    },
                }
            )
