"""``/v1/adapters``: list, inspect, import, promote (and roll back) and delete adapters.

Import takes an archive (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) holding ``adapter_config.json``
and ``adapter_model.safetensors`` at the top level or inside one folder. The archive is checked
before anything is written (member count, paths, links, declared sizes), only the two adapter
files are extracted (into a temp dir under ``data_dir``, counting the bytes actually written),
the engine checks the adapter can be served on this base, and the store publishes it as the
adapter's next version. No torch here: validation goes through ``engine.validate_adapter``.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.auth import check_adapter
from service.api.deps import EngineDep, SettingsDep
from service.api.schemas import ErrorResponse
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.registry.store import (
    ADAPTER_FILES,
    AdapterNotFound,
    AdapterStore,
    InvalidAdapterName,
    parse_reference,
    validate_name,
)

router = APIRouter(tags=["adapters"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 415, 422, 503)}

MAX_MEMBERS = 16  # entries in an archive, folders included
MAX_EXTRACTED_BYTES = 512 * 1024 * 1024  # declared and actual bytes of all files in an archive
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # the uploaded archive itself
_CHUNK = 1024 * 1024
_JUNK = re.compile(r"(^|/)(__MACOSX/|\._[^/]*$|\.DS_Store$)")


class InvalidArchive(InvalidInput):
    code = "invalid_archive"


class InvalidAdapter(InvalidInput):
    code = "invalid_adapter"


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, le=999_999_999, description="the version to make live")


def get_store(request: Request) -> AdapterStore:
    """The engine's store once the model is loaded; the same directory before (reads need no model)."""
    engine = request.app.state.engine
    store = getattr(engine, "store", None)
    if store is not None:
        return store
    return AdapterStore(request.app.state.settings.adapter_dir)


def _name_and_version(reference: str) -> tuple[str, int | None]:
    parsed = parse_reference(reference)
    if parsed is None:
        raise InvalidAdapterName(f"{reference!r} names the base model, not an adapter")
    return parsed


# ---------------------------------------------------------------------------------------- archives


def _member_parts(raw: str) -> tuple[str, ...]:
    """The path components of an archive member; refuses absolute paths and any ``..`` (zip-slip)."""
    if not raw or "\x00" in raw or "\\" in raw:
        raise InvalidArchive(f"archive member {raw!r} has an invalid path")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise InvalidArchive(f"archive member {raw!r} has an absolute path")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArchive(f"archive member {raw!r} points outside the archive")
    return parts


class _Entry:
    def __init__(self, parts: tuple[str, ...], size: int, open_: Callable[[], IO[bytes]]):
        self.parts, self.size, self.open = parts, size, open_


def _zip_entries(zf: zipfile.ZipFile) -> list[_Entry]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise InvalidArchive(f"archive has {len(infos)} members; at most {MAX_MEMBERS} are allowed")
    entries, declared = [], 0
    for info in infos:
        parts = _member_parts(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidArchive(f"archive member {info.filename!r} is a symbolic link")
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise InvalidArchive(f"archive member {info.filename!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise InvalidArchive(f"archive member {info.filename!r} is encrypted")
        declared += info.file_size
        if declared > MAX_EXTRACTED_BYTES:
            raise PayloadTooLarge(f"archive expands to more than {MAX_EXTRACTED_BYTES} bytes")
        entries.append(_Entry(parts, info.file_size, lambda info=info: zf.open(info)))
    return entries


def _tar_entries(tf: tarfile.TarFile) -> list[_Entry]:
    entries, declared, count = [], 0, 0
    while True:
        member = tf.next()  # reads one header at a time: a huge member list stops at MAX_MEMBERS + 1
        if member is None:
            break
        count += 1
        if count > MAX_MEMBERS:
            raise InvalidArchive(f"archive has more than {MAX_MEMBERS} members")
        parts = _member_parts(member.name)
        if member.issym() or member.islnk():
            raise InvalidArchive(f"archive member {member.name!r} is a link")
        if member.isdir():
            continue
        if not member.isreg():
            raise InvalidArchive(f"archive member {member.name!r} is not a regular file")
        declared += member.size
        if declared > MAX_EXTRACTED_BYTES:
            raise PayloadTooLarge(f"archive expands to more than {MAX_EXTRACTED_BYTES} bytes")
        entries.append(_Entry(parts, member.size, lambda member=member: tf.extractfile(member)))
    return entries


def _pick_adapter(entries: list[_Entry]) -> dict[str, _Entry]:
    """The two adapter files, both at the top level or both in the same single folder."""
    found: dict[tuple[str, ...], dict[str, _Entry]] = {}
    for entry in entries:
        path = "/".join(entry.parts)
        if _JUNK.search(path) or entry.parts[-1] not in ADAPTER_FILES or len(entry.parts) > 2:
            continue
        files = found.setdefault(entry.parts[:-1], {})
        if entry.parts[-1] in files:
            raise InvalidArchive(f"archive holds {path!r} twice")
        files[entry.parts[-1]] = entry
    complete = {prefix: files for prefix, files in found.items() if len(files) == len(ADAPTER_FILES)}
    if len(complete) > 1:
        folders = sorted("/".join(p) or "(top level)" for p in complete)
        raise InvalidArchive(f"archive holds more than one adapter ({', '.join(folders)}); upload one at a time")
    if not complete:
        raise InvalidArchive(f"archive must hold {' and '.join(ADAPTER_FILES)} at the top level or inside one folder")
    return next(iter(complete.values()))


def _extract(entry: _Entry, target: Path, budget: int) -> tuple[int, str]:
    """Copy one member to ``target``, never writing more than its declared size or ``budget``."""
    limit = min(entry.size, budget)
    written, digest = 0, hashlib.sha256()
    with entry.open() as src, open(target, "wb") as dst:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                if written > budget:
                    raise PayloadTooLarge(f"archive expands to more than {MAX_EXTRACTED_BYTES} bytes")
                raise InvalidArchive(f"archive member {'/'.join(entry.parts)!r} is larger than it declares")
            digest.update(chunk)
            dst.write(chunk)
    if written != entry.size:
        raise InvalidArchive(f"archive member {'/'.join(entry.parts)!r} is truncated")
    return written, digest.hexdigest()


def extract_adapter_archive(archive: IO[bytes], target: Path) -> dict[str, Any]:
    """Check ``archive`` and extract its adapter files into the directory ``target``.

    Returns what was extracted (kind, bytes, the weights' sha256). Raises 415 for something that
    is not a zip or tar archive, 413 for too much data, 422 for a bad archive.
    """
    archive.seek(0)
    head = archive.read(8)
    archive.seek(0)
    try:
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            kind = "zip"
            with zipfile.ZipFile(archive) as zf:
                return _extract_entries(kind, _zip_entries(zf), target)
        if _is_tar(archive):
            archive.seek(0)
            with tarfile.open(fileobj=archive, mode="r:*") as tf:
                kind = "tar"
                return _extract_entries(kind, _tar_entries(tf), target)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        tarfile.TarError,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        OSError,
        ValueError,
        NotImplementedError,
    ) as exc:
        raise InvalidArchive(f"archive is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc
    raise UnsupportedMedia("archive must be a .zip or .tar (optionally .gz, .bz2 or .xz) file")


def _is_tar(archive: IO[bytes]) -> bool:
    try:
        archive.seek(0)
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError, ValueError, tarfile.TarError):
        return False
    finally:
        archive.seek(0)


def _extract_entries(kind: str, entries: list[_Entry], target: Path) -> dict[str, Any]:
    files = _pick_adapter(entries)
    total, budget, sha = 0, MAX_EXTRACTED_BYTES, ""
    for filename in ADAPTER_FILES:
        written, digest = _extract(files[filename], target / filename, budget)
        total, budget = total + written, budget - written
        if filename == ADAPTER_FILES[1]:
            sha = digest
    return {"archive": kind, "bytes": total, "weights_sha256": sha}


def _flag(value: str | None, field: str, default: bool) -> bool:
    if value is None or value == "":
        return default
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"{field} must be true or false, got {value!r}")


