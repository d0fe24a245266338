"""The demo recipe's record: the command it writes reruns it, and continued bases keep their history."""

from __future__ import annotations

import shlex

import pytest

from service.demo.train_base import build_parser, chain_previous_stages, recipe_command


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--out", "/tmp/x", "--seed", "3", "--defect-warmup-steps", "250", "--vision-minutes", "0"],
        ["--init-from", "/tmp/stage2", "--vision-distill-weight", "1", "--defect-patch-weight", "9",
         "--defect-image-weight", "1", "--language-defect-weight", "1"],
        ["--init-from", "/tmp/stage3", "--vision-steps", "0", "--image-positions", "--position-lr", "0.01",
         "--language-position-weight", "1"],
        ["--init-from", "/tmp/stage3", "--vision-distill-weight", "1", "--defect-summary-weight", "1",
         "--language-defect-weight", "1", "--language-summary-weight", "0.5"],
        ["--init-from", "/tmp/base", "--vision-distill-weight", "1.5", "--defect-summary-weight", "2",
         "--defect-class-weights", "chip=4,scratch=2"],
        ["--init-from", "/tmp/base", "--vision-steps", "0", "--language-steps", "0", "--neutral-output-rows"],
    ],
)
def test_recorded_command_parses_back_to_the_same_options(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    command = recipe_command(args)
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "service.demo.train_base"]
    assert vars(parser.parse_args(words[3:])) == vars(args)


def _card(command: str, accuracy: float, **recipe) -> dict:
    return {
        "recipe": {"command": command, **recipe},
        "training": {"seconds": {"total": 1.0}},
        "eval": {"general": {"accuracy": accuracy}},
    }


def test_continuing_a_base_keeps_every_earlier_stage_in_order():
    first = _card("one", 0.93)
    second = _card("two", 0.955, init_from="/tmp/one")
    chain_previous_stages(second, first)
    third = _card("three", 0.96, init_from="/tmp/two")
    chain_previous_stages(third, second)
    assert [r["command"] for r in third["recipe"]["previous"]] == ["one", "two"]
    assert [t["eval_general"] for t in third["training"]["previous"]] == [0.93, 0.955]
    assert "previous" not in third["recipe"]["previous"][1]  # flat, not nested


def test_a_card_with_the_older_stage1_layout_chains_too():
    older = _card("two", 0.955, init_from="/tmp/one", stage1={"command": "one"})
    older["training"].update(stage1={"seconds": {"total": 2.0}}, stage1_eval_general=0.93)
    new = _card("three", 0.96, init_from="/tmp/two")
    chain_previous_stages(new, older)
    assert [r["command"] for r in new["recipe"]["previous"]] == ["one", "two"]
    assert [t["seconds"]["total"] for t in new["training"]["previous"]] == [2.0, 1.0]
    assert [t["eval_general"] for t in new["training"]["previous"]] == [0.93, 0.955]


def test_model_card_lists_every_command_and_where_each_writes():
    from service.demo.model_card import _recipe_lines

    def stage(command: str, init_from: str | None) -> dict:
        return {"command": command, "init_from": init_from, "seed": 0, "pool_images": 10, "pool_seed": 1000,
                "vision": {"steps": 0 if init_from else 5, "batch": 4, "lr": 1e-3},
                "language": {"steps": 5, "batch": 4, "lr": 1e-3}}

    first = stage("python -m service.demo.train_base --out service/assets/demo-base --seed 0", None)
    second = stage("python -m service.demo.train_base --out service/assets/demo-base --init-from /tmp/a", "/tmp/a")
    last = {**stage("python -m service.demo.train_base --out service/assets/demo-base --init-from /tmp/b", "/tmp/b"),
            "previous": [first, second]}
    runs = {"language_steps_run": 5, "previous": [{"language_steps_run": 5}, {"language_steps_run": 5}]}
    text = "\n".join(_recipe_lines(last, runs))
    commands = [line for line in text.splitlines() if line.startswith("python -m")]
    # each intermediate command writes where the next one reads; the last one writes the committed base
    assert [c.split("--out ")[1].split()[0] for c in commands] == ["/tmp/a", "/tmp/b", "service/assets/demo-base"]
    assert "3 commands" in text and "**Command 3** (from the previous command's output" in text


def test_model_card_describes_a_position_embedding_stage():
    from service.demo.model_card import _stage_text

    stage = {"command": "python -m service.demo.train_base --init-from /tmp/s3 --image-positions", "init_from": "/tmp/s3",
             "seed": 2, "pool_images": 10, "pool_seed": 1002, "vision": {"steps": 0, "batch": 4, "lr": 1e-3},
             "language": {"steps": 5, "batch": 4, "lr": 5e-4}, "image_positions": True, "position_lr": 0.01,
             "language_position_weight": 1.0}
    text = _stage_text(4, stage, {"language_steps_run": 5})
    assert "position embedding (zero at first, lr 0.01" in text and "own row and column (weight 1)" in text
    assert "position embedding" not in _stage_text(4, {**stage, "language_position_weight": 0.0}, {})


