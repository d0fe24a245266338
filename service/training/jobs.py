"""Fine-tuning job records and their events, in SQLite (default) or PostgreSQL (no torch).

Field names follow the OpenAI fine-tuning job where they fit. Status moves
``queued → running → succeeded | failed | cancelled``; a job left ``running`` by a process that died
(stale heartbeat) is re-queued and resumes from its last checkpoint.

One code path (SQLAlchemy Core) serves both backends: SQLite in the data directory for one
machine, PostgreSQL (``SERVICE_DATABASE_URL``) when several API replicas share the records.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import DBAPIError

from service.errors import NotFound, ServiceError

TERMINAL = ("succeeded", "failed", "cancelled")
# Any constant works; it only has to be the same in every process sharing the database.
SCHEMA_LOCK_KEY = 0x6D6C6C6D  # "mllm"

metadata = MetaData()
jobs_table = Table(
    "ft_jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("adapter", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("heartbeat_at", Float),
    Column("hyperparameters", Text, nullable=False),
    Column("progress", Text, nullable=False, default="{}"),
    Column("metrics", Text, nullable=False, default="{}"),
    Column("result", Text),
    Column("error", Text),
    Column("dataset", Text, nullable=False),
    Column("n_examples", Integer, nullable=False, default=0),
    Column("cancel_requested", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(255)),
)
Index("ft_jobs_status", jobs_table.c.status)
events_table = Table(
    "ft_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Text),
)
Index("ft_events_job", events_table.c.job_id, events_table.c.id)


class JobConflict(ServiceError):
    status, code = 409, "conflict"


def database_url(data_dir: Path, url: str | None) -> str:
    return url or f"sqlite:///{Path(data_dir) / 'jobs.db'}"


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record) -> None:  # noqa: ANN001 - DBAPI callback
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def create_schema(engine: Engine, attempts: int = 5) -> None:
    """Create the tables once, even when several replicas and trainers start at the same moment.

    ``create_all`` checks, then creates: two processes racing on a fresh PostgreSQL database both see
    no table and the loser fails on ``pg_type``'s unique index. PostgreSQL serialises the check and
    the create under a transaction-scoped advisory lock; SQLite (one file, one writer) and anything
    else retry, since the winner's tables make the loser's next check pass.
    """
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                metadata.create_all(conn)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


class JobStore:
    """Job records shared by threads, processes and (with PostgreSQL) machines."""

    def __init__(self, path_or_url: Path | str):
        url = str(path_or_url)
        if "://" not in url:
            url = f"sqlite:///{Path(url)}"
        self.url = url
        self.engine = make_engine(url)
        create_schema(self.engine)

    @property
    def path(self) -> str:
        return self.url

    # -- records ---------------------------------------------------------------------------
    def create(self, adapter: str, hyperparameters: dict, dataset: str, n_examples: int) -> dict:
        job_id = "ftjob-" + uuid.uuid4().hex[:20]
        with self.engine.begin() as conn:
            conn.execute(insert(jobs_table).values(
                id=job_id, status="queued", adapter=adapter, created_at=time.time(),
                hyperparameters=json.dumps(hyperparameters), dataset=dataset, n_examples=n_examples,
                progress="{}", metrics="{}", cancel_requested=0, attempts=0,
            ))
        self.add_event(job_id, "info", f"job created for adapter {adapter!r} with {n_examples} examples")
        return self.get(job_id)

    def _row(self, job_id: str) -> RowMapping:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFound(f"unknown fine-tuning job {job_id!r}")
        return row

    def get(self, job_id: str) -> dict:
        return self._public(self._row(job_id))

    def internal(self, job_id: str) -> dict:
        """The record with the worker-only fields (dataset path, attempts, cancel flag)."""
        row = self._row(job_id)
        return {**self._public(row), "dataset": row["dataset"], "attempts": row["attempts"],
                "cancel_requested": bool(row["cancel_requested"]), "heartbeat_at": row["heartbeat_at"],
                "worker": row["worker"]}

    def list(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        query = select(jobs_table).order_by(jobs_table.c.seq.desc()).limit(limit + 1)
        if after:
            query = query.where(jobs_table.c.seq < self._row(after)["seq"])
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [self._public(r) for r in rows[:limit]], len(rows) > limit

    @staticmethod
    def _public(row: RowMapping) -> dict[str, Any]:
        def load(value):
            return json.loads(value) if value else None

        return {
            "id": row["id"],
            "object": "fine_tuning.job",
            "status": row["status"],
            "adapter": row["adapter"],
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "hyperparameters": load(row["hyperparameters"]),
            "n_examples": row["n_examples"],
            "progress": load(row["progress"]) or {},
            "metrics": load(row["metrics"]) or {},
            "result": load(row["result"]),
            "error": load(row["error"]),
        }

    def _update(self, where, **values) -> int:
        with self.engine.begin() as conn:
            return conn.execute(update(jobs_table).where(*where).values(**values)).rowcount

    # -- transitions -----------------------------------------------------------------------
    def claim(self, job_id: str, worker: str) -> bool:
        """queued → running for exactly one worker (a conditional UPDATE: atomic on both backends)."""
        now = time.time()
        c = jobs_table.c
        return self._update(
            (c.id == job_id, c.status == "queued", c.cancel_requested == 0),
            status="running", started_at=func.coalesce(c.started_at, now), heartbeat_at=now, worker=worker,
            attempts=c.attempts + 1,
        ) == 1

    def heartbeat(self, job_id: str, progress: dict | None = None, metrics: dict | None = None) -> bool:
        """Record liveness (and progress); returns False if the job was asked to cancel."""
        values: dict[str, Any] = {"heartbeat_at": time.time()}
        if progress is not None:
            values["progress"] = json.dumps(progress)
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        self._update((jobs_table.c.id == job_id,), **values)
        return not self._row(job_id)["cancel_requested"]

    def finish(self, job_id: str, status: str, result: dict | None = None, error: dict | None = None,
               metrics: dict | None = None) -> None:
        assert status in TERMINAL
        values: dict[str, Any] = {"status": status, "finished_at": time.time(),
                                  "result": json.dumps(result) if result else None,
                                  "error": json.dumps(error) if error else None}
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        self._update((jobs_table.c.id == job_id,), **values)

    def cancel(self, job_id: str) -> dict:
        """Queued jobs are cancelled at once; running ones stop at their next step."""
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise JobConflict(f"job {job_id} is already {job['status']}")
        c = jobs_table.c
        self._update((c.id == job_id,), cancel_requested=1)
        done = self._update((c.id == job_id, c.status == "queued"), status="cancelled", finished_at=time.time())
        self.add_event(job_id, "info", "cancelled" if done else "cancellation requested")
        return self.get(job_id)

    def requeue_stale(self, stale_after_s: float) -> list[str]:
        """Jobs left running by a dead worker go back to the queue (they resume from a checkpoint)."""
        limit = time.time() - stale_after_s
        c = jobs_table.c
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(c.id).where(c.status == "running", c.heartbeat_at < limit))]
        requeued = []
        for job_id in ids:
            if self._update((c.id == job_id, c.status == "running", c.heartbeat_at < limit), status="queued", worker=None):
                self.add_event(job_id, "warning", "worker stopped responding; job re-queued to resume from its last checkpoint")
                requeued.append(job_id)
        return requeued

    def queued_ids(self) -> list[str]:
        c = jobs_table.c
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(c.id).where(c.status == "queued").order_by(c.seq))]

    def age_heartbeat(self, job_id: str, seconds: float) -> None:
        """Make a job look stale (tests and operators simulating a dead worker)."""
        self._update((jobs_table.c.id == job_id,), heartbeat_at=jobs_table.c.heartbeat_at - seconds)

    # -- events ----------------------------------------------------------------------------
    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(events_table).values(job_id=job_id, created_at=time.time(), level=level,
                                                     message=message, data=json.dumps(data) if data else None))

    def events(self, job_id: str, after: int = 0, limit: int = 200) -> list[dict]:
        self._row(job_id)
        e = events_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events_table).where(e.job_id == job_id, e.id > after).order_by(e.id).limit(limit)
            ).mappings().all()
        return [
            {"id": r["id"], "object": "fine_tuning.job.event", "created_at": r["created_at"], "level": r["level"],
             "message": r["message"], "data": json.loads(r["data"]) if r["data"] else None}
            for r in rows
        ]
