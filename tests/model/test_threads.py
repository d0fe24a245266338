"""Torch work on a thread of its own: results, errors, and no OpenMP team left behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from service.model.threads import run_in_own_thread
from service.training import runtime


def test_returns_the_result_and_raises_the_error_on_the_callers_thread():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert run_in_own_thread(work, 2, b=3, name="adder") == 5
    assert seen[0] is not threading.current_thread() and seen[0].name == "adder" and not seen[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        run_in_own_thread(lambda: 1 / 0)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: no OpenMP team to leave behind")
def test_no_openmp_team_outlives_the_work():
    """A thread that runs a parallel operator keeps an OpenMP worker team while it lives (which
    slows every other thread's operators, see service/model/threads.py); the work's own thread
    takes its team with it. Counted in a fresh process, as OS threads."""
    script = textwrap.dedent("""
        import os, threading, time, torch
        from service.model.threads import run_in_own_thread
        count = lambda: len(os.listdir("/proc/self/task"))
        work = lambda: torch.ones(1 << 22).mul_(2).sum()
        def settle(done):  # threads exit (and start) asynchronously: wait up to 5 s
            deadline = time.time() + 5
            while not done(count()) and time.time() < deadline:
                time.sleep(0.05)
            return count()
        start = count()
        run_in_own_thread(work)
        after_own = settle(lambda n: n == start)
        stop = threading.Event()
        lives = threading.Thread(target=lambda: (work(), stop.wait()))
        lives.start()
        while_long_lived = settle(lambda n: n >= start + 2)
        stop.set()
        lives.join()
        print(start, after_own, while_long_lived)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    start, after_own, while_long_lived = map(int, out.stdout.split())
    assert after_own == start
    assert while_long_lived >= start + 2  # the thread itself and at least one worker of its team


def test_a_fine_tune_runs_on_a_thread_that_ends_with_it(monkeypatch):
    ran_on = []

    class Runner:
        def run(self, job_id):
            ran_on.append((job_id, threading.current_thread()))

    monkeypatch.setattr(runtime, "_runner", Runner())
    monkeypatch.setattr(runtime, "_ready", threading.Event())
    runtime._ready.set()
    runtime.run("ftjob-1")
    (job_id, thread), = ran_on
    assert job_id == "ftjob-1" and thread is not threading.current_thread() and not thread.is_alive()
