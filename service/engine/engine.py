"""The inference engine: the loaded base, adapters in slots (LRU), and answering requests.

This first version runs one batch at a time under a lock; the request queue with dynamic
batching sits on top of :meth:`Engine.answer_batch`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict

import torch

from service.config import Settings
from service.engine.jobs import AnswerJob
from service.errors import InvalidInput
from service.model.base import BaseModel, load_base
from service.model.generate import GenerationRequest, ImageFeatureCache, PromptTooLongError, generate
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


class SlotTable:
    """Which adapter version sits in which slot; least recently used is evicted first."""

    def __init__(self, n_slots: int):
        self.free = list(range(1, n_slots + 1))
        self.resident: OrderedDict[tuple[str, int], int] = OrderedDict()

    def lookup(self, key: tuple[str, int]) -> int | None:
        slot = self.resident.get(key)
        if slot is not None:
            self.resident.move_to_end(key)
        return slot

    def assign(self, key: tuple[str, int]) -> tuple[int, tuple[str, int] | None]:
        """A slot for ``key`` and the adapter evicted to make room (if any)."""
        if self.free:
            slot, evicted = self.free.pop(0), None
        else:
            evicted, slot = self.resident.popitem(last=False)
        self.resident[key] = slot
        return slot, evicted


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        t0 = time.perf_counter()
        self.base: BaseModel = load_base(
            settings.model, device=self.device, dtype=self.dtype, n_slots=settings.n_slots, max_rank=settings.max_rank
        )
        log.info("loaded base %s (%s) in %.1fs on %s", settings.model, self.base.fingerprint, time.perf_counter() - t0, self.device)
        self.store = AdapterStore(settings.adapter_dir)
        self.slots = SlotTable(settings.n_slots)
        self.cache = ImageFeatureCache()
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.base.model_id

    def _slot_for(self, ref: AdapterRef | None) -> int:
        if ref is None:
            return 0
        key = (ref.name, ref.version)
        slot = self.slots.lookup(key)
        if slot is not None:
            return slot
        try:
            _, weights = load_adapter(ref.path, self.base.slots, self.base.fingerprint, dtype=self.dtype)
        except AdapterLoadError as exc:
            raise InvalidInput(f"adapter {ref.name}@{ref.version} cannot be served: {exc}") from exc
        slot, evicted = self.slots.assign(key)
        self.base.slots.load(slot, weights)
        log.info("loaded adapter %s@%d into slot %d (evicted %s)", ref.name, ref.version, slot, evicted)
        return slot

    def answer(self, job: AnswerJob) -> dict:
        ref = self.store.resolve(job.adapter or "")
        request_id = "ans-" + uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        with self._lock:
            slot = self._slot_for(ref)
            t1 = time.perf_counter()
            request = GenerationRequest(
                job.instruction, job.images, slot=slot, max_new_tokens=job.max_new_tokens, temperature=job.temperature
            )
            try:
                result = generate(self.base, [request], cache=self.cache)[0]
            except PromptTooLongError as exc:
                raise InvalidInput(str(exc)) from exc
        t2 = time.perf_counter()
        return {
            "id": request_id,
            "answer": result.text,
            "adapter": None if ref is None else {"name": ref.name, "version": ref.version},
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "timing_ms": {"adapter_load": round((t1 - t0) * 1e3, 2), "generate": round((t2 - t1) * 1e3, 2)},
        }
