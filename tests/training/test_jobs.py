"""The SQLite job store: transitions, atomic claims, cancel, stale recovery, paging."""

from __future__ import annotations

import threading
import time

import pytest

from service.errors import NotFound
from service.training.jobs import JobConflict, JobStore


@pytest.fixture(params=["sqlite", "postgres"])
def jobs(request, tmp_path):
    """The same tests on both backends; each PostgreSQL run starts from empty tables."""
    if request.param == "sqlite":
        return JobStore(tmp_path / "jobs.db")
    store = JobStore(request.getfixturevalue("postgres_url"))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE ft_jobs, ft_events RESTART IDENTITY")
    return store


def new(jobs, name="a"):
    return jobs.create(name, {"rank": 4}, "/nowhere", 10)


def test_create_get_and_openai_like_fields(jobs):
    job = new(jobs)
    assert job["status"] == "queued" and job["object"] == "fine_tuning.job"
    assert job["hyperparameters"] == {"rank": 4} and job["n_examples"] == 10
    assert jobs.get(job["id"]) == job
    with pytest.raises(NotFound):
        jobs.get("ftjob-missing")


def test_only_one_worker_claims_a_job(jobs):
    job = new(jobs)
    wins = []

    def claim(i):
        if JobStore(jobs.path).claim(job["id"], f"w{i}"):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert jobs.get(job["id"])["status"] == "running"


def test_cancel_queued_and_running(jobs):
    queued, running = new(jobs), new(jobs)
    assert jobs.cancel(queued["id"])["status"] == "cancelled"
    assert not jobs.claim(queued["id"], "w")
    assert jobs.claim(running["id"], "w")
    assert jobs.cancel(running["id"])["status"] == "running"  # stops at its next step
    assert jobs.heartbeat(running["id"], {"step": 1}) is False
    jobs.finish(running["id"], "cancelled")
    with pytest.raises(JobConflict):
        jobs.cancel(running["id"])


def test_stale_running_jobs_are_requeued_with_an_event(jobs):
    job = new(jobs)
    assert jobs.claim(job["id"], "w")
    assert jobs.requeue_stale(stale_after_s=60) == []
    time.sleep(0.05)
    assert jobs.requeue_stale(stale_after_s=0.01) == [job["id"]]
    assert jobs.get(job["id"])["status"] == "queued"
    assert any("re-queued" in e["message"] for e in jobs.events(job["id"]))
    assert jobs.claim(job["id"], "w2") and jobs.internal(job["id"])["attempts"] == 2


def test_paging_newest_first_and_events_after(jobs):
    ids = [new(jobs)["id"] for _ in range(5)]
    page, more = jobs.list(limit=2)
    assert [j["id"] for j in page] == ids[::-1][:2] and more
    page2, more2 = jobs.list(limit=10, after=page[-1]["id"])
    assert [j["id"] for j in page2] == ids[::-1][2:] and not more2
    for i in range(3):
        jobs.add_event(ids[0], "info", f"m{i}")
    events = jobs.events(ids[0])
    later = jobs.events(ids[0], after=events[1]["id"])
    assert [e["message"] for e in later] == [e["message"] for e in events[2:]]


def _open_store_at_barrier(url: str, barrier) -> str:
    barrier.wait()
    try:
        JobStore(url)
        return "ok"
    except Exception as exc:  # reported to the parent, which asserts on it
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_processes_starting_together_on_a_fresh_database_all_open_it(backend, request, tmp_path):
    """Two API replicas and a trainer start at once: every one must come up (a create_all race on a
    fresh PostgreSQL database used to fail one of them on pg_type's unique index)."""
    import multiprocessing

    import psycopg

    ctx = multiprocessing.get_context("spawn")
    for round_ in range(4):
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'jobs{round_}.db'}"
        else:
            server = request.getfixturevalue("postgres_url").rsplit("/", 1)[0]
            with psycopg.connect(server + "/postgres", autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE race_{round_}")
            url = f"{server}/race_{round_}"
        with ctx.Manager() as manager:
            barrier = manager.Barrier(4)
            with ctx.Pool(4) as pool:
                results = pool.starmap(_open_store_at_barrier, [(url, barrier)] * 4)
        assert results == ["ok"] * 4, results
