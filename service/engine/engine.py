"""The inference engine: the loaded base, adapters in slots (LRU), and a continuous-batching worker.

Requests are validated and their adapter version resolved when submitted (so a request finishes
on the version it started with even if ``live`` moves), then wait in a bounded queue. One worker
thread runs a :class:`~service.model.generate.RunningBatch` one decode step at a time
(iteration-level scheduling, as in Orca and vLLM): before each step it admits the requests that
arrived meanwhile (see below), up to ``max_batch_size`` rows, loads any missing adapters into slots,
prefills them as a group and merges them into the running rows — different adapters, images and
sampling settings alike. A row that finishes is answered at that step, so a short answer never
waits for a long one, and a new request never waits for the whole batch to end.

Newcomers join once they are ``join_ratio`` per running row, or once the oldest has waited
``max_join_steps`` decode steps (:meth:`Engine._should_join` says why). When nothing is running,
the worker takes the first waiting request and, if the previous batch had more than one row,
waits up to ``max_wait_ms`` for company: a lone client never waits for rows that are not coming,
while under load the wait gathers a full prefill group.
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
    GenerationRequest,
    GenerationResult,
    ImageFeatureCache,
    PromptTooLongError,
    RunningBatch,
    check_request,
)
from service.model.lora import AdapterLoadError, load_adapter
from service.model.prefix_cache import PrefixCache
from service.model.threads import run_in_own_thread
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
    arrived_step: int = 0  # the engine's decode-step count when it was submitted
    started: float | None = None  # when its prefill began
    prompt_ids: list[int] | None = None  # (see GenerationRequest)
    image_keys: list[str] | None = None

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
        """``base``: an already loaded base to serve (tests, embedding) instead of loading
        ``settings.model``; it must have at least ``settings.n_slots`` adapter slots."""
        if base is not None and settings.n_slots > base.slots.n_slots:
            raise ValueError(f"the base has {base.slots.n_slots} adapter slots, the settings ask for {settings.n_slots}")
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        t0 = time.perf_counter()
        # Loaded on a thread of its own, so that the caller's thread keeps no OpenMP team (see threads.py).
        self.base: BaseModel = base or run_in_own_thread(
            load_base, settings.model, device=self.device, dtype=self.dtype, n_slots=settings.n_slots,
            max_rank=settings.max_rank, target_modules=settings.adapter_targets, name="engine-load",
        )
        log.info("loaded base %s (%s) in %.1fs on %s, %d torch threads", settings.model, self.base.fingerprint,
                 time.perf_counter() - t0, self.device, torch.get_num_threads())
        self.store = AdapterStore(settings.adapter_dir)
        self.store.cleanup(max_age_s=6 * 3600)  # temp dirs left by writers that crashed
        self.slots = SlotTable(settings.n_slots)
        self.cache = ImageFeatureCache()
        self.prefixes = PrefixCache(settings.prefix_cache_mb * 2**20) if settings.prefix_cache_mb else None
        # What names each slot's weights for the prefix cache: slot 0 is the base; an adapter slot
        # gets a new name at every load, so no prefix computed on the slot's previous occupant
        # (or on an earlier load of the same version) is ever reused.
        self._slot_scopes: dict[int, str] = {0: "base"}
        self._loads = 0
        self._queue: queue.Queue[PendingRow] = queue.Queue(maxsize=settings.max_queue)
        self._deferred: list[PendingRow] = []  # rows that found no free slot, first in line
        self._running: RunningBatch | None = None  # touched by the worker thread only
        self._last_batch_size = 1
        self._steps = 0  # decode steps run so far
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
        # Tokenising and hashing the images here, on the caller's thread, keeps them off the
        # worker thread, whose forward passes are what every request waits for.
        checked = GenerationRequest(job.instruction, job.images, max_new_tokens=job.max_new_tokens,
                                    image_keys=job.image_keys)
        try:
            check_request(self.base, checked)
        except (PromptTooLongError, ValueError) as exc:
            raise InvalidInput(str(exc)) from exc
        row = PendingRow(job, ref, "ans-" + uuid.uuid4().hex[:16], on_text, arrived_step=self._steps,
                         prompt_ids=checked.prompt_ids, image_keys=checked.image_keys)
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
        try:  # (on a thread of its own: the caller is typically a long-lived thread pool's; see threads.py)
            config, _ = run_in_own_thread(load_adapter, path, self.base.slots, self.base.fingerprint, dtype=self.dtype,
                                          name="adapter-validation")
        except AdapterLoadError as exc:
            raise InvalidInput(f"adapter cannot be served on this base: {exc}") from exc
        return config.to_dict()

    # -- the worker ------------------------------------------------------------------------
    def _next_batch(self) -> list[PendingRow]:
        """With nothing running: the first waiting rows, after the wait for company (see module doc)."""
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
        return batch

    def _should_join(self) -> bool:
        """Whether the rows waiting now should join the running batch at this step.

        Prefilling newcomers stalls the running rows for a forward pass, and on a CPU a lone
        request's prefill costs about 1.7 times as much per row as one in a group of 16
        (docs/benchmarks.md). So, like TGI's ``waiting_served_ratio`` and ``max_waiting_tokens``,
        they join once they are ``join_ratio`` per running row, or once the oldest of them has
        waited ``max_join_steps`` decode steps, whichever comes first.
        """
        waiting = self._queue.qsize() + len(self._deferred)
        if not waiting:
            return False
        if waiting >= self.settings.join_ratio * len(self._running):
            return True
        if self._deferred:
            oldest = self._deferred[0]
        else:
            with self._queue.mutex:  # peek at the head without taking it
                oldest = self._queue.queue[0] if self._queue.queue else None
        return oldest is not None and self._steps - oldest.arrived_step >= self.settings.max_join_steps

    def _waiting_rows(self, room: int) -> list[PendingRow]:
        """While a batch runs: up to ``room`` rows that are waiting now, without blocking.

        Rows deferred for want of a slot go first and, while any are left, the queue waits behind
        them: otherwise newcomers on resident adapters could keep every slot pinned forever.
        """
        if self._deferred:
            rows, self._deferred = self._deferred[:room], self._deferred[room:]
            return rows
        rows = []
        while len(rows) < room:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if rows:
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return rows

    def _run(self) -> None:
        while not self._stop.is_set():
            rows: list[PendingRow] = []
            try:
                if not self._running:
                    rows = self._next_batch()
                elif self._running.can_merge and self._should_join():
                    # (a cache that cannot merge, e.g. a sliding window, makes newcomers wait for the batch to end)
                    rows = self._waiting_rows(self.settings.max_batch_size - len(self._running))
                rows = [row for row in rows if not self._drop_if_cancelled(row)]
                if rows:
                    self._admit(rows)
                if self._running:
                    self._step()
            except Exception as exc:  # the worker must survive anything; fail only the rows in hand
                log.exception("engine worker failed on %d new rows", len(rows))
                for row in rows:
                    if not row.future.done():
                        row.future.set_exception(exc)

    def _drop_if_cancelled(self, row: PendingRow) -> bool:
        if row.cancelled.is_set():
            if not row.future.done():
                row.future.set_exception(ServiceError("cancelled"))
            return True
        return False

    def _assign_slots(self, rows: list[PendingRow], pinned: set[int]) -> list[tuple[PendingRow, int]]:
        """Slots for the rows' adapters; ``pinned``: slots the running rows use. A row whose adapter
        finds no free slot waits (first in line) until running rows release one."""
        placed: list[tuple[PendingRow, int]] = []
        for row in rows:
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
                self._loads += 1
                self._slot_scopes[slot] = f"load-{self._loads}"
                metrics.ADAPTERS_LOADED.set(len(self.slots.resident))
                log.info("loaded adapter %s@%d into slot %d%s", *key, slot, f" (evicted {evicted[0]}@{evicted[1]})" if evicted else "")
            pinned.add(slot)
            placed.append((row, slot))
        return placed

    def _admit(self, rows: list[PendingRow]) -> None:
        """Admit ``rows`` to the running batch (:meth:`RunningBatch.add`), or prefill them as one."""
        pinned = {req.slot for req in self._running.requests if req.slot} if self._running else set()
        placed = self._assign_slots(rows, pinned)
        if not placed:
            return
        started = time.perf_counter()
        requests = [
            GenerationRequest(
                row.job.instruction, row.job.images, slot=slot, max_new_tokens=row.job.max_new_tokens,
                temperature=row.job.temperature, prefix_scope=self._slot_scopes[slot], on_text=row.on_text,
                is_cancelled=row.cancelled.is_set, prompt_ids=row.prompt_ids, image_keys=row.image_keys,
            )
            for row, slot in placed
        ]
        hits, misses = (self.prefixes.hits, self.prefixes.misses) if self.prefixes else (0, 0)
        keys = [row for row, _ in placed]
        try:
            if self._running:
                self._running.add(requests, cache=self.cache, keys=keys, prefixes=self.prefixes)
            else:
                self._running = RunningBatch.prefill(self.base, requests, cache=self.cache, keys=keys,
                                                     prefixes=self.prefixes)
        except Exception as exc:  # one bad row must not fail the others: admit them one by one
            if len(placed) > 1:
                log.warning("prefill of %d rows failed (%s); admitting them one by one", len(placed), exc)
                for row, _ in placed:
                    self._admit([row])
                return
            log.exception("request %s failed", placed[0][0].request_id)
            placed[0][0].future.set_exception(exc)
            return
        finally:
            if self.prefixes:
                metrics.PREFIX_CACHE_LOOKUPS.labels("hit").inc(self.prefixes.hits - hits)
                metrics.PREFIX_CACHE_LOOKUPS.labels("miss").inc(self.prefixes.misses - misses)
                metrics.PREFIX_CACHE_BYTES.set(self.prefixes.nbytes)
        for row, _ in placed:
            row.started = started
        self._last_batch_size = len(self._running)

    def _step(self) -> None:
        """One decode step of the running rows; answer the rows that finished."""
        metrics.BATCH_SIZE.observe(len(self._running))
        self._steps += 1
        try:
            finished = self._running.step()
        except Exception as exc:
            rows = self._running.keys  # (rows waiting to join included)
            self._running = None
            log.exception("decode step of %d rows failed", len(rows))
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(exc)
            return
        for row, result in finished:
            self._answer(row, result)

    def _answer(self, row: PendingRow, result: GenerationResult) -> None:
        metrics.ADAPTER_REQUESTS.labels(row.ref.name if row.ref else "base").inc()
        metrics.GENERATED_TOKENS.inc(result.completion_tokens)
        timing = result.timing
        row.future.set_result(
            {
                "id": row.request_id,
                "answer": result.text,
                "adapter": None if row.ref is None else {"name": row.ref.name, "version": row.ref.version},
                "finish_reason": result.finish_reason,
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                "timing_ms": {
                    "queue": round((row.started - row.submitted) * 1e3, 2),
                    "batch": round((time.perf_counter() - row.started) * 1e3, 2),
                    "vision": round(timing.vision_ms, 2),
                    "prefill": round(timing.prefill_ms, 2),
                    "decode": round(timing.decode_ms, 2),
                    "batch_size": timing.batch_size,
                },
            }
        )
