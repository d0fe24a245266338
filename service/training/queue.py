"""The fine-tuning job queue on Huey: SQLite embedded by default, Redis across machines (no torch).

The task carries only a job id; the job record (status, hyperparameters, dataset path) lives in
the :class:`~service.training.jobs.JobStore`. Claiming a job is atomic there, so a message that is
delivered twice (e.g. re-enqueued after a restart) never trains twice.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer

log = logging.getLogger(__name__)
TASK_NAME = "service.finetune"


def _run_finetune(job_id: str) -> None:
    # The runtime imports torch; only consumers ever execute this.
    importlib.import_module("service.training.runtime").run(job_id)


def make_queue(data_dir: Path, redis_url: str | None = None) -> tuple[Huey, object]:
    """The Huey instance and its ``finetune`` task (call ``task(job_id)`` to enqueue)."""
    if redis_url:
        huey = RedisHuey("finetune", url=redis_url, results=False)
    else:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        huey = SqliteHuey("finetune", filename=str(Path(data_dir) / "queue.db"), results=False)
    task = huey.task(name=TASK_NAME, retries=0)(_run_finetune)
    return huey, task


class EmbeddedConsumer(Consumer):
    """A consumer that runs inside the API process: it leaves the server's signal handlers alone."""

    def _set_signal_handlers(self) -> None:
        pass


def start_embedded_consumer(huey: Huey, workers: int = 1) -> EmbeddedConsumer:
    consumer = EmbeddedConsumer(huey, workers=workers, worker_type="thread", periodic=False,
                                check_worker_health=False, initial_delay=0.05, max_delay=1.0)
    consumer.start()
    log.info("embedded fine-tuning worker started (%d thread)", workers)
    return consumer
