"""Validate an uploaded fine-tuning dataset (DESIGN.md section 4) before a job is queued.

Two upload formats are accepted:

* a ZIP holding ``data.jsonl`` (at the top level or inside a single top-level
  folder) and the images it references by member path;
* a bare JSONL whose images are embedded as base64 or ``data:image/...;base64,`` URLs.

Each line is a record ``{"image": "imgs/001.png" | [...], "instruction": ..., "answer": ...}``
(``images`` is an alias of ``image``; no image means a text-only example) or a
LLaVA-style ``{"image": ..., "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}, ...]}`` record, whose human/gpt pairs each become an example.

Everything is checked before :func:`parse_dataset` returns: a bad dataset raises
:class:`~service.errors.InvalidInput` (422) naming the line or archive member and the
problem, :class:`~service.errors.PayloadTooLarge` (413) for size limits (zip bombs,
decompression bombs, too many examples) or :class:`~service.errors.UnsupportedMedia`
(415) for a file that is neither a ZIP nor JSONL.

This module runs in the HTTP layer: stdlib and PIL only, never torch.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import io
import json
import lzma
import os
import random
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from service.api.images import decode_image
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

__all__ = [
    "DATA_FILE",
    "IMAGE_DIR",
    "DatasetLimits",
    "Example",
    "ParsedDataset",
    "load_directory",
    "parse_dataset",
    "split_validation",
]

MiB = 1 << 20
DATA_FILE = "data.jsonl"
IMAGE_DIR = "imgs"
META_FILE = "meta.json"

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_BINARY_MAGICS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"\x1f\x8b", b"%PDF", b"BM", b"RIFF", b"7z\xbc\xaf",
                  b"Rar!", b"BZh", b"\xfd7zXZ")
_SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_RATIO_FLOOR = MiB  # members smaller than this are never treated as zip bombs
_CHUNK = MiB
_MAX_WARNINGS = 50
_HUMAN_ROLES = frozenset({"human", "user"})
_GPT_ROLES = frozenset({"gpt", "assistant", "model"})
_PLACEHOLDER = "<image>"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_DRIVE = re.compile(r"^[A-Za-z]:")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9._\- ]{1,128}")
_IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


@dataclass
class DatasetLimits:
    """Caps applied while validating an upload (all sizes in bytes)."""

    max_upload_bytes: int = 512 * MiB
    max_examples: int = 20_000
    max_images_per_example: int = 4
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 4096 * 4096
    max_members: int = 50_000
    max_uncompressed_bytes: int = 2048 * MiB
    max_compression_ratio: float = 200.0
    max_text_chars: int = 4000
    min_examples: int = 1

    @property
    def max_line_bytes(self) -> int:
        """Longest accepted JSONL line: the allowed inline images plus generous room for text."""
        return min(self.max_images_per_example * (self.max_image_bytes * 4 // 3 + 1024) + 8 * MiB, 1 << 62)


_HUGE = 1 << 62
_TRUSTED_LIMITS = DatasetLimits(_HUGE, _HUGE, _HUGE, _HUGE, _HUGE, _HUGE, _HUGE, float(_HUGE), _HUGE, 0)
"""What :func:`load_directory` applies by default: the data was validated on upload."""


@dataclass
class Example:
    """One training example; ``images`` are keys of :attr:`ParsedDataset.image_bytes`."""

    instruction: str
    answer: str
    images: list[str] = field(default_factory=list)


@dataclass
class ParsedDataset:
    """A validated dataset: examples plus the (distinct, already validated) image bytes."""

    examples: list[Example]
    image_bytes: dict[str, bytes]
    source_format: str
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def image(self, name: str) -> Image.Image:
        """The image ``name`` decoded as RGB."""
        image = Image.open(io.BytesIO(self.image_bytes[name]))
        image.load()
        return image.convert("RGB")

    def to_directory(self, path: str | os.PathLike[str]) -> Path:
        """Write a normalised copy (``data.jsonl`` + ``imgs/...`` + ``meta.json``) for the worker.

        Image files keep their ids as names where those are plain and unique
        (``imgs/001.png`` stays ``imgs/001.png``); others get a content-hash name.
        The result is itself a valid (unzipped) upload; read it with :func:`load_directory`.
        """
        root = Path(path)
        (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        names = _file_names(self.image_bytes)
        for image_id, data in self.image_bytes.items():
            target = root / names[image_id]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        with (root / DATA_FILE).open("w", encoding="utf-8", newline="\n") as handle:
            for example in self.examples:
                record = {"image": [names[i] for i in example.images], "instruction": example.instruction,
                          "answer": example.answer}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        meta = {"source_format": self.source_format, "warnings": self.warnings,
                "n_examples": len(self.examples), "n_images": len(self.image_bytes)}
        (root / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return root


# --------------------------------------------------------------------------- public entry points


def parse_dataset(
    source: bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes],
    filename: str | None = None,
    limits: DatasetLimits | None = None,
) -> ParsedDataset:
    """Validate an upload (a path, its bytes or a seekable binary file) and return it parsed.

    ``filename`` (the client's name for the file) only helps tell the format
    apart; the content decides: ZIP magic bytes mean a ZIP, a leading ``{``
    (or a ``.jsonl`` name on a text file) means JSONL, anything else is a 415.
    """
    limits = limits or DatasetLimits()
    stream, owned, default_name = _open_source(source)
    try:
        filename = filename if filename is not None else default_name
        start = stream.tell()
        stream.seek(0, io.SEEK_END)
        size = stream.tell() - start
        stream.seek(start)
        if size == 0:
            raise InvalidInput("the dataset file is empty")
        if size > limits.max_upload_bytes:
            raise PayloadTooLarge(f"the dataset is {size} bytes; the limit is {limits.max_upload_bytes}")
        head = stream.read(4096)
        stream.seek(start)
        if _detect(head, filename) == "zip":
            return _parse_zip(stream, limits)
        builder = _Builder(limits, "jsonl")
        _parse_lines(stream, builder, _jsonl_resolver(builder))
        return builder.finish()
    finally:
        if owned:
            stream.close()


def load_directory(
    path: str | os.PathLike[str], limits: DatasetLimits | None = None, validate: bool = False
) -> ParsedDataset:
    """Read back a directory written by :meth:`ParsedDataset.to_directory`.

    Records are re-checked (cheap); images are only re-decoded with ``validate=True``.
    """
    root = Path(path)
    limits = limits or _TRUSTED_LIMITS
    data_file = root / DATA_FILE
    if not data_file.is_file():
        raise InvalidInput(f"{data_file} does not exist")
    source_format = "directory"
    warnings: list[str] = []
    meta_file = root / META_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        source_format = str(meta.get("source_format", source_format))
        warnings = [str(w) for w in meta.get("warnings", [])]
    builder = _Builder(limits, source_format, decode=validate)
    base = root.resolve()

    def resolve(ref: str, label: str) -> str:
        if _URL.match(ref) or ref.startswith("data:"):
            return _inline(builder, ref, label)
        name = _normalize_ref(ref, label)
        file = (base / name).resolve()
        if not file.is_relative_to(base) or not file.is_file():
            raise InvalidInput(f"{label} not found in {root}")

        def load() -> bytes:
            if file.stat().st_size > limits.max_image_bytes:
                raise PayloadTooLarge(f"{label} is larger than {limits.max_image_bytes} bytes")
            return file.read_bytes()

        return builder.image_id(("file", name), name, load, label)

    with data_file.open("rb") as handle:
        _parse_lines(handle, builder, resolve)
    parsed = builder.finish()
    parsed.warnings = warnings + [w for w in parsed.warnings if w not in warnings]
    return parsed


def split_validation(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministically split into ``(train, validation)``, about ``fraction`` held out.

    Examples that share an image (e.g. the turns of one conversation) always land
    on the same side, so validation images are never seen in training.  The
    training side is never empty; the order within each side is the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    target = round(n * fraction)
    if fraction > 0 and target == 0 and n >= 2:
        target = 1
    target = max(0, min(target, n - 1))
    if target == 0:
        return list(examples), []

    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for index, example in enumerate(examples):
        find(index)
        for image in example.images:
            other = first_with.setdefault(image, index)
            parent[find(index)] = find(other)
    groups: dict[int, list[int]] = {}
    for index in range(n):
        groups.setdefault(find(index), []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)

    held: set[int] = set()
    for group in order:
        if len(held) + len(group) <= target:
            held.update(group)
        if len(held) == target:
            break
    if not held:  # every group is larger than the target: hold out the smallest one that leaves training data
        fitting = [group for group in order if len(group) < n]
        if fitting:
            held.update(min(fitting, key=len))
    train = [example for index, example in enumerate(examples) if index not in held]
    validation = [example for index, example in enumerate(examples) if index in held]
    return train, validation


# --------------------------------------------------------------------------- detection


def _open_source(source: Any) -> tuple[IO[bytes], bool, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), True, ""
    if isinstance(source, str | os.PathLike):
        return open(source, "rb"), True, Path(source).name  # noqa: SIM115 - closed by the caller
    if hasattr(source, "read") and hasattr(source, "seek"):
        return source, False, str(getattr(source, "name", "") or "")
    raise TypeError(f"expected a path, bytes or a seekable binary file, got {type(source).__name__}")


def _detect(head: bytes, filename: str) -> str:
    suffix = Path(filename).suffix.lower() if filename else ""
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if suffix == ".zip":
        raise InvalidInput("the dataset is not a valid ZIP archive (corrupt or not a ZIP file)")
    body = head[len(codecs.BOM_UTF8):] if head.startswith(codecs.BOM_UTF8) else head
    if body.lstrip()[:1] == b"{":
        return "jsonl"
    if suffix in _JSONL_SUFFIXES and b"\x00" not in head and not head.startswith(_BINARY_MAGICS):
        return "jsonl"
    shown = f" ({filename!r})" if filename else ""
    raise UnsupportedMedia(f"unsupported dataset file{shown}: upload a ZIP holding data.jsonl and the images, "
                           "or a UTF-8 .jsonl with base64 images")


# --------------------------------------------------------------------------- records


class _Builder:
    """Collects examples and distinct images; every image is decoded (checked) once."""

    def __init__(self, limits: DatasetLimits, source_format: str, decode: bool = True):
        self.limits = limits
        self.source_format = source_format
        self.decode = decode
        self.examples: list[Example] = []
        self.image_bytes: dict[str, bytes] = {}
        self.warnings: list[str] = []
        self._n_warnings = 0
        self._ids: dict[tuple[str, str], str] = {}

    def warn(self, message: str) -> None:
        self._n_warnings += 1
        if self._n_warnings <= _MAX_WARNINGS:
            self.warnings.append(message)

    def image_id(self, key: tuple[str, str], preferred: str, load: Callable[[], bytes], label: str) -> str:
        """The id of the image ``key``, loading and checking it the first time it is seen."""
        found = self._ids.get(key)
        if found is not None:
            return found
        data = load()
        if self.decode:
            decode_image(data, self.limits.max_image_bytes, self.limits.max_image_pixels, label)
        image_id = preferred
        counter = 1
        while image_id in self.image_bytes and self.image_bytes[image_id] != data:
            counter += 1
            stem, dot, ext = preferred.rpartition(".")
            image_id = f"{stem}~{counter}.{ext}" if dot and "/" not in ext else f"{preferred}~{counter}"
        self.image_bytes[image_id] = data
        self._ids[key] = image_id
        return image_id

    def add_record(self, record: Any, line: int, resolve: Callable[[str, str], str]) -> None:
        prefix = f"line {line}"
        if not isinstance(record, dict):
            raise InvalidInput(f"{prefix}: expected a JSON object, got {_json_type(record)}")
        refs = self._image_refs(record, prefix)
        if "conversations" in record:
            if "instruction" in record or "answer" in record:
                raise InvalidInput(f'{prefix}: give either "conversations" or "instruction"/"answer", not both')
            pairs = self._conversation_pairs(record["conversations"], prefix, len(refs))
        else:
            if "instruction" not in record:
                raise InvalidInput(f'{prefix}: missing "instruction" (or LLaVA-style "conversations")')
            pairs = [(self._text(record["instruction"], '"instruction"', prefix),
                      self._text(record.get("answer"), '"answer"', prefix, missing="answer" not in record))]
        if len(self.examples) + len(pairs) > self.limits.max_examples:
            raise PayloadTooLarge(f"{prefix}: the dataset has more than {self.limits.max_examples} examples, "
                                  "the limit")
        ids = []
        for index, ref in enumerate(refs):
            label = f'{prefix}: image "{_shorten(ref)}"' if not _is_inline(ref) else f"{prefix}: image {index + 1}"
            ids.append(resolve(ref, label))
        for instruction, answer in pairs:
            self.examples.append(Example(instruction, answer, list(ids)))

    def _image_refs(self, record: dict[str, Any], prefix: str) -> list[str]:
        present = [key for key in ("image", "images") if record.get(key) is not None]
        if len(present) == 2:
            raise InvalidInput(f'{prefix}: give either "image" or "images", not both')
        if not present:
            return []
        key = present[0]
        value = record[key]
        refs = [value] if isinstance(value, str) else value
        if not isinstance(refs, list):
            raise InvalidInput(f'{prefix}: "{key}" must be a string or a list of strings, got {_json_type(value)}')
        for index, ref in enumerate(refs):
            where = f'"{key}"' if isinstance(value, str) else f'"{key}"[{index}]'
            if not isinstance(ref, str):
                raise InvalidInput(f"{prefix}: {where} must be a string, got {_json_type(ref)}")
            if not ref.strip():
                raise InvalidInput(f"{prefix}: {where} is empty")
        if len(refs) > self.limits.max_images_per_example:
            raise InvalidInput(f"{prefix}: {len(refs)} images; the limit is "
                               f"{self.limits.max_images_per_example} per example")
        return [ref.strip() for ref in refs]

    def _text(self, value: Any, what: str, prefix: str, missing: bool = False) -> str:
        if missing:
            raise InvalidInput(f"{prefix}: missing {what}")
        if not isinstance(value, str):
            raise InvalidInput(f"{prefix}: {what} must be a string, got {_json_type(value)}")
        text = value.strip()
        if not text:
            raise InvalidInput(f"{prefix}: {what} is empty")
        if len(text) > self.limits.max_text_chars:
            raise InvalidInput(f"{prefix}: {what} is {len(text)} characters; the limit is {self.limits.max_text_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{prefix}: {what} is not valid Unicode (lone surrogate escape)") from exc
        return text

    def _conversation_pairs(self, turns: Any, prefix: str, n_images: int) -> list[tuple[str, str]]:
        if not isinstance(turns, list) or not turns:
            raise InvalidInput(f'{prefix}: "conversations" must be a non-empty list of turns')
        texts: list[str] = []
        placeholders = 0
        for index, turn in enumerate(turns):
            where = f"conversations[{index}]"
            expected = "human" if index % 2 == 0 else "gpt"
            if not isinstance(turn, dict):
                raise InvalidInput(f'{prefix}: {where} must be an object with "from" and "value", '
                                   f"got {_json_type(turn)}")
            role = turn.get("from", turn.get("role"))
            if not isinstance(role, str):
                raise InvalidInput(f'{prefix}: {where} has no "from" role')
            kind = "human" if role.strip().lower() in _HUMAN_ROLES else (
                "gpt" if role.strip().lower() in _GPT_ROLES else None)
            if kind is None:
                raise InvalidInput(f'{prefix}: {where} has unknown role "{_shorten(role)}" (expected "human" or "gpt")')
            if kind != expected:
                raise InvalidInput(f'{prefix}: {where} should be a "{expected}" turn, got "{role}"; turns must '
                                   "alternate human, gpt, human, gpt, ...")
            value = turn.get("value", turn.get("content"))
            if isinstance(value, str):
                placeholders += value.count(_PLACEHOLDER)
                value = re.sub(r"<image>[ \t]*\n?", "", value)
            texts.append(self._text(value, f"{where} ({expected})", prefix, missing="value" not in turn
                                    and "content" not in turn))
        if len(texts) % 2:
            raise InvalidInput(f"{prefix}: conversations[{len(texts) - 1}] is a human turn without a gpt answer")
        if placeholders and not n_images:
            self.warn(f"{prefix}: the conversation has an <image> placeholder but the record has no image")
        elif placeholders and placeholders != n_images:
            self.warn(f"{prefix}: {placeholders} <image> placeholders for {n_images} images")
        return [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]

    def finish(self) -> ParsedDataset:
        if len(self.examples) < self.limits.min_examples:
            raise InvalidInput(f"the dataset has {len(self.examples)} examples; at least "
                               f"{self.limits.min_examples} required")
        if self._n_warnings > _MAX_WARNINGS:
            self.warnings.append(f"... and {self._n_warnings - _MAX_WARNINGS} more warnings")
        return ParsedDataset(self.examples, self.image_bytes, self.source_format, self.warnings)


def _parse_lines(stream: IO[bytes], builder: _Builder, resolve: Callable[[str, str], str]) -> None:
    limit = builder.limits.max_line_bytes
    line = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        line += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise PayloadTooLarge(f"line {line} is longer than {limit} bytes")
        if line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"line {line}: not valid UTF-8 (byte {exc.start})") from exc
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"line {line}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError as exc:
            raise InvalidInput(f"line {line}: invalid JSON (nested too deeply)") from exc
        builder.add_record(record, line, resolve)


# --------------------------------------------------------------------------- image references


def _is_inline(ref: str) -> bool:
    return ref.startswith("data:") or (len(ref) >= 64 and "." not in ref and _BASE64.fullmatch(ref) is not None)


def _refuse_url(ref: str, label: str) -> None:
    if _URL.match(ref):
        raise InvalidInput(f"{label}: remote image URLs are not fetched; embed the image as base64 or a "
                           "data:image/...;base64 URL, or put it in the ZIP")


def _inline(builder: _Builder, ref: str, label: str) -> str:
    """Register a base64 / data-URL image; its id is ``base64/<sha256 prefix>.<ext>``."""
    _refuse_url(ref, label)
    payload = ref
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header or not header[5:].lower().startswith("image/"):
            raise InvalidInput(f"{label}: only data:image/...;base64 URLs are accepted")
    if any(c.isspace() for c in payload):
        payload = "".join(payload.split())
    if len(payload) > builder.limits.max_image_bytes * 4 // 3 + 4:
        raise PayloadTooLarge(f"{label} is larger than {builder.limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{label} is not valid base64") from exc
    digest = hashlib.sha256(data).hexdigest()
    return builder.image_id(("sha256", digest), f"base64/{digest[:24]}{_sniff_ext(data)}", lambda: data, label)


def _jsonl_resolver(builder: _Builder) -> Callable[[str, str], str]:
    def resolve(ref: str, label: str) -> str:
        _refuse_url(ref, label)
        if not _is_inline(ref):
            raise InvalidInput(f"{label} looks like a file path, but a bare JSONL has no archive to read it "
                               "from; embed the image as base64 or a data:image/...;base64 URL, or upload a ZIP "
                               "with data.jsonl and the images")
        return _inline(builder, ref, label)

    return resolve


def _normalize_ref(ref: str, label: str) -> str:
    if "\\" in ref:
        raise InvalidInput(f"{label}: use forward slashes in image paths")
    if ref.startswith("/") or _DRIVE.match(ref):
        raise InvalidInput(f"{label}: image paths must be relative to data.jsonl")
    parts = [part for part in ref.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f'{label}: image paths must not contain ".."')
    if not parts:
        raise InvalidInput(f"{label} is not a file path")
    return "/".join(parts)


# --------------------------------------------------------------------------- ZIP archives


def _unsafe_member(name: str) -> str | None:
    """Why the member name is refused (zip-slip and friends), or None."""
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "has a drive letter"
    if any(ord(c) < 32 for c in name):
        return "contains control characters"
    if ".." in name.split("/"):
        return 'has a ".." path component'
    if not name.strip("/."):
        return "has an empty name"
    return None


def _normalize_member(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _ignored_member(key: str) -> bool:
    base = key.rsplit("/", 1)[-1]
    return key.startswith("__MACOSX/") or base.lower() in _IGNORED_NAMES or base.startswith("._")


def _check_member_count(stream: IO[bytes], limits: DatasetLimits) -> None:
    """Refuse archives whose end record declares too many members, before zipfile reads the directory."""
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    tail_size = min(end - start, 22 + 65535)
    stream.seek(end - tail_size)
    tail = stream.read(tail_size)
    stream.seek(start)
    at = tail.rfind(b"PK\x05\x06")
    if at >= 0 and len(tail) >= at + 22:
        (entries,) = struct.unpack("<H", tail[at + 10:at + 12])
        if entries != 0xFFFF and entries > limits.max_members:
            raise PayloadTooLarge(f"the archive has {entries} members; the limit is {limits.max_members}")


class _Archive:
    """A scanned ZIP: every member name, type and declared size checked up front."""

    def __init__(self, archive: zipfile.ZipFile, limits: DatasetLimits):
        self.archive = archive
        self.limits = limits
        self.read_total = 0
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.ignored = 0
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise PayloadTooLarge(f"the archive has {len(infos)} members; the limit is {limits.max_members}")
        declared = 0
        for info in infos:
            name = info.filename
            shown = _shorten(name)
            reason = _unsafe_member(name)
            if reason:
                raise InvalidInput(f'archive member "{shown}" {reason}; such paths are refused (zip-slip)')
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise InvalidInput(f'archive member "{shown}" is a symbolic link; links are refused')
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise InvalidInput(f'archive member "{shown}" is not a regular file')
            if info.is_dir() or kind == stat.S_IFDIR:
                continue
            key = _normalize_member(name)
            if _ignored_member(key):
                self.ignored += 1
                continue
            if info.flag_bits & 0x1:
                raise InvalidInput(f'archive member "{shown}" is encrypted; upload an archive without a password')
            if info.compress_type not in _SUPPORTED_COMPRESSION:
                raise InvalidInput(f'archive member "{shown}" uses an unsupported compression method '
                                   f"({info.compress_type}); use deflate or store")
            declared += info.file_size
            if info.file_size > _RATIO_FLOOR and info.file_size > limits.max_compression_ratio * max(
                    info.compress_size, 1):
                raise PayloadTooLarge(f'archive member "{shown}" expands from {info.compress_size} to '
                                      f"{info.file_size} bytes (over {limits.max_compression_ratio:g}x); "
                                      "refusing a likely zip bomb")
            if key in self.members:
                raise InvalidInput(f'archive member "{shown}" appears more than once')
            self.members[key] = info
        if declared > limits.max_uncompressed_bytes:
            raise PayloadTooLarge(f"the archive expands to {declared} bytes; the limit is "
                                  f"{limits.max_uncompressed_bytes}")
        self.root = self._find_root()
        self.data_key = self.root + DATA_FILE
        self.used: set[str] = {self.data_key}

    def _find_root(self) -> str:
        if DATA_FILE in self.members:
            return ""
        tops = {key.split("/", 1)[0] for key in self.members}
        if len(tops) == 1:
            (top,) = tops
            if f"{top}/{DATA_FILE}" in self.members:
                return f"{top}/"
        others = sorted(key for key in self.members if key.lower().endswith(".jsonl") and key.count("/") <= 1)
        hint = f'; found "{_shorten(others[0])}", rename it to {DATA_FILE}' if others else ""
        raise InvalidInput(f"the archive has no {DATA_FILE} at its top level or inside a single top-level "
                           f"folder{hint}")

    def read(self, info: zipfile.ZipInfo, cap: int, label: str) -> bytes:
        """The member's bytes, enforcing ``cap`` and the archive budget on the bytes actually inflated."""
        if info.file_size > cap:
            raise PayloadTooLarge(f"{label} is {info.file_size} bytes uncompressed; the limit is {cap}")
        budget = self.limits.max_uncompressed_bytes
        chunks: list[bytes] = []
        total = 0
        try:
            with self.archive.open(info) as handle:
                while chunk := handle.read(min(_CHUNK, cap + 1 - total)):
                    total += len(chunk)
                    self.read_total += len(chunk)
                    if total > cap:
                        raise PayloadTooLarge(f"{label} inflates to more than {cap} bytes")
                    if self.read_total > budget:
                        raise PayloadTooLarge(f"the archive inflates to more than {budget} bytes")
                    chunks.append(chunk)
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError, ValueError,
                NotImplementedError) as exc:
            raise InvalidInput(f"{label} could not be read from the archive ({exc})") from exc
        return b"".join(chunks)

    def data(self) -> bytes:
        info = self.members[self.data_key]
        return self.read(info, self.limits.max_uncompressed_bytes, f'archive member "{info.filename}"')

    def resolver(self, builder: _Builder) -> Callable[[str, str], str]:
        def resolve(ref: str, label: str) -> str:
            _refuse_url(ref, label)
            if ref.startswith("data:"):
                return _inline(builder, ref, label)
            key = _normalize_ref(ref, label)
            for candidate in (self.root + key, key):
                info = self.members.get(candidate)
                if info is not None and candidate != self.data_key:
                    break
            else:
                if _is_inline(ref):
                    return _inline(builder, ref, label)
                raise InvalidInput(f"{label} not found in the archive")
            self.used.add(candidate)
            image_id = candidate[len(self.root):] if candidate.startswith(self.root) else candidate
            return builder.image_id(("member", candidate), image_id,
                                    lambda: self.read(info, self.limits.max_image_bytes, label), label)

        return resolve

    def add_warnings(self, builder: _Builder) -> None:
        unused = sorted(set(self.members) - self.used)
        if unused:
            builder.warn(f'{len(unused)} archive members are not referenced by any example (e.g. "{unused[0]}")')


def _parse_zip(stream: IO[bytes], limits: DatasetLimits) -> ParsedDataset:
    _check_member_count(stream, limits)
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
            NotImplementedError) as exc:
        raise InvalidInput(f"the dataset is not a valid ZIP archive ({exc})") from exc
    with archive:
        scanned = _Archive(archive, limits)
        builder = _Builder(limits, "zip")
        _parse_lines(io.BytesIO(scanned.data()), builder, scanned.resolver(builder))
        scanned.add_warnings(builder)
        return builder.finish()


