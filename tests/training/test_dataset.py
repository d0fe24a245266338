"""Upload validation for fine-tuning datasets (DESIGN.md section 4): formats, bad input, round trips."""

from __future__ import annotations

import base64
import io
import json
import random
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMedia
from service.training import dataset as ds
from service.training.dataset import (
    DatasetLimits,
    Example,
    ParsedDataset,
    load_directory,
    parse_dataset,
    split_validation,
)
from service.world.dataset import generate_examples, write_jsonl_base64, write_zip

# --------------------------------------------------------------------------- helpers


def png(color=(200, 30, 30), size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def jsonl(*records) -> bytes:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return ("\n".join(lines) + "\n").encode("utf-8")


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            archive.writestr(info, data)
    return buffer.getvalue()


def patch_headers(data: bytes, name: str, local_offset: int, central_offset: int, value: bytes) -> bytes:
    """Overwrite a field of member ``name`` in both its local header and its central directory entry."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        local = archive.getinfo(name).header_offset
    out[local + local_offset:local + local_offset + len(value)] = value
    central = out.find(b"PK\x01\x02")
    while central >= 0:
        name_len = int.from_bytes(out[central + 28:central + 30], "little")
        if out[central + 46:central + 46 + name_len] == name.encode():
            out[central + central_offset:central + central_offset + len(value)] = value
            return bytes(out)
        central = out.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{name} not in the central directory")


def rec(image="imgs/a.png", instruction="Is it ok?", answer="ok", **extra) -> dict:
    record = {"instruction": instruction, "answer": answer, **extra}
    if image is not None:
        record["image"] = image
    return record


def zip_with(*records, images: dict[str, bytes] | None = None) -> bytes:
    images = {"imgs/a.png": png()} if images is None else images
    return make_zip({**images, "data.jsonl": jsonl(*records)})


def raises(exc_type, source, match: list[str], filename="upload.zip", limits=None) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        parse_dataset(source, filename, limits or DatasetLimits())
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err.message}"
    for part in match:
        assert part in err.message, err.message
    return err


@pytest.fixture(scope="module")
def world_examples():
    return generate_examples(6, seed=3, kind="inspection")


# --------------------------------------------------------------------------- valid uploads


def test_world_zip_parses(tmp_path, world_examples):
    path = write_zip(tmp_path / "d.zip", world_examples)
    parsed = parse_dataset(path, "d.zip", DatasetLimits())
    assert parsed.source_format == "zip"
    assert len(parsed.examples) == 6 and parsed.warnings == []
    assert parsed.examples[0].images == ["imgs/00001.png"]
    assert [e.answer for e in parsed.examples] == [r["answer"] for _, r in world_examples]
    assert len(parsed.image_bytes) == 6
    image = parsed.image("imgs/00001.png")
    assert image.mode == "RGB" and image.size == world_examples[0][0].size
    # bytes and file objects give the same result; the filename is optional
    assert parse_dataset(path.read_bytes(), "d.zip").examples == parsed.examples
    with path.open("rb") as handle:
        assert parse_dataset(handle).examples == parsed.examples


def test_world_jsonl_parses(tmp_path, world_examples):
    path = write_jsonl_base64(tmp_path / "d.jsonl", world_examples)
    parsed = parse_dataset(path, "d.jsonl", DatasetLimits())
    assert parsed.source_format == "jsonl"
    assert len(parsed.examples) == 6
    assert all(len(e.images) == 1 and e.images[0].startswith("base64/") for e in parsed.examples)
    assert parsed.image(parsed.examples[2].images[0]).size == world_examples[2][0].size
    # content sniffing: no filename needed for JSONL either
    assert len(parse_dataset(path.read_bytes(), "upload")) == 6


def test_zip_inside_single_top_level_folder():
    data = make_zip({"mydata/imgs/a.png": png(), "mydata/data.jsonl": jsonl(rec()),
                     "__MACOSX/mydata/._data.jsonl": b"junk", "mydata/.DS_Store": b"junk"})
    parsed = parse_dataset(data, "x.zip")
    assert parsed.examples == [Example("Is it ok?", "ok", ["imgs/a.png"])]


def test_conversations_format():
    record = {"id": "x", "image": "imgs/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat part is this?"},
        {"from": "gpt", "value": "A gear."},
        {"from": "human", "value": "Any defect?"},
        {"from": "gpt", "value": "No."},
    ]}
    parsed = parse_dataset(zip_with(record), "c.zip")
    assert parsed.examples == [Example("What part is this?", "A gear.", ["imgs/a.png"]),
                               Example("Any defect?", "No.", ["imgs/a.png"])]
    assert len(parsed.image_bytes) == 1


def test_images_alias_lists_text_only_and_extra_keys():
    records = [
        {"images": ["imgs/a.png", "imgs/b.png"], "instruction": "Compare.", "answer": "Same.", "meta": {"k": 1}},
        rec(image=None, instruction="Text only?", answer="Yes.", question_type="misc"),
        rec(image=[], instruction="Empty list?", answer="Text only too."),
    ]
    parsed = parse_dataset(zip_with(*records, images={"imgs/a.png": png(), "imgs/b.png": png((0, 0, 255))}))
    assert [e.images for e in parsed.examples] == [["imgs/a.png", "imgs/b.png"], [], []]


def test_blank_lines_skipped_and_line_numbers_count_them():
    data = jsonl(rec(image=None), "", "   ", rec(image=None, answer=""))
    raises(InvalidInput, data, ['line 4: "answer" is empty'], filename="d.jsonl")
    assert len(parse_dataset(jsonl(rec(image=None), "", rec(image=None)), "d.jsonl")) == 2


def test_each_distinct_image_decoded_once(monkeypatch):
    calls = []
    real = ds.decode_image

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(ds, "decode_image", counting)
    parse_dataset(zip_with(rec(), rec(), rec(image=["imgs/a.png", "./imgs/a.png"])), "d.zip")
    assert len(calls) == 1
    calls.clear()
    url = data_url(png())
    parse_dataset(jsonl(rec(image=url), rec(image=url)), "d.jsonl")
    assert len(calls) == 1


def test_unreferenced_members_warn():
    parsed = parse_dataset(zip_with(rec(), images={"imgs/a.png": png(), "imgs/extra.png": png()}))
    assert len(parsed.warnings) == 1 and "imgs/extra.png" in parsed.warnings[0]


def test_module_does_not_import_torch():
    code = "import sys, service.training.dataset; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(("line2", "exc_type", "message"), [
    ('{"image": "imgs/a.png", "instruction": "x" "answer": "y"}', InvalidInput, "line 2: invalid JSON"),
    ('["imgs/a.png", "q", "a"]', InvalidInput, "line 2: expected a JSON object, got a list"),
    ('"just a string"', InvalidInput, "line 2: expected a JSON object"),
    (json.dumps({"image": "imgs/a.png", "answer": "y"}), InvalidInput, 'line 2: missing "instruction"'),
    (json.dumps(rec(instruction="   ")), InvalidInput, 'line 2: "instruction" is empty'),
    (json.dumps({"image": "imgs/a.png", "instruction": "q"}), InvalidInput, 'line 2: missing "answer"'),
    (json.dumps(rec(answer=7)), InvalidInput, 'line 2: "answer" must be a string, got a number'),
    (json.dumps(rec(answer=None)), InvalidInput, 'line 2: "answer" must be a string, got null'),
    (json.dumps(rec(instruction="x" * 4001)), InvalidInput, 'line 2: "instruction" is 4001 characters'),
    (json.dumps(rec(image="imgs/missing.png")), InvalidInput,
     'line 2: image "imgs/missing.png" not found in the archive'),
    (json.dumps(rec(image=7)), InvalidInput, 'line 2: "image" must be a string or a list of strings'),
    (json.dumps(rec(image=["imgs/a.png", 3])), InvalidInput, 'line 2: "image"[1] must be a string'),
    (json.dumps(rec(image="")), InvalidInput, 'line 2: "image" is empty'),
    (json.dumps({**rec(), "images": ["imgs/a.png"]}), InvalidInput, 'line 2: give either "image" or "images"'),
    (json.dumps(rec(image=["imgs/a.png"] * 5)), InvalidInput, "line 2: 5 images; the limit is 4 per example"),
    (json.dumps(rec(image="imgs\\a.png")), InvalidInput, "line 2: image"),
    (json.dumps(rec(image="../a.png")), InvalidInput, 'line 2: image "../a.png": image paths must not contain'),
    (json.dumps(rec(image="/etc/passwd")), InvalidInput, "line 2: image \"/etc/passwd\": image paths must be"),
    (json.dumps(rec(image="data.jsonl")), InvalidInput, 'line 2: image "data.jsonl" not found'),
    (json.dumps(rec(image="imgs/notes.txt")), InvalidInput, 'line 2: image "imgs/notes.txt" is not a decodable'),
    (json.dumps(rec(image="http://example.com/a.png")), InvalidInput, "line 2: image \"http://example.com/a.png\": remote"),
    (json.dumps(rec(instruction="\ud800")), InvalidInput, 'line 2: "instruction" is not valid Unicode'),
    ("[" * 100_000 + "]" * 100_000, InvalidInput, "line 2: invalid JSON"),
])
def test_bad_record_in_zip(line2, exc_type, message):
    data = make_zip({"imgs/a.png": png(), "imgs/notes.txt": b"not an image",
                     "data.jsonl": (json.dumps(rec()) + "\n" + line2 + "\n").encode()})
    raises(exc_type, data, [message])


def test_invalid_utf8_names_line():
    data = make_zip({"imgs/a.png": png(), "data.jsonl": jsonl(rec()) + b'{"instruction": "\xff\xfe"}\n'})
    raises(InvalidInput, data, ["line 2: not valid UTF-8"])


@pytest.mark.parametrize(("turns", "message"), [
    ([{"from": "gpt", "value": "A"}], 'line 1: conversations[0] should be a "human" turn'),
    ([{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}],
     'line 1: conversations[1] should be a "gpt" turn'),
    ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"}],
     "line 1: conversations[2] is a human turn without a gpt answer"),
    ([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A"}],
     "line 1: conversations[0] (human) is empty"),
    ([{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}], 'unknown role "robot"'),
    ([{"from": "human", "value": "Q"}, "A"], "line 1: conversations[1] must be an object"),
    ([], 'line 1: "conversations" must be a non-empty list'),
])
def test_bad_conversations(turns, message):
    raises(InvalidInput, zip_with({"image": "imgs/a.png", "conversations": turns}), [message])


def test_too_many_examples():
    limits = DatasetLimits(max_examples=3)
    data = jsonl(*[rec(image=None)] * 4)
    raises(PayloadTooLarge, data, ["line 4:", "more than 3 examples"], filename="d.jsonl", limits=limits)
    conversation = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}] * 4}
    raises(PayloadTooLarge, jsonl(conversation), ["line 1:"], filename="d.jsonl", limits=limits)


def test_zero_examples():
    raises(InvalidInput, b"\n\n  \n", ["0 examples"], filename="d.jsonl")
    raises(InvalidInput, make_zip({"data.jsonl": b""}), ["0 examples"])
    raises(InvalidInput, b"", ["empty"], filename="d.jsonl")


def test_oversized_image_bytes():
    limits = DatasetLimits(max_image_bytes=1000)
    big = make_noise_png(128)
    assert len(big) > 1000
    raises(PayloadTooLarge, zip_with(rec(), images={"imgs/a.png": big}), ['line 1: image "imgs/a.png"'],
           limits=limits)
    raises(PayloadTooLarge, jsonl(rec(image=data_url(big))), ["line 1: image 1"], filename="d.jsonl",
           limits=limits)


def make_noise_png(side: int) -> bytes:
    image = Image.frombytes("L", (side, side), random.Random(side).randbytes(side * side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_truncated_image_names_line():
    broken = png(size=(64, 64))[:60]
    raises(InvalidInput, zip_with(rec(image=None), rec(), images={"imgs/a.png": broken}),
           ['line 2: image "imgs/a.png" is not a decodable image'])


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decompression_bomb_png(bomb_png):
    assert len(bomb_png) < 1_000_000  # tiny on disk, 144 megapixels decoded
    raises(PayloadTooLarge, zip_with(rec(image=None), rec(), images={"imgs/a.png": bomb_png}),
           ['line 2: image "imgs/a.png"', "too large"])
    raises(PayloadTooLarge, jsonl(rec(image=data_url(bomb_png))), ["line 1: image 1"], filename="d.jsonl")


# --------------------------------------------------------------------------- bare JSONL image references


@pytest.mark.parametrize(("image", "exc_type", "message"), [
    ("https://example.com/cat.png", InvalidInput, "remote image URLs are not fetched"),
    ("imgs/001.png", InvalidInput, "looks like a file path, but a bare JSONL has no archive"),
    ("/abs/001.png", InvalidInput, "looks like a file path"),
    ("data:text/plain;base64,aGVsbG8=", InvalidInput, "only data:image/...;base64 URLs"),
    ("data:image/png;base64,!!!notbase64!!!", InvalidInput, "is not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), InvalidInput,
     "is not a decodable image"),
])
def test_bare_jsonl_image_refs(image, exc_type, message):
    data = jsonl(rec(image=data_url(png())), rec(image=image))
    raises(exc_type, data, ["line 2:", message], filename="d.jsonl")


def test_bare_jsonl_raw_base64_accepted():
    raw = base64.b64encode(png()).decode()
    parsed = parse_dataset(jsonl(rec(image=raw)), "d.jsonl")
    assert parsed.examples[0].images[0].startswith("base64/") and parsed.examples[0].images[0].endswith(".png")


def test_data_url_inside_zip_accepted():
    parsed = parse_dataset(zip_with(rec(image=data_url(png())), images={}))
    assert len(parsed.image_bytes) == 1


# --------------------------------------------------------------------------- archive attacks and corruption


@pytest.mark.parametrize(("member", "reason"), [
    ("../evil.png", '".." path component'),
    ("imgs/../../evil.png", '".." path component'),
    ("/etc/evil.png", "absolute path"),
    ("imgs\\..\\evil.png", "backslash"),
    ("C:/Windows/evil.png", "drive letter"),
])
def test_zip_slip_members_refused(member, reason):
    data = make_zip({"data.jsonl": jsonl(rec(image="imgs/a.png")), "imgs/a.png": png(), member: png()})
    err = raises(InvalidInput, data, [f'archive member "{member}"', reason])
    assert "zip-slip" in err.message


def test_symlink_member_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.jsonl", jsonl(rec()))
        link = zipfile.ZipInfo("imgs/a.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    raises(InvalidInput, buffer.getvalue(), ['archive member "imgs/a.png" is a symbolic link'])


def test_zip_bomb_ratio_refused():
    data = make_zip({"data.jsonl": jsonl(rec()), "imgs/a.png": png(), "imgs/zeros.png": bytes(100_000_000)})
    assert len(data) < 500_000
    raises(PayloadTooLarge, data, ['archive member "imgs/zeros.png"', "zip bomb"])


def test_declared_total_over_cap_refused():
    limits = DatasetLimits(max_uncompressed_bytes=50_000)
    data = make_zip({"data.jsonl": jsonl(rec()), "imgs/a.png": png(), "imgs/b.bin": make_noise_png(300)},
                    compression=zipfile.ZIP_STORED)
    raises(PayloadTooLarge, data, ["the archive expands to", "limit is 50000"], limits=limits)


def test_lying_declared_size_is_caught():
    """A member whose headers understate its size: only the declared bytes are inflated, and the CRC fails."""
    data = make_zip({"data.jsonl": jsonl(rec()), "imgs/a.png": bytes(range(256)) * 40})
    data = patch_headers(data, "imgs/a.png", 22, 24, (100).to_bytes(4, "little"))  # uncompressed size
    err = raises(InvalidInput, data, ['line 1: image "imgs/a.png"'])
    assert "could not be read" in err.message or "not a decodable image" in err.message


def test_member_over_image_cap_while_reading():
    limits = DatasetLimits(max_image_bytes=2000)
    raises(PayloadTooLarge, zip_with(rec(), images={"imgs/a.png": make_noise_png(100)}),
           ['line 1: image "imgs/a.png"'], limits=limits)


def test_too_many_members():
    members = {f"imgs/{i}.png": b"x" for i in range(10)}
    raises(PayloadTooLarge, make_zip({"data.jsonl": jsonl(rec(image="imgs/0.png")), **members}),
           ["11 members", "limit is 5"], limits=DatasetLimits(max_members=5))


def test_encrypted_member_refused():
    data = make_zip({"data.jsonl": jsonl(rec()), "imgs/a.png": png()})
    data = patch_headers(data, "imgs/a.png", 6, 8, b"\x01\x00")  # general purpose flag: encrypted
    raises(InvalidInput, data, ['archive member "imgs/a.png" is encrypted'])


def test_duplicate_member_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning):
        archive.writestr("data.jsonl", jsonl(rec()))
        archive.writestr("imgs/a.png", png())
        archive.writestr("imgs/a.png", png((0, 0, 0)))
    raises(InvalidInput, buffer.getvalue(), ['archive member "imgs/a.png" appears more than once'])


def test_corrupt_zip():
    good = zip_with(rec())
    raises(InvalidInput, good[: len(good) // 2], ["not a valid ZIP archive"])
    raises(InvalidInput, b"PK\x03\x04" + b"\x00garbage" * 50, ["not a valid ZIP archive"])
    raises(InvalidInput, b"definitely not a zip", ["not a valid ZIP archive"], filename="upload.zip")
    # valid structure, corrupted deflate stream of data.jsonl
    text = b"".join(jsonl(rec(instruction=f"question {i}")) for i in range(200))
    data = bytearray(make_zip({"data.jsonl": text}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("data.jsonl")
    start = info.header_offset + 30 + len(b"data.jsonl")
    for offset in range(start + 5, start + info.compress_size - 5, 7):
        data[offset] ^= 0x5A
    raises(InvalidInput, bytes(data), ['archive member "data.jsonl" could not be read'])


def test_missing_data_jsonl():
    raises(InvalidInput, make_zip({"imgs/a.png": png()}), ["no data.jsonl"])
    raises(InvalidInput, make_zip({"train.jsonl": jsonl(rec(image=None))}), ['found "train.jsonl"'])
    two = make_zip({"a/data.jsonl": jsonl(rec(image=None)), "b/data.jsonl": jsonl(rec(image=None))})
    raises(InvalidInput, two, ["no data.jsonl"])


@pytest.mark.parametrize(("data", "filename"), [
    (png(), "photo.png"),
    (png(), "data.jsonl"),
    (b"%PDF-1.4\n...", "doc.pdf"),
    (b"\x1f\x8b\x08\x00" + bytes(40), "data.tar.gz"),
    (b"hello, world\n", "notes.txt"),
    ("\ufeff".encode("utf-16") + '{"a": 1}'.encode("utf-16-le"), "data.jsonl"),
])
def test_not_a_dataset_file(data, filename):
    raises(UnsupportedMedia, data, ["unsupported dataset file"], filename=filename)


def test_upload_too_large():
    raises(PayloadTooLarge, zip_with(rec()), ["the limit is 100"], limits=DatasetLimits(max_upload_bytes=100))


def test_overlong_line():
    limits = DatasetLimits(max_image_bytes=10, max_images_per_example=1)
    line = json.dumps(rec(image=None, instruction="x" * (limits.max_line_bytes + 10)))
    raises(PayloadTooLarge, jsonl(rec(image=None), line), ["line 2 is longer than"], filename="d.jsonl",
           limits=limits)


# --------------------------------------------------------------------------- round trip and split


def test_directory_round_trip_zip(tmp_path, world_examples):
    parsed = parse_dataset(write_zip(tmp_path / "d.zip", world_examples), "d.zip")
    out = parsed.to_directory(tmp_path / "norm")
    assert (out / "data.jsonl").is_file() and (out / "imgs" / "00001.png").is_file()
    loaded = load_directory(out, validate=True)
    assert loaded.examples == parsed.examples
    assert loaded.image_bytes == parsed.image_bytes
    assert loaded.source_format == "zip"
    # the normalised directory zipped up is itself a valid upload
    members = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert parse_dataset(make_zip(members), "again.zip").examples == parsed.examples


def test_directory_round_trip_inline_and_odd_names(tmp_path):
    odd = {"photo one.png": png((1, 2, 3)), "imgs/sub/ü.png": png((4, 5, 6)), "imgs/x.png": png((7, 8, 9))}
    records = [
        rec(image="photo one.png"), rec(image=["imgs/sub/ü.png", "imgs/x.png"]),
        rec(image=data_url(png((9, 9, 9)))), rec(image=None, instruction="No image", answer="Fine"),
        {"image": "imgs/x.png", "conversations": [{"from": "user", "value": "<image>\nQ"},
                                                  {"from": "assistant", "value": "A"}]},
    ]
    parsed = parse_dataset(zip_with(*records, images=odd))
    loaded = load_directory(parsed.to_directory(tmp_path / "norm"))
    assert [(e.instruction, e.answer) for e in loaded.examples] == [(e.instruction, e.answer)
                                                                    for e in parsed.examples]
    for a, b in zip(parsed.examples, loaded.examples, strict=True):
        assert [parsed.image_bytes[i] for i in a.images] == [loaded.image_bytes[i] for i in b.images]
        assert all(i.startswith("imgs/") for i in b.images)
    assert loaded.image(loaded.examples[0].images[0]).getpixel((0, 0)) == (1, 2, 3)


def test_load_directory_refuses_escaping_paths(tmp_path):
    (tmp_path / "secret.png").write_bytes(png())
    norm = tmp_path / "norm"
    norm.mkdir()
    (norm / "data.jsonl").write_bytes(jsonl(rec(image="../secret.png")))
    with pytest.raises(InvalidInput, match="line 1"):
        load_directory(norm)


def _examples(n: int, shared_every: int = 0) -> list[Example]:
    return [Example(f"q{i}", f"a{i}", [f"img{i // shared_every if shared_every else i}"]) for i in range(n)]


def test_split_validation_deterministic_and_disjoint():
    examples = _examples(50)
    train, val = split_validation(examples, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert split_validation(examples, 0.2, seed=1) == (train, val)
    assert split_validation(examples, 0.2, seed=2) != (train, val)
    assert {e.instruction for e in train}.isdisjoint({e.instruction for e in val})
    assert train == [e for e in examples if e in train]  # input order kept


def test_split_validation_keeps_shared_images_together():
    examples = _examples(40, shared_every=4)  # 10 images, 4 examples each
    train, val = split_validation(examples, 0.25, seed=0)
    assert len(val) == 8
    assert {i for e in train for i in e.images}.isdisjoint({i for e in val for i in e.images})


def test_split_validation_edges():
    assert split_validation(_examples(5), 0.0, 0) == (_examples(5), [])
    assert split_validation(_examples(1), 0.5, 0) == (_examples(1), [])
    train, val = split_validation(_examples(3), 0.01, 0)
    assert len(val) == 1 and len(train) == 2
    one_group = _examples(6, shared_every=6)
    assert split_validation(one_group, 0.5, 0) == (one_group, [])
    with pytest.raises(ValueError):
        split_validation(_examples(3), 1.0, 0)


def test_parsed_dataset_is_plain_data():
    parsed = ParsedDataset([Example("q", "a", [])], {}, "jsonl", [])
    assert len(parsed) == 1 and parsed.warnings == []
