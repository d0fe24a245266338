"""The committed demo base: it loads, matches its model card, and still answers general questions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_DIR = ROOT / "service" / "assets" / "demo-base"
CARD_JSON = BASE_DIR / "MODEL_CARD.json"
CARD_MD = ROOT / "docs" / "model-card.md"
ACCURACY_MARGIN = 0.10

pytestmark = pytest.mark.skipif(not CARD_JSON.is_file(), reason="service/assets/demo-base is not built")


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD_JSON.read_text())


@pytest.fixture(scope="module")
def demo_base():
    from service.model.base import load_base

    return load_base(BASE_DIR, n_slots=0)


def test_artifact_is_small_and_complete(card):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "vce.safetensors"):
        assert (BASE_DIR / name).is_file(), name
    size = sum(f.stat().st_size for f in BASE_DIR.rglob("*") if f.is_file())
    assert size < 25_000_000
    from safetensors import safe_open

    with safe_open(str(BASE_DIR / "model.safetensors"), framework="pt") as weights:
        dtypes = {str(weights.get_slice(k).get_dtype()) for k in weights.keys()}  # noqa: SIM118
    assert dtypes <= {"F16", "BF16"}, dtypes


def test_loads_in_float32_with_the_recorded_fingerprint(demo_base, card):
    import torch

    assert demo_base.dtype == torch.float32
    assert demo_base.fingerprint == card["fingerprint"]
    if CARD_MD.is_file():
        assert card["fingerprint"] in CARD_MD.read_text()


def test_general_accuracy_holds_on_a_small_held_out_batch(demo_base, card):
    from service.demo.evaluate import evaluate

    recorded = card["eval"]["general"]["accuracy"]
    result = evaluate(demo_base, n=40, kind="general", seed=card["eval"]["general"]["seed"], batch_size=40)
    assert result["accuracy"] >= recorded - ACCURACY_MARGIN, result


def test_evaluate_runs_the_base_in_bfloat16_with_the_same_accuracy(card, capsys):
    """``evaluate --dtype bfloat16`` scores what a server started with ``--dtype bfloat16`` answers."""
    from service.demo.evaluate import main

    recorded = card["eval"]["general"]["accuracy"]
    result = main(["--base", str(BASE_DIR), "--n", "40", "--batch-size", "40", "--dtype", "bfloat16",
                   "--seed", str(card["eval"]["general"]["seed"])])
    assert result["dtype"] == "bfloat16"
    assert result["accuracy"] >= recorded - ACCURACY_MARGIN, result
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"


def test_model_card_states_the_recorded_numbers(card):
    if not CARD_MD.is_file():
        pytest.skip("docs/model-card.md not written")
    text = CARD_MD.read_text()
    general = card["eval"]["general"]["per_type"]
    for qtype, row in general.items():
        assert re.search(rf"{qtype}\b.*{row['accuracy'] * 100:.1f}", text), qtype


def test_evaluation_gives_the_longest_inspection_answer_room(demo_base, monkeypatch):
    """A fixed 12-token cap once cut ``defect: missing_hole, top-right`` (23 tokens) short and
    scored it as a wrong type and location; the evaluator now sizes the cap from the references."""
    from service.demo import evaluate as evaluation
    from service.world import generate_examples

    examples = generate_examples(60, 4321, kind="inspection", size=demo_base.model.config.vision_config.image_size)
    longest = max(
        len(demo_base.tokenizer(demo_base.prompt.answer_prefix + r["answer"], add_special_tokens=False)["input_ids"])
        for _, r in examples
    )
    assert longest > 12  # the old cap would have truncated this set
    caps: list[int] = []
    real_generate = evaluation.generate

    def spy(base, requests, **kwargs):
        caps.extend(r.max_new_tokens for r in requests)
        return real_generate(base, requests, **kwargs)

    monkeypatch.setattr(evaluation, "generate", spy)
    answers = evaluation.answer_all(demo_base, examples, batch_size=60)
    assert len(answers) == len(caps) == 60
    assert min(caps) >= longest
