"""Helpers shared by service-level tests."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import torch
from PIL import Image

from service.model.lora import AdapterConfig, save_adapter


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
