"""Fine-tuning job records and their events, in SQLite (no torch).

Field names follow the OpenAI fine-tuning job where they fit. Status moves
``queued → running → succeeded | failed | cancelled``; a job left ``running`` by a process that died
(stale heartbeat) is re-queued on start-up and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from service.errors import NotFound, ServiceError

TERMINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    adapter TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    hyperparameters TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    dataset TEXT NOT NULL,
    n_examples INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT
);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs(seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, id);
"""


class JobConflict(ServiceError):
    status, code = 409, "conflict"


class JobStore:
    """Thread- and process-safe job records on one SQLite file (WAL mode)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    # -- records ---------------------------------------------------------------------------
    def create(self, adapter: str, hyperparameters: dict, dataset: str, n_examples: int) -> dict:
        job_id = "ftjob-" + uuid.uuid4().hex[:20]
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            conn.execute(
                "INSERT INTO jobs (id, seq, status, adapter, created_at, hyperparameters, dataset, n_examples)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, seq, adapter, now, json.dumps(hyperparameters), dataset, n_examples),
            )
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        self.add_event(job_id, "info", f"job created for adapter {adapter!r} with {n_examples} examples")
        return self.get(job_id)

    def _row(self, job_id: str) -> sqlite3.Row:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown fine-tuning job {job_id!r}")
        return row

    def get(self, job_id: str) -> dict:
        return self._public(self._row(job_id))

    def internal(self, job_id: str) -> dict:
        """The record with the worker-only fields (dataset path, attempts, cancel flag)."""
        row = self._row(job_id)
        return {**self._public(row), "dataset": row["dataset"], "attempts": row["attempts"],
                "cancel_requested": bool(row["cancel_requested"]), "heartbeat_at": row["heartbeat_at"]}

    def list(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        conn = self._conn()
        if after:
            seq = self._row(after)["seq"]
            rows = conn.execute("SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?", (seq, limit + 1)).fetchall()
        else:
            rows = conn.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit + 1,)).fetchall()
        return [self._public(r) for r in rows[:limit]], len(rows) > limit

    @staticmethod
    def _public(row: sqlite3.Row) -> dict[str, Any]:
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

    # -- transitions -----------------------------------------------------------------------
    def claim(self, job_id: str, worker: str) -> bool:
        """queued → running for exactly one worker."""
        now = time.time()
        cur = self._conn().execute(
            "UPDATE jobs SET status='running', started_at=COALESCE(started_at, ?), heartbeat_at=?, worker=?,"
            " attempts=attempts+1 WHERE id=? AND status='queued' AND cancel_requested=0",
            (now, now, worker, job_id),
        )
        return cur.rowcount == 1

    def heartbeat(self, job_id: str, progress: dict | None = None, metrics: dict | None = None) -> bool:
        """Record progress; returns False if the job was asked to cancel."""
        sets, args = ["heartbeat_at=?"], [time.time()]
        if progress is not None:
            sets.append("progress=?")
            args.append(json.dumps(progress))
        if metrics is not None:
            sets.append("metrics=?")
            args.append(json.dumps(metrics))
        conn = self._conn()
        conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))
        return not conn.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()[0]

    def finish(self, job_id: str, status: str, result: dict | None = None, error: dict | None = None,
               metrics: dict | None = None) -> None:
        assert status in TERMINAL
        sets = "status=?, finished_at=?, result=?, error=?" + (", metrics=?" if metrics is not None else "")
        args = [status, time.time(), json.dumps(result) if result else None, json.dumps(error) if error else None]
        if metrics is not None:
            args.append(json.dumps(metrics))
        self._conn().execute(f"UPDATE jobs SET {sets} WHERE id=?", (*args, job_id))

    def cancel(self, job_id: str) -> dict:
        """Queued jobs are cancelled at once; running ones stop at their next step."""
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise JobConflict(f"job {job_id} is already {job['status']}")
        conn = self._conn()
        conn.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
        cur = conn.execute(
            "UPDATE jobs SET status='cancelled', finished_at=? WHERE id=? AND status='queued'", (time.time(), job_id)
        )
        self.add_event(job_id, "info", "cancelled" if cur.rowcount else "cancellation requested")
        return self.get(job_id)

    def requeue_stale(self, stale_after_s: float) -> list[str]:
        """Jobs left running by a dead worker go back to the queue (they resume from a checkpoint)."""
        limit = time.time() - stale_after_s
        conn = self._conn()
        rows = conn.execute(
            "SELECT id FROM jobs WHERE status='running' AND (heartbeat_at IS NULL OR heartbeat_at < ?)", (limit,)
        ).fetchall()
        requeued = []
        for row in rows:
            cur = conn.execute(
                "UPDATE jobs SET status='queued', worker=NULL WHERE id=? AND status='running' AND heartbeat_at < ?",
                (row["id"], limit),
            )
            if cur.rowcount:
                self.add_event(row["id"], "warning", "worker stopped responding; job re-queued to resume from its last checkpoint")
                requeued.append(row["id"])
        return requeued

    def queued_ids(self) -> list[str]:
        return [r["id"] for r in self._conn().execute("SELECT id FROM jobs WHERE status='queued' ORDER BY seq")]

    # -- events ----------------------------------------------------------------------------
    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None) -> None:
        self._conn().execute(
            "INSERT INTO events (job_id, created_at, level, message, data) VALUES (?, ?, ?, ?, ?)",
            (job_id, time.time(), level, message, json.dumps(data) if data else None),
        )

    def events(self, job_id: str, after: int = 0, limit: int = 200) -> list[dict]:
        self._row(job_id)
        rows = self._conn().execute(
            "SELECT * FROM events WHERE job_id=? AND id>? ORDER BY id LIMIT ?", (job_id, after, limit)
        ).fetchall()
        return [
            {"id": r["id"], "object": "fine_tuning.job.event", "created_at": r["created_at"], "level": r["level"],
             "message": r["message"], "data": json.loads(r["data"]) if r["data"] else None}
            for r in rows
        ]
