"""Generate labelled examples and write them in the upload formats of DESIGN.md section 4.

* ZIP: ``data.jsonl`` (one record a line) plus PNG images under ``imgs/``;
  each record is ``{"image": "imgs/00001.png", "instruction": ..., "answer": ...,
  "question_type": ..., "meta": {...}}``.
* bare JSONL: the same records with ``"image": "data:image/png;base64,..."``.

Everything is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import base64
import io
import json
import random
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from service.world.geometry import REFERENCE_SIZE
from service.world.questions import make_example
from service.world.render import render
from service.world.scene import sample_scene

Example = tuple[Image.Image, dict[str, Any]]
"""An image and its record: ``instruction``, ``answer``, ``question_type``, ``meta``."""

DATASET_KINDS: tuple[str, ...] = ("general", "inspection", "mixed")
DATA_FILE = "data.jsonl"
IMAGE_DIR = "imgs"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def generate_examples(
    n: int,
    seed: int,
    kind: str = "inspection",
    size: int = REFERENCE_SIZE,
    defect_rate: float = 0.5,
    defect_types: Sequence[str] | None = None,
    part_types: Sequence[str] | None = None,
) -> list[Example]:
    """``n`` rendered examples, fully determined by the arguments.

    ``kind``: ``"general"`` (part/colour/count/position questions on 1-4 part
    scenes), ``"inspection"`` (one-part close-ups, defect questions) or
    ``"mixed"`` (each example is either, with equal odds).  ``meta`` holds the
    ground truth: part type, colour, count, positions, defect type, location and
    size class (``"tiny"``/``"large"``), and the full scene (``meta["scene"]``,
    which :meth:`Scene.from_dict` turns back into a scene).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind must be one of {DATASET_KINDS}, got {kind!r}")
    rng = random.Random(seed)
    examples: list[Example] = []
    for _ in range(n):
        family = kind if kind != "mixed" else rng.choice(("general", "inspection"))
        scene = sample_scene(rng, family, defect_rate=defect_rate, defect_types=defect_types,
                             part_types=part_types)
        record: dict[str, Any] = dict(make_example(rng, scene, family))
        record["meta"] = {**scene.summary(), "scene": scene.to_dict()}
        examples.append((render(scene, size), record))
    return examples


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of ``image`` (deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_name(index: int, total: int) -> str:
    """Archive path of the ``index``-th (0-based) image, e.g. ``imgs/00001.png``."""
    width = max(5, len(str(total)))
    return f"{IMAGE_DIR}/{index + 1:0{width}d}.png"


def _line(image_ref: str, record: dict[str, Any]) -> str:
    return json.dumps({"image": image_ref, **record}, ensure_ascii=False)


def write_zip(path: str | Path, examples: Sequence[Example]) -> Path:
    """Write ``examples`` as an upload ZIP (``data.jsonl`` + ``imgs/*.png``); returns the path."""
    path = Path(path)
    lines = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, (image, record) in enumerate(examples):
            name = image_name(index, len(examples))
            _write_member(archive, name, png_bytes(image), zipfile.ZIP_STORED)
            lines.append(_line(name, record))
        text = "".join(line + "\n" for line in lines)
        _write_member(archive, DATA_FILE, text.encode("utf-8"), zipfile.ZIP_DEFLATED)
    return path


def _write_member(archive: zipfile.ZipFile, name: str, data: bytes, compression: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def write_jsonl_base64(path: str | Path, examples: Sequence[Example]) -> Path:
    """Write ``examples`` as a bare JSONL with ``data:image/png;base64,...`` images."""
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for image, record in examples:
            encoded = base64.b64encode(png_bytes(image)).decode("ascii")
            handle.write(_line(f"data:image/png;base64,{encoded}", record) + "\n")
    return path


def _decode_data_url(ref: str) -> bytes:
    header, _, payload = ref.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ValueError("expected a base64 data URL")
    return base64.b64decode(payload, validate=True)


def read_dataset(path: str | Path) -> list[Example]:
    """Read back a file written by :func:`write_zip` or :func:`write_jsonl_base64`.

    Meant for tests and evaluation of generated data, not as the service's
    upload validator (it trusts its input).
    """
    path = Path(path)
    examples: list[Example] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for line in archive.read(DATA_FILE).decode("utf-8").splitlines():
                record = json.loads(line)
                image = Image.open(io.BytesIO(archive.read(record.pop("image"))))
                examples.append((image.convert("RGB"), record))
        return examples
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                image = Image.open(io.BytesIO(_decode_data_url(record.pop("image"))))
                examples.append((image.convert("RGB"), record))
    return examples


def summarize(examples: Sequence[Example]) -> str:
    """One line: counts per question type, per defect type (``ok`` = none) and per size class."""
    question_types = Counter(record["question_type"] for _, record in examples)
    defects = Counter(record["meta"]["defect"] or "ok" for _, record in examples)
    sizes = Counter(record["meta"]["size_class"] for _, record in examples if record["meta"]["size_class"])

    def fmt(counter: Counter[str]) -> str:
        return " ".join(f"{key}={value}" for key, value in sorted(counter.items())) or "-"

    return (f"{len(examples)} examples | question_type: {fmt(question_types)} | "
            f"defect: {fmt(defects)} | size_class: {fmt(sizes)}")
