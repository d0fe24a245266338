"""Starting fine-tuning workers: inside the server (embedded) or as ``python -m service trainer``."""

from __future__ import annotations

import logging
import os
import socket
import threading

from service.config import Settings
from service.model.base import BaseModel, load_base
from service.model.threads import run_in_own_thread
from service.registry.store import AdapterStore
from service.training import runtime
from service.training.jobs import JobStore, database_url
from service.training.queue import make_queue, start_embedded_consumer
from service.training.trainer import FinetuneRunner

log = logging.getLogger(__name__)


def recover(jobs: JobStore, task, stale_after_s: float, all_queued: bool = True) -> list[str]:
    """Re-queue jobs whose worker died; at start-up also give every queued job a queue message.

    A duplicate message is harmless: claiming a job is atomic in the job store.
    """
    requeued = jobs.requeue_stale(stale_after_s)
    for job_id in jobs.queued_ids() if all_queued else requeued:
        task(job_id)
    if requeued:
        log.warning("re-queued %d job(s) left running by a stopped worker: %s", len(requeued), requeued)
    return requeued


def start_janitor(jobs: JobStore, task, stale_after_s: float) -> threading.Event:
    """Keep recovering: a trainer that dies while others run must not strand its job until a restart."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(max(1.0, stale_after_s / 2)):
            try:
                recover(jobs, task, stale_after_s, all_queued=False)
            except Exception:  # a locked database now and then must not kill the janitor
                log.exception("job recovery pass failed")

    threading.Thread(target=loop, name="job-janitor", daemon=True).start()
    return stop


def start_embedded_trainer(base: BaseModel, settings: Settings, jobs: JobStore, huey, task):
    """Train queued jobs in this process against the already loaded ``base``."""
    worker = f"{socket.gethostname()}:{os.getpid()}:embedded"
    runtime.install(FinetuneRunner(base, jobs, AdapterStore(settings.adapter_dir), settings.data_dir, worker))
    recover(jobs, task, settings.job_stale_after_s)
    start_janitor(jobs, task, settings.job_stale_after_s)
    return start_embedded_consumer(huey, workers=settings.max_concurrent_jobs)


def run_trainer_process(settings: Settings, workers: int = 1) -> None:
    """A standalone trainer: loads its own base and consumes the (Redis or SQLite) queue until stopped."""
    from service.engine.engine import pick_device, pick_dtype

    device = pick_device(settings.device)
    base = run_in_own_thread(load_base, settings.model, device=device, dtype=pick_dtype(settings.dtype, device),
                             n_slots=1, max_rank=settings.max_rank, target_modules=settings.adapter_targets,
                             name="trainer-load")  # (the main thread keeps no OpenMP team; see threads.py)
    jobs = JobStore(database_url(settings.data_dir, settings.database_url))
    huey, task = make_queue(settings.data_dir, settings.redis_url)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    runtime.install(FinetuneRunner(base, jobs, AdapterStore(settings.adapter_dir), settings.data_dir, worker))
    recover(jobs, task, settings.job_stale_after_s)
    start_janitor(jobs, task, settings.job_stale_after_s)
    log.info("trainer %s consuming %s", worker, "redis" if settings.redis_url else settings.data_dir / "queue.db")
    huey.create_consumer(workers=workers, worker_type="thread", periodic=False).run()
