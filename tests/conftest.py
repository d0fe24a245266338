"""Shared fixtures: tiny random LLaVA bases written to temp dirs and loaded by the real code."""

from __future__ import annotations

import logging

import pytest
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    from service.model.presets import build_random_base

    return build_random_base(tmp_path_factory.mktemp("tiny-base"), "tiny", seed=0)


@pytest.fixture()
def tiny_base(tiny_base_dir, caplog):
    from service.model.base import load_base

    with caplog.at_level(logging.ERROR):
        return load_base(tiny_base_dir, n_slots=4, max_rank=8)


@pytest.fixture(scope="session")
def learnable_base_dir(tmp_path_factory, tiny_base_dir):
    """The tiny base with a sharper lm_head: a random model's logits are too flat for any adapter to
    make an answer likely (see tests/model/test_training.py)."""
    import torch

    from service.model.base import load_base, save_base

    base = load_base(tiny_base_dir, n_slots=0)
    with torch.no_grad():
        base.model.lm_head.weight.mul_(25)
    out = tmp_path_factory.mktemp("learnable-base")
    save_base(base, out)
    return out


def _require_binary(found, name: str):
    import os

    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (.ci/run installs it)")
    pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (initdb + pg_ctl; runs as `postgres` when we are root)."""
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile
    from pathlib import Path

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    initdb = _require_binary(candidates[-1] if candidates and candidates[-1] else None, "PostgreSQL (initdb)")
    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    os.chmod(root, 0o777)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                    "start"], check=True, capture_output=True)
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE jobs")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/jobs"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def redis_url(tmp_path):
    import shutil
    import socket
    import subprocess
    import time

    from tests.helpers import free_port

    binary = _require_binary(shutil.which("redis-server"), "redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
