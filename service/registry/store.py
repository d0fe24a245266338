"""The on-disk adapter store: ``<root>/<name>/<version>/`` directories and a ``live`` pointer.

No torch here: the store only resolves names and versions to directories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidInput, NotFound

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BASE_NAMES = {"", "base", "none"}


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class InvalidAdapterName(InvalidInput):
    code = "invalid_adapter_name"


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: int
    path: Path


def parse_reference(reference: str) -> tuple[str, int | None] | None:
    """``"name"`` / ``"name@3"`` → (name, version); ``base``/empty → None (no adapter)."""
    reference = (reference or "").strip()
    if reference.lower() in BASE_NAMES:
        return None
    name, _, version = reference.partition("@")
    if not NAME.match(name) or ".." in name:
        raise InvalidAdapterName(f"invalid adapter name {name!r}: use lowercase letters, digits, '.', '_', '-'")
    if version:
        if not version.isdigit() or len(version) > 9:
            raise InvalidAdapterName(f"invalid adapter version {version!r}: use a positive integer")
        return name, int(version)
    return name, None


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def live_version(self, name: str) -> int | None:
        pointer = self.root / name / "live"
        if pointer.is_file():
            text = pointer.read_text().strip()
            if text.isdigit():
                return int(text)
        versions = self.versions(name)
        return versions[-1] if versions else None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name) and self.versions(p.name))

    def resolve(self, reference: str) -> AdapterRef | None:
        parsed = parse_reference(reference)
        if parsed is None:
            return None
        name, version = parsed
        if version is None:
            version = self.live_version(name)
            if version is None:
                raise AdapterNotFound(f"unknown adapter {name!r}")
        path = self.root / name / str(version)
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(f"adapter {name!r} has no version {version}")
        return AdapterRef(name, version, path)