# ------------------------------------------------------------------------------------------ routes


@router.get("/v1/adapters", responses=ERRORS)
def list_adapters(request: Request) -> dict:
    return {"object": "list", "data": get_store(request).list()}


@router.get("/v1/adapters/{name}", responses=ERRORS)
def get_adapter(request: Request, name: str) -> dict:
    """One adapter with all its versions; ``name@3`` gives that version alone."""
    name, version = _name_and_version(name)
    info = get_store(request).info(name)
    if version is None:
        return info
    for entry in info["versions"]:
        if entry["version"] == version:
            return {"object": "adapter.version", "name": name, **entry}
    raise AdapterNotFound(f"adapter {name!r} has no version {version}")


@router.post("/v1/adapters", status_code=201, responses=ERRORS)
async def import_adapter(request: Request, settings: SettingsDep, engine: EngineDep) -> dict:
    """Import a PEFT LoRA or Dual-LoRA adapter archive as the next version of ``name``."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMedia("send multipart/form-data with a 'name' field and an 'archive' file")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD_BYTES + _CHUNK:
        raise PayloadTooLarge(f"the archive must be at most {MAX_UPLOAD_BYTES} bytes")
    form = await request.form(max_files=1, max_fields=8)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("name: a form field naming the adapter is required")
        name = validate_name(name.strip())
        check_adapter(request, name)
        promote = form.get("promote")
        make_live = _flag(promote if isinstance(promote, str) else None, "promote", default=True)
        upload = form.get("archive")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("archive: a file field holding the adapter archive is required")
        if upload.size is not None and upload.size > MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"the archive must be at most {MAX_UPLOAD_BYTES} bytes")

        uploads = Path(settings.data_dir) / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="adapter-", dir=uploads))
        try:
            extracted = await run_in_threadpool(extract_adapter_archive, upload.file, workdir)
            try:
                config = await run_in_threadpool(engine.validate_adapter, workdir)
            except InvalidInput as exc:
                raise InvalidAdapter(exc.message) from exc
            metadata = {
                "source": "upload",
                "filename": (upload.filename or "")[:255] or None,
                **extracted,
            }
            ref = await run_in_threadpool(engine.store.publish, name, workdir, metadata, make_live)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        await form.close()
    live = engine.store.live_version(name)
    return {
        "object": "adapter.version",
        "name": ref.name,
        "version": ref.version,
        "live": live == ref.version,
        "live_version": live,
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
    }


@router.post("/v1/adapters/{name}/promote", responses=ERRORS)
def promote_adapter(request: Request, name: str, body: PromoteRequest) -> dict:
    """Make ``version`` the live version of ``name`` (also how to roll back)."""
    name, version = _name_and_version(name)
    if version is not None:
        raise InvalidAdapterName("promote takes the adapter name in the path and the version in the body")
    check_adapter(request, name)
    return get_store(request).promote(name, body.version)


@router.delete("/v1/adapters/{name}", responses=ERRORS)
def delete_adapter(request: Request, name: str) -> dict:
    """``DELETE /v1/adapters/name`` removes every version; ``name@3`` removes one (not the live one)."""
    name, version = _name_and_version(name)
    check_adapter(request, name)
    return get_store(request).delete(name, version)
