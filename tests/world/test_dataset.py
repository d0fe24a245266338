"""Dataset generation, the upload formats and the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.world.dataset import (
    generate_examples,
    png_bytes,
    read_dataset,
    summarize,
    write_jsonl_base64,
    write_zip,
)
from service.world.questions import inspection_fields
from service.world.render import render
from service.world.scene import Scene

REPO = Path(__file__).resolve().parents[2]


def _fingerprint(examples: list) -> list[tuple[bytes, str]]:
    return [(png_bytes(image), json.dumps(record, sort_keys=True)) for image, record in examples]


def test_same_seed_same_bytes_different_seed_different() -> None:
    first = generate_examples(16, seed=3, kind="mixed")
    again = generate_examples(16, seed=3, kind="mixed")
    other = generate_examples(16, seed=4, kind="mixed")
    assert _fingerprint(first) == _fingerprint(again)
    assert [png for png, _ in _fingerprint(first)] != [png for png, _ in _fingerprint(other)]
    assert len({png for png, _ in _fingerprint(first)}) == 16


def test_records_agree_with_their_images() -> None:
    for image, record in generate_examples(20, seed=5, kind="inspection"):
        meta = record["meta"]
        assert image.size == (96, 96) and image.mode == "RGB"
        assert record["question_type"] == "inspection"
        defective, defect_type, location = inspection_fields(record["answer"])
        assert defective == (meta["defect"] is not None)
        assert (defect_type, location) == (meta["defect"], meta["defect_location"])
        if meta["defect"] is not None:
            assert meta["size_class"] in ("tiny", "large")
        # the stored scene re-renders to exactly the same image
        assert render(Scene.from_dict(meta["scene"])).tobytes() == image.tobytes()


def test_kinds_size_and_defect_rate() -> None:
    general = generate_examples(40, seed=1, kind="general", size=64, defect_rate=0.0)
    assert {record["question_type"] for _, record in general} <= {"part", "colour", "count", "position"}
    assert all(image.size == (64, 64) for image, _ in general)
    assert all(record["meta"]["defect"] is None for _, record in general)
    inspection = generate_examples(30, seed=1, kind="inspection", defect_rate=1.0)
    assert all(record["answer"].startswith("defect: ") for _, record in inspection)
    with pytest.raises(ValueError):
        generate_examples(2, seed=1, kind="panorama")


def test_write_zip_is_the_upload_format(tmp_path: Path) -> None:
    examples = generate_examples(12, seed=2, kind="mixed")
    path = write_zip(tmp_path / "data.zip", examples)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        lines = archive.read("data.jsonl").decode("utf-8").splitlines()
        assert len(lines) == len(examples)
        for line, (image, record) in zip(lines, examples, strict=True):
            row = json.loads(line)
            assert isinstance(row["instruction"], str) and row["instruction"]
            assert isinstance(row["answer"], str) and row["answer"]
            assert row["image"].startswith("imgs/") and row["image"].endswith(".png")
            assert row["image"] in names
            stored = Image.open(io.BytesIO(archive.read(row["image"])))
            assert stored.format == "PNG"
            assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(image))
            assert row["answer"] == record["answer"] and row["question_type"] == record["question_type"]
        assert names == {"data.jsonl"} | {json.loads(line)["image"] for line in lines}
    assert json.loads(lines[0])["image"] == "imgs/00001.png"
    # deterministic archive bytes
    assert write_zip(tmp_path / "again.zip", examples).read_bytes() == path.read_bytes()


def test_write_jsonl_base64(tmp_path: Path) -> None:
    examples = generate_examples(8, seed=6, kind="inspection")
    path = write_jsonl_base64(tmp_path / "data.jsonl", examples)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(examples)
    for line, (image, record) in zip(lines, examples, strict=True):
        row = json.loads(line)
        prefix = "data:image/png;base64,"
        assert row["image"].startswith(prefix)
        decoded = Image.open(io.BytesIO(base64.b64decode(row["image"][len(prefix):], validate=True)))
        assert decoded.format == "PNG"
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))
        assert row["answer"] == record["answer"] and row["instruction"] == record["instruction"]


def test_read_dataset_round_trips_both_formats(tmp_path: Path) -> None:
    examples = generate_examples(6, seed=9, kind="mixed")
    for path in (write_zip(tmp_path / "d.zip", examples), write_jsonl_base64(tmp_path / "d.jsonl", examples)):
        back = read_dataset(path)
        assert [record for _, record in back] == [record for _, record in examples]
        assert [image.tobytes() for image, _ in back] == [image.tobytes() for image, _ in examples]


def test_summarize_counts() -> None:
    examples = generate_examples(10, seed=1, kind="inspection", defect_rate=0.0)
    line = summarize(examples)
    assert "\n" not in line and "inspection=10" in line and "ok=10" in line


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "service.world", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_writes_zip_and_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "out" / "data.zip"
    result = _run_cli("--out", str(out), "--n", "12", "--seed", "1", "--kind", "inspection")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("wrote ")  # one summary line
    assert "inspection=12" in result.stdout
    with zipfile.ZipFile(out) as archive:
        rows = [json.loads(line) for line in archive.read("data.jsonl").decode().splitlines()]
        assert len(rows) == 12 and all(row["image"] in archive.namelist() for row in rows)
    assert _fingerprint(read_dataset(out)) == _fingerprint(
        [(image, record) for image, record in generate_examples(12, seed=1, kind="inspection")])

    jsonl = tmp_path / "data.jsonl"
    result = _run_cli("--out", str(jsonl), "--n", "5", "--seed", "2", "--kind", "general", "--size", "64")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 5 and all(row["image"].startswith("data:image/png;base64,") for row in rows)

    forced = tmp_path / "forced.bin"
    assert _run_cli("--out", str(forced), "--n", "2", "--format", "jsonl").returncode == 0
    assert json.loads(forced.read_text().splitlines()[0])["image"].startswith("data:image/png")


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    assert _run_cli("--out", str(tmp_path / "x.zip"), "--kind", "panorama").returncode != 0
    assert _run_cli("--out", str(tmp_path / "x.zip"), "--defect-types", "dent").returncode != 0
    assert _run_cli("--n", "3").returncode != 0
    assert not (tmp_path / "x.zip").exists()


def test_world_package_does_not_import_torch() -> None:
    code = "import sys, service.world, service.world.__main__; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