# --------------------------------------------------------------------------- helpers


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _shorten(text: str, limit: int = 80) -> str:
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sniff_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data.startswith(b"GIF8"):
        return ".gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return ".webp"
    if data.startswith(b"BM"):
        return ".bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return ".tif"
    return ".img"


def _file_names(image_bytes: dict[str, bytes]) -> dict[str, str]:
    """A relative file name under ``imgs/`` for every image id: the id itself where plain and unique."""
    files: set[str] = set()
    dirs: set[str] = set()

    def clashes(name: str) -> bool:
        low = name.lower()
        parts = low.split("/")
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        return low in files or low in dirs or bool(prefixes & files)

    names: dict[str, str] = {}
    for image_id, data in image_bytes.items():
        name = image_id if image_id.startswith(IMAGE_DIR + "/") else f"{IMAGE_DIR}/{image_id}"
        plain = all(_SAFE_COMPONENT.fullmatch(part) and part not in (".", "..") for part in name.split("/"))
        if not plain or clashes(name):
            digest = hashlib.sha256(data).hexdigest()[:24]
            name, counter = f"{IMAGE_DIR}/{digest}{_sniff_ext(data)}", 1
            while clashes(name):
                counter += 1
                name = f"{IMAGE_DIR}/{digest}-{counter}{_sniff_ext(data)}"
        low_parts = name.lower().split("/")
        files.add(name.lower())
        dirs.update("/".join(low_parts[:i]) for i in range(1, len(low_parts)))
        names[image_id] = name
    return names
