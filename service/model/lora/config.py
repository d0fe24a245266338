"""Adapter configuration, PEFT-compatible on disk (``adapter_config.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PEFT_TYPES = ("DUAL_LORA", "LORA")
DEFAULT_TARGETS = ("q_proj", "v_proj")


class AdapterConfigError(ValueError):
    """An adapter's configuration is invalid or unsupported."""


@dataclass
class AdapterConfig:
    """What an adapter is and which base it was trained for."""

    peft_type: str = field(default="DUAL_LORA", metadata={"help": "DUAL_LORA or LORA"})
    r: int = field(default=8, metadata={"help": "rank of the skill/task spaces"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale s = alpha / r (alpha / sqrt(r) with rslora)"})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "names of the language-model linears the adapter modifies"},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the skill-space input while training"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(r)"})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "base model id"})
    base_model_fingerprint: str | None = field(
        default=None, metadata={"help": "fingerprint of the base weights; a mismatch is refused"}
    )
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scale(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def validate(self) -> None:
        if self.peft_type not in PEFT_TYPES:
            raise AdapterConfigError(f"peft_type must be one of {PEFT_TYPES}, got {self.peft_type!r}")
        if not isinstance(self.r, int) or not 1 <= self.r <= 1024:
            raise AdapterConfigError(f"r must be an integer in 1..1024, got {self.r!r}")
        if not isinstance(self.lora_alpha, int | float) or not 0 < self.lora_alpha <= 1e4:
            raise AdapterConfigError(f"lora_alpha must be in (0, 1e4], got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterConfigError("target_modules must be a non-empty list of module names")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: Path) -> None:
        (Path(directory) / "adapter_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """Parse our own or a ``peft`` LoRA config, refusing the PEFT features we cannot serve."""
        if not isinstance(data, dict):
            raise AdapterConfigError("adapter_config.json must hold a JSON object")
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type == "LORA":
            unsupported = {
                "use_dora": bool(data.get("use_dora")),
                "bias": data.get("bias", "none") not in (None, "none"),
                "fan_in_fan_out": bool(data.get("fan_in_fan_out")),
                "rank_pattern": bool(data.get("rank_pattern")),
                "alpha_pattern": bool(data.get("alpha_pattern")),
                "modules_to_save": bool(data.get("modules_to_save")),
                "layers_to_transform": data.get("layers_to_transform") not in (None, []),
            }
            bad = [name for name, on in unsupported.items() if on]
            if bad:
                raise AdapterConfigError(f"unsupported LoRA options: {', '.join(bad)}")
        targets = data.get("target_modules")
        if isinstance(targets, str):
            raise AdapterConfigError("target_modules as a regular expression is not supported; list the names")
        try:
            return cls(
                peft_type=peft_type,
                r=data.get("r"),
                lora_alpha=data.get("lora_alpha", data.get("r")),
                target_modules=sorted(targets) if isinstance(targets, list | set | tuple) else [],
                lora_dropout=float(data.get("lora_dropout") or 0.0),
                use_rslora=bool(data.get("use_rslora", False)),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                base_model_fingerprint=data.get("base_model_fingerprint"),
                task_type=data.get("task_type") or "CAUSAL_LM",
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, AdapterConfigError):
                raise
            raise AdapterConfigError(f"invalid adapter config: {exc}") from exc

    @classmethod
    def load(cls, directory: Path) -> AdapterConfig:
        path = Path(directory) / "adapter_config.json"
        if not path.is_file():
            raise AdapterConfigError(f"{path} not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterConfigError(f"adapter_config.json is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
