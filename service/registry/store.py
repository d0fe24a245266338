"""The on-disk adapter store: ``<root>/<name>/<version>/`` directories and a ``live`` pointer.

No torch here: the store only resolves names and versions to directories and manages them.

Layout::

    <root>/<name>/<version>/adapter_config.json        immutable once published
    <root>/<name>/<version>/adapter_model.safetensors
    <root>/<name>/<version>/metrics.json               evaluation at publish time ({} if none)
    <root>/<name>/<version>/metadata.json              created_at, source, job_id, metrics, ...
    <root>/<name>/live                                 the version requests get by default
    <root>/<name>/.lock                                flock'd by every writer of <name>
    <root>/.versions/<name>                            highest version ever published for <name>

Writers (publish, promote, delete) take an exclusive ``fcntl.flock`` on ``<root>/<name>/.lock``,
so publishers in different processes (API replicas, trainer processes) sharing one store get
distinct versions. A version is written to a temporary directory inside ``<root>/<name>/`` and
renamed into place atomically; ``live`` is replaced with ``os.replace``. Readers take no lock:
every change they can observe is a single rename.

Version numbers are never reused, not even after a version or the whole adapter is deleted, so
``name@3`` always means the same weights (caches keyed on name and version stay correct).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import InvalidInput, NotFound, ServiceError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
BASE_NAMES = {"", "base", "none"}

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
METRICS_FILE = "metrics.json"
METADATA_FILE = "metadata.json"
LIVE_FILE = "live"
LOCK_FILE = ".lock"
HIGH_WATER_DIR = ".versions"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".deleted-"
MAX_VERSION = 999_999_999


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class InvalidAdapterName(InvalidInput):
    code = "invalid_adapter_name"


class Conflict(ServiceError):
    status, code = 409, "conflict"


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


def validate_name(name: str) -> str:
    """An adapter name fit for a directory: no version, not a reserved name, cannot leave the root."""
    if not isinstance(name, str) or name != name.strip():
        raise InvalidAdapterName(f"invalid adapter name {name!r}: no surrounding spaces")
    if name.lower() in BASE_NAMES:
        raise InvalidAdapterName(f"{name!r} is reserved for the base model (no adapter); choose another name")
    if "@" in name:
        raise InvalidAdapterName(f"invalid adapter name {name!r}: a name carries no '@version' here")
    parsed = parse_reference(name)
    assert parsed is not None and parsed[1] is None
    return parsed[0]


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ reading

    def _folder(self, name: str) -> Path:
        """``<root>/<name>`` for a valid name, checked to lie directly under the root."""
        name = validate_name(name)
        folder = self.root / name
        if folder.parent != self.root or folder.name != name:  # defence in depth; NAME already forbids it
            raise InvalidAdapterName(f"invalid adapter name {name!r}")
        return folder

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def _live_pointer(self, name: str) -> int | None:
        pointer = self.root / name / LIVE_FILE
        try:
            text = pointer.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def live_version(self, name: str) -> int | None:
        version = self._live_pointer(name)
        if version is not None:
            return version
        versions = self.versions(name)
        return versions[-1] if versions else None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name) and self.versions(p.name)
        )

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
        if not (path / CONFIG_FILE).is_file():
            raise AdapterNotFound(f"adapter {name!r} has no version {version}")
        return AdapterRef(name, version, path)

    def _version_info(self, name: str, version: int, live: int | None) -> dict:
        path = self.root / name / str(version)
        meta = _read_json(path / METADATA_FILE)
        metrics = _read_json(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else meta.get("metrics") or {}
        config = _read_json(path / CONFIG_FILE)
        created_at = meta.get("created_at")
        if not isinstance(created_at, int):
            try:
                created_at = int(path.stat().st_mtime)
            except OSError:
                created_at = None
        info = {
            "version": version,
            "live": version == live,
            "created_at": created_at,
            "source": meta.get("source"),
            "job_id": meta.get("job_id"),
            "metrics": metrics,
            "peft_type": config.get("peft_type"),
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "target_modules": config.get("target_modules"),
            "base_model_fingerprint": config.get("base_model_fingerprint"),
        }
        extra = {k: v for k, v in meta.items() if k not in info and k not in ("name", "metrics")}
        if extra:
            info["metadata"] = extra
        return info

    def info(self, name: str) -> dict:
        """Every version of ``name`` (created_at, metrics, config summary) and which one is live."""
        self._folder(name)
        versions = self.versions(name)
        if not versions:
            raise AdapterNotFound(f"unknown adapter {name!r}")
        live = self.live_version(name)
        entries = [self._version_info(name, v, live) for v in versions]
        return {
            "object": "adapter",
            "name": name,
            "live_version": live,
            "latest_version": versions[-1],
            "created_at": entries[0]["created_at"],
            "updated_at": max((e["created_at"] or 0) for e in entries) or None,
            "versions": entries,
        }

    def list(self) -> list[dict]:
        """A summary of every adapter: name, live and latest version, version numbers."""
        out = []
        for name in self.names():
            versions = self.versions(name)
            if not versions:  # deleted meanwhile
                continue
            live = self.live_version(name)
            live_info = self._version_info(name, live, live) if live in versions else {}
            out.append(
                {
                    "object": "adapter",
                    "name": name,
                    "live_version": live,
                    "latest_version": versions[-1],
                    "versions": versions,
                    "peft_type": live_info.get("peft_type"),
                    "metrics": live_info.get("metrics", {}),
                    "created_at": live_info.get("created_at"),
                }
            )
        return out

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _locked(self, name: str, create: bool) -> Iterator[Path]:
        """Hold the exclusive lock of ``<root>/<name>``; yields the folder.

        A whole-adapter delete renames the folder away while holding the lock, so after
        acquiring it we check that our lock file is still the one at ``<root>/<name>/.lock``.
        """
        folder = self._folder(name)
        for _ in range(100):
            if create:
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                raise AdapterNotFound(f"unknown adapter {name!r}")
            try:
                fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder vanished between mkdir and open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(folder / LOCK_FILE).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    continue  # deleted meanwhile: retry on the new folder (or report it unknown)
                yield folder
                return
            finally:
                os.close(fd)  # closing releases the flock
        raise Conflict(f"adapter {name!r} is changing too often; try again")

    def _high_water(self, name: str) -> int:
        try:
            text = (self.root / HIGH_WATER_DIR / name).read_text().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def _set_live(self, folder: Path, version: int) -> None:
        _write_atomic(folder / LIVE_FILE, f"{version}\n")

    def publish(
        self,
        name: str,
        source_dir: Path,
        metadata: dict[str, Any] | None = None,
        make_live: bool = True,
    ) -> AdapterRef:
        """Copy an adapter directory into the store as ``name``'s next version.

        ``metadata`` may hold ``source``, ``job_id``, ``metrics`` (written to ``metrics.json`` too)
        and any other JSON values; ``created_at`` is set here. ``make_live=False`` keeps the current
        live version live (the first version of a new adapter is live regardless: it is the only one).
        """
        name = validate_name(name)
        source_dir = Path(source_dir)
        metadata = dict(metadata or {})
        metrics = metadata.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise InvalidInput("metadata.metrics must be a JSON object")
        for filename in ADAPTER_FILES:
            path = source_dir / filename
            if path.is_symlink() or not path.is_file():
                raise InvalidInput(f"{filename} is missing from {source_dir}")

        folder = self._folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            try:
                for filename in ADAPTER_FILES:
                    shutil.copyfile(source_dir / filename, tmp / filename)
                    with open(tmp / filename, "rb") as f:
                        os.fsync(f.fileno())
            except FileNotFoundError as exc:
                if tmp.is_dir():
                    raise
                raise Conflict(
                    f"adapter {name!r} was deleted while this version was being published; publish again"
                ) from exc
            with self._locked(name, create=True) as folder:
                if not tmp.is_dir():  # the adapter was deleted (folder renamed away) while we copied
                    raise Conflict(
                        f"adapter {name!r} was deleted while this version was being published; publish again"
                    )
                self._sweep(folder, keep=tmp)
                existing = self.versions(name)
                version = max([self._high_water(name), *existing, 0]) + 1
                if version > MAX_VERSION:
                    raise Conflict(f"adapter {name!r} has run out of version numbers")
                record = {
                    **{k: v for k, v in metadata.items() if k not in ("created_at", "name", "version")},
                    "name": name,
                    "version": version,
                    "created_at": int(time.time()),
                    "source": metadata.get("source"),
                    "job_id": metadata.get("job_id"),
                    "metrics": metrics,
                }
                try:
                    meta_text = json.dumps(record, indent=2, sort_keys=True) + "\n"
                    metrics_text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(f"metadata must be JSON-serialisable: {exc}") from exc
                for filename, text in ((METADATA_FILE, meta_text), (METRICS_FILE, metrics_text)):
                    with open(tmp / filename, "w") as f:
                        f.write(text)
                        f.flush()
                        os.fsync(f.fileno())
                _fsync_dir(tmp)
                target = folder / str(version)
                if target.exists():  # never overwrite a version (rename would replace an empty dir)
                    raise Conflict(f"adapter {name!r} version {version} already exists")
                os.rename(tmp, target)
                _fsync_dir(folder)
                water = self.root / HIGH_WATER_DIR
                water.mkdir(exist_ok=True)
                _write_atomic(water / name, f"{version}\n")
                if make_live or not existing:
                    self._set_live(folder, version)
                elif self._live_pointer(name) is None:
                    # live was implicit (the newest version): pin it so the new one does not take over
                    self._set_live(folder, existing[-1])
                return AdapterRef(name, version, target)
        finally:
            if tmp.exists():
                _remove_tree(tmp)

    def promote(self, name: str, version: int) -> dict:
        """Point ``name``'s live alias at ``version`` (also how to roll back)."""
        name = validate_name(name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidInput(f"version must be a positive integer, got {version!r}")
        with self._locked(name, create=False) as folder:
            versions = self.versions(name)
            if not versions:
                raise AdapterNotFound(f"unknown adapter {name!r}")
            if version not in versions:
                raise AdapterNotFound(f"adapter {name!r} has no version {version} (versions: {versions})")
            previous = self.live_version(name)
            self._set_live(folder, version)
        return {"name": name, "live_version": version, "previous_live_version": previous}

    def delete(self, name: str, version: int | None = None) -> dict:
        """Delete one version, or the whole adapter when ``version`` is None.

        The live version of an adapter with other versions cannot be deleted (409): promote
        another version first, or delete the whole adapter. Deleting the only version deletes
        the adapter.
        """
        name = validate_name(name)
        with self._locked(name, create=False) as folder:
            versions = self.versions(name)
            if not versions:
                raise AdapterNotFound(f"unknown adapter {name!r}")
            if version is not None:
                if version not in versions:
                    raise AdapterNotFound(f"adapter {name!r} has no version {version} (versions: {versions})")
                if len(versions) > 1:
                    live = self.live_version(name)
                    if version == live:
                        raise Conflict(
                            f"version {version} is the live version of {name!r}; promote another version first "
                            f"or delete the whole adapter"
                        )
                    if self._live_pointer(name) is None:
                        self._set_live(folder, live)  # keep the implicit live version live
                    trash = folder / f"{_TRASH_PREFIX}{version}-{uuid.uuid4().hex[:12]}"
                    os.rename(folder / str(version), trash)
                    _fsync_dir(folder)
                    _remove_tree(trash)
                    return {"name": name, "version": version, "deleted": True, "live_version": live}
            # the whole adapter: one rename makes it vanish for readers, then clean up
            trash = self.root / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
            os.rename(folder, trash)
            _fsync_dir(self.root)
        _remove_tree(trash)
        return {"name": name, "version": version, "deleted": True, "live_version": None}

    @staticmethod
    def _sweep(folder: Path, keep: Path, max_age_s: float = 6 * 3600.0) -> None:
        """Remove temp/trash entries in ``folder`` left by crashed writers long ago."""
        now = time.time()
        for path in folder.iterdir():
            if path == keep or not path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                continue
            try:
                if now - path.stat().st_mtime <= max_age_s:
                    continue
                if path.is_dir():
                    _remove_tree(path)
                else:
                    path.unlink()
            except OSError:
                pass

    def cleanup(self, max_age_s: float = 3600.0) -> int:
        """Remove temp and trash directories left by crashed writers (older than ``max_age_s``)."""
        removed = 0
        if not self.root.is_dir():
            return 0
        now = time.time()
        candidates = [p for p in self.root.iterdir() if p.name.startswith(_TRASH_PREFIX)]
        for folder in self.root.iterdir():
            if folder.is_dir() and NAME.match(folder.name):
                candidates += [p for p in folder.iterdir() if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))]
        for path in candidates:
            try:
                if now - path.stat().st_mtime < max_age_s:
                    continue
                if path.is_dir():
                    _remove_tree(path)
                else:
                    path.unlink()
                removed += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return removed
