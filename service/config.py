"""Service settings, from flags and the environment (``SERVICE_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = PACKAGE_DIR / "assets" / "demo-base"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVICE_", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Field(Path("data"), description="job database, uploads, checkpoints")
    adapter_dir: Path = Field(Path("adapters"), description="the adapter store served")
    model: Path = Field(DEFAULT_MODEL_DIR, description="a local LLaVA directory (the embedded demo base by default)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="intra-op threads of the model (default: torch's, one per core); on a "
        "2-core CPU, 1 served cached images as fast at half the CPU, but new images 15 % slower (docs/benchmarks.md)"
    )
    n_slots: int = Field(8, ge=1, le=256, description="resident adapter slots")
    max_rank: int = Field(64, ge=1, le=1024, description="largest adapter rank a slot holds")
    adapter_targets: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        min_length=1,
        description="LLM linears that get adapter slots; fine-tunes adapt all of them by default (docs/ablation.md)",
    )
    max_images: int = Field(4, ge=1, le=64, description="images per request")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="bytes per image")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="pixels per decoded image")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="upper bound on a request's max_new_tokens")
    max_instruction_chars: int = Field(4000, ge=1)
    max_batch_size: int = Field(16, ge=1, le=256, description="rows decoding together")
    max_wait_ms: float = Field(
        10.0, ge=0, le=10_000, description="with nothing running, how long the first request waits for company "
        "(only after a batch of more than one row)"
    )
    join_ratio: float = Field(
        1.0, ge=0, le=100, description="requests waiting join a running batch once there are this many per running row "
        "(0: at the next step); gathered, they prefill as one larger group, cheaper per row"
    )
    max_join_steps: int = Field(
        8, ge=0, le=10_000, description="...or once the oldest has waited this many decode steps (0: at the next step)"
    )
    prefix_cache_mb: int = Field(
        256, ge=0, le=1_000_000, description="memory for the keys and values of image prefixes, reused by later "
        "questions on the same images and adapter (0: off)"
    )
    decoded_image_cache_mb: int = Field(
        64, ge=0, le=1_000_000, description="memory for uploaded images decoded recently (RGB pixels), so that "
        "later requests with the same image bytes skip decoding and hashing them (0: off)"
    )
    max_queue: int = Field(256, ge=1, description="waiting requests before answering 429")
    request_timeout_s: float = Field(300.0, gt=0, description="a request's limit, queueing included")
    redis_url: str | None = Field(None, description="Redis queue for trainers on other machines (default: SQLite)")
    database_url: str | None = Field(
        None, description="job records: postgresql://... shared by API replicas (default: SQLite in the data dir)"
    )
    embedded_trainer: bool = Field(True, description="train queued jobs inside the server process")
    max_concurrent_jobs: int = Field(1, ge=1, le=16, description="jobs the embedded trainer runs at once")
    job_stale_after_s: float = Field(60.0, gt=0, description="a running job without heartbeat this long is re-queued")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="dataset upload size cap")
    max_examples: int = Field(20_000, ge=1, description="examples per fine-tuning dataset")
    api_keys_file: Path | None = Field(None, description="JSON file of hashed API keys; unset = no auth (loopback only)")
    insecure: bool = Field(False, description="allow binding a non-loopback address without API keys")
    rate_limit_per_minute: int = Field(0, ge=0, description="requests a minute per API key (0 = unlimited)")

    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def check_safe_to_serve(self) -> None:
        """Refuse to expose an unauthenticated server beyond this machine unless told to."""
        if not self.is_loopback() and self.api_keys_file is None and not self.insecure:
            raise ValueError(
                f"refusing to bind {self.host} without API keys: set SERVICE_API_KEYS_FILE "
                "(create keys with `python -m service keys add`) or SERVICE_INSECURE=true"
            )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError("device must be auto, cpu or cuda[:N]")
        return value
