"""The evaluator's metric functions on hand-made records and answers (no model)."""

from __future__ import annotations

import pytest

from service.demo.evaluate import UNKNOWN_TYPE, UNPARSED, confusion_table, general_metrics, inspection_metrics


def _general(qtype: str, answer: str) -> dict:
    return {"question_type": qtype, "answer": answer}


def _inspection(answer: str, size: str | None = None) -> dict:
    return {"question_type": "inspection", "answer": answer, "meta": {"size_class": size}}


def test_general_metrics_per_type_and_tolerant_matching():
    records = [
        _general("part", "hex nut"),
        _general("part", "washer"),
        _general("colour", "red"),
        _general("count", "3"),
        _general("position", "top-left"),
    ]
    predictions = ["Hex  nut.", "gear", "red", "3", "top left"]
    result = general_metrics(records, predictions)
    assert result["n"] == 5
    assert result["accuracy"] == pytest.approx(3 / 5, abs=1e-4)
    assert result["per_type"]["part"] == {"accuracy": 0.5, "n": 2}
    assert result["per_type"]["colour"]["accuracy"] == 1.0
    assert result["per_type"]["count"]["accuracy"] == 1.0
    assert result["per_type"]["position"]["accuracy"] == 0.0  # "top left" is not the answer format


def test_general_metrics_rejects_length_mismatch():
    with pytest.raises(ValueError):
        general_metrics([_general("part", "plate")], [])


def test_inspection_metrics_fields_exact_match_and_size_split():
    records = [
        _inspection("defect: scratch, top-left", "tiny"),
        _inspection("defect: crack, centre", "large"),
        _inspection("defect: missing_hole, right", "tiny"),
        _inspection("ok"),
        _inspection("ok"),
    ]
    predictions = [
        "defect: scratch, top-left",  # exact
        "defect: chip, centre",  # right call and location, wrong type
        "ok",  # missed
        "ok",  # exact
        "something else",  # unparsable: wrong
    ]
    result = inspection_metrics(records, predictions)
    assert result["n"] == 5 and result["n_defective"] == 3
    assert result["defective_accuracy"] == pytest.approx(3 / 5, abs=1e-4)
    assert result["type_accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["location_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["exact_match"] == pytest.approx(2 / 5, abs=1e-4)
    tiny, large, ok = result["by_size"]["tiny"], result["by_size"]["large"], result["by_size"]["ok"]
    assert tiny["n"] == 2 and tiny["exact_match"] == 0.5 and tiny["defective_accuracy"] == 0.5
    assert large["n"] == 1 and large["type_accuracy"] == 0.0 and large["location_accuracy"] == 1.0
    assert ok["n"] == 2 and ok["exact_match"] == 0.5 and ok["type_accuracy"] is None
    by_defect = result["by_defect"]
    assert sorted(by_defect) == ["crack", "missing_hole", "ok", "scratch"]
    assert by_defect["crack"]["defective_accuracy"] == 1.0 and by_defect["crack"]["type_accuracy"] == 0.0
    assert by_defect["missing_hole"]["defective_accuracy"] == 0.0
    assert by_defect["scratch"]["exact_match"] == 1.0 and by_defect["ok"] == ok


def test_inspection_metrics_accept_tolerant_spellings():
    records = [_inspection("defect: missing_hole, centre", "large")]
    result = inspection_metrics(records, ["Defect: missing hole, center."])
    assert result["exact_match"] == 1.0


def test_confusion_table_counts_answered_type_against_the_truth():
    records = [
        _inspection("defect: scratch, top-left", "tiny"),
        _inspection("defect: scratch, centre", "tiny"),
        _inspection("defect: scratch, left", "tiny"),
        _inspection("defect: chip, right", "large"),
        _inspection("ok"),
        _inspection("ok"),
    ]
    predictions = [
        "defect: spot, top-left",  # a scratch called a spot (location ignored)
        "defect: spot, bottom",
        "defect: dent, left",  # a defect, but no known type
        "ok",  # the chip is missed
        "ok",
        "a washer",  # not an inspection answer
    ]
    expected = {
        "chip": {"ok": 1},
        "ok": {"ok": 1, UNPARSED: 1},
        "scratch": {UNKNOWN_TYPE: 1, "spot": 2},
    }
    assert confusion_table(records, predictions) == expected
    assert inspection_metrics(records, predictions)["confusion"] == expected


def test_model_card_renders_the_confusion_table():
    from service.demo.model_card import confusion_lines

    lines = confusion_lines({"scratch": {"spot": 2, "crack": 1}, "ok": {"ok": 3}})
    assert lines[0] == "| truth | ok | crack | spot | n |"
    assert lines[2] == "| ok | 3 | 0 | 0 | 3 |" and lines[3] == "| scratch | 0 | 1 | 2 | 3 |"
