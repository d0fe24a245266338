"""Helpers shared by service-level tests."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from service.model.lora import AdapterConfig, save_adapter


def load_bench_script(name: str):
    """Import ``bench/<name>.py`` (the scripts are not a package) as a module."""
    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(color=(200, 20, 20), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def publish_random_adapter(base, store: Path, name: str, version: int, seed: int, live: bool = True,
                           peft_type: str = "DUAL_LORA") -> Path:
    """Write a random adapter (large B, so answers change) as ``store/name/version``."""
    config = AdapterConfig(peft_type=peft_type, r=4, lora_alpha=8, base_model_fingerprint=base.fingerprint)
    adapter = base.slots.new_adapter(config, seed=seed)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1.0, generator=torch.Generator().manual_seed(seed))
    path = store / name / str(version)
    save_adapter(path, config, adapter)
    if live:
        (store / name / "live").write_text(f"{version}\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args: list[str], env: dict) -> subprocess.Popen:
    """``python -m service <args>`` in a subprocess with extra environment; its output goes to a log
    file (``proc.log_path``) that :func:`wait_ready` shows when the process does not come up."""
    log = tempfile.NamedTemporaryFile("wb", prefix="service-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "service", *args], env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = Path(log.name)
    return proc


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Wait for ``url``'s /readyz; fail at once if ``proc`` exits, showing the end of its log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if is_ready(url):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = proc.log_path.read_text(errors="replace")[-3000:] if hasattr(proc, "log_path") else ""
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
    pytest.fail(f"{url}: {state}; end of its log:\n{tail}")


def wait_until(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if hasattr(p, "log_path"):
            p.log_path.unlink(missing_ok=True)


def poll(condition, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return False


def bias_eos(base, bias: float) -> None:
    """Replace the LM head by a copy whose EOS logit is shifted by ``bias`` (+: always stop, -: never)."""
    head = base.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[base.tokenizer.eos_token_id] = bias
    base.model.lm_head = biased