def test_model_card_describes_summary_heads_in_both_stages():
    from service.demo.model_card import _stage_text

    stage = {"command": "python -m service.demo.train_base --init-from /tmp/s3", "init_from": "/tmp/s3", "seed": 2,
             "pool_images": 10, "pool_seed": 1002, "defect_pool_images": 8, "defect_pool_seed": 4002,
             "defect_batch": 4, "vision_distill_weight": 1.0, "language_defect_weight": 1.0,
             "vision": {"steps": 5, "batch": 4, "lr": 1e-3}, "language": {"steps": 5, "batch": 4, "lr": 5e-4},
             "defect_summary_weight": 1.0, "language_summary_weight": 0.5}
    text = _stage_text(4, stage, {"language_steps_run": 5, "vision_final": {"steps": 5}})
    assert "on every patch token that names the close-up's defect type (or `none`) and its 3x3 cell (weight 1)" in text
    assert "on every projected close-up token that names" in text and "3x3 cell (weight 0.5)" in text
    plain = _stage_text(4, {**stage, "defect_summary_weight": 0.0, "language_summary_weight": 0.0}, {})
    assert "3x3 cell" not in plain


@pytest.mark.parametrize("flag", ["--defect-summary-weight", "--language-summary-weight"])
def test_a_summary_head_without_close_ups_is_refused_before_any_work(flag, capsys):
    from service.demo.train_base import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--defect-pool", "0", flag, "1", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2 and "need --defect-pool > 0" in capsys.readouterr().err


def test_model_card_describes_class_weights():
    from service.demo.model_card import _stage_text

    stage = {"command": "python -m service.demo.train_base --init-from /tmp/s5", "init_from": "/tmp/s5", "seed": 4,
             "pool_images": 10, "pool_seed": 1004, "defect_pool_images": 8, "defect_pool_seed": 4004,
             "defect_batch": 4, "vision_distill_weight": 1.5, "language_defect_weight": 1.0,
             "vision": {"steps": 5, "batch": 4, "lr": 1e-3}, "language": {"steps": 5, "batch": 4, "lr": 5e-4},
             "defect_summary_weight": 2.0, "defect_class_weights": "chip=4,scratch=2"}
    text = _stage_text(6, stage, {"language_steps_run": 5, "vision_final": {"steps": 5}})
    assert "a defect type's terms weighted by type: chip 4, scratch 2" in text
    assert "3x3 cell (weight 2; the same per-type weights)" in text
    assert "weighted by type" not in _stage_text(6, {**stage, "defect_class_weights": None}, {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--defect-class-weights", "dent=2"], "expected TYPE=WEIGHT"),
        (["--defect-class-weights", "chip=0"], "positive number"),
        (["--defect-class-weights", "chip=4", "--defect-pool", "0"], "needs --defect-pool > 0"),
    ],
)
def test_bad_class_weights_are_refused_before_any_work(argv, message, capsys):
    from service.demo.train_base import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_model_card_describes_a_reset_only_command():
    from service.demo.model_card import _stage_text

    stage = {"command": "python -m service.demo.train_base --init-from /tmp/s6", "init_from": "/tmp/s6", "seed": 6,
             "pool_images": 10, "pool_seed": 1006, "vision": {"steps": 0, "batch": 4, "lr": 1e-3},
             "language": {"steps": 0, "batch": 4, "lr": 5e-4}, "neutral_output_rows": True}
    text = _stage_text(7, stage, {"language_steps_run": 0, "output_rows_reset": 340})
    assert text.startswith("7. **Command 7** (from the previous command's output; no training).")
    assert "rows of the 340 tokens that no general answer uses are re-centred on the rows the answers use" in text
    trained = _stage_text(7, {**stage, "language": {"steps": 5, "batch": 4, "lr": 5e-4}},
                          {"language_steps_run": 5, "output_rows_reset": 340})
    assert "language stage (5 steps run" in trained and "the 340 tokens" in trained
    assert "re-centred" not in _stage_text(7, {**stage, "neutral_output_rows": False}, {"language_steps_run": 5})


def test_final_statistics_come_from_the_last_command_that_trained():
    from service.demo.model_card import _final_statistics

    trained = {"vision_final": {"steps": 1900, "acc_defect": 0.85}, "language_final_loss": 1.5463,
               "language_steps_run": 160}
    reset_only = {"vision_final": {}, "language_final_loss": 0.0, "language_steps_run": 0, "previous": [trained]}
    assert _final_statistics(reset_only) == (
        "Final training statistics of the last command that trained (command 1) (smoothed): vision stage "
        "{'steps': 1900, 'acc_defect': 0.85}, language loss 1.5463."
    )
    assert _final_statistics(trained).startswith("Final training statistics of the last command (smoothed)")
    assert _final_statistics({"vision_final": {}, "language_steps_run": 0}) == "No command trained anything."
    language_only = {"vision_final": {}, "language_final_loss": 0.928, "language_steps_run": 300}
    assert _final_statistics({**reset_only, "previous": [trained, language_only]}) == (
        "Final training statistics of the last command that trained (command 2) (smoothed): no vision stage, "
        "language loss 0.928."
    )


def test_model_card_names_the_machine_of_each_run_of_commands():
    from service.demo.model_card import FIRST_MACHINE, _machines

    older, newer = {}, {"cpu": "Intel Xeon, 2 cores"}
    assert _machines([older, older]) == FIRST_MACHINE
    assert _machines([older, older, newer]) == f"{FIRST_MACHINE} (commands 1-2) and Intel Xeon, 2 cores (command 3)"
    assert _machines([newer, older]) == f"Intel Xeon, 2 cores (command 1) and {FIRST_MACHINE} (command 2)"


def test_the_recipe_record_names_its_cpu():
    import os

    from service.demo.train_base import cpu_name

    name = cpu_name()
    assert name.endswith(f", {os.cpu_count()} cores") and len(name) > len(f", {os.cpu_count()} cores")
