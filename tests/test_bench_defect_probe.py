"""bench/defect_probe.py's location-by-index read-out on synthetic tokens whose answer is known."""

from __future__ import annotations

import torch

from service.world import DEFECT_TYPES, GRID_CELLS
from tests.helpers import load_bench_script


def _probe_module():
    return load_bench_script("defect_probe")


def _cell(patch: int, grid: int) -> int:
    """The 3x3 cell of a patch, written out the long way: which third of the rows and of the columns."""
    row, col = divmod(patch, grid)
    return GRID_CELLS.index(
        [["top-left", "top", "top-right"], ["left", "centre", "right"], ["bottom-left", "bottom", "bottom-right"]][
            row * 3 // grid
        ][col * 3 // grid]
    )


def _synthetic(n: int, grid: int, spike_at_defect: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, grid * grid, 8, generator=gen)
    patch = torch.randint(grid * grid, (n,), generator=gen)
    patch[::2] = -1  # every other image is good
    labels = []
    for i, p in enumerate(patch.tolist()):
        if p < 0:
            labels.append((0, -1, 0))
            continue
        spiked = p if spike_at_defect else int(torch.randint(grid * grid, (1,), generator=gen))
        x[i, spiked, 0] += 3.0
        labels.append((1 + i % len(DEFECT_TYPES), _cell(p, grid), 1))
    return x, torch.tensor(labels), patch


def test_location_by_index_reads_the_cell_of_the_token_that_carries_the_defect():
    probe = _probe_module()
    x, y, patch = _synthetic(600, 12, spike_at_defect=True)
    scores = probe.token_index_location(x, y, patch, n_train=400, steps=150, seed=0)
    assert scores["location_by_index"] > 0.95
    assert set(scores) == {"location_by_index", *(f"location_by_index_{t}" for t in DEFECT_TYPES)}


def test_location_by_index_is_near_chance_when_no_token_marks_the_defect():
    probe = _probe_module()
    x, y, patch = _synthetic(600, 12, spike_at_defect=False)
    # the scorer is trained on the true patch, but the spike sits elsewhere: nothing to find
    assert probe.token_index_location(x, y, patch, n_train=400, steps=150, seed=0)["location_by_index"] < 0.35


def test_scores_report_per_type_recall_and_naming() -> None:
    """``recall_<type>``: called defective at all; ``type_<type>``: called by its own name."""
    module = _probe_module()
    scratch, spot = 1 + DEFECT_TYPES.index("scratch"), 1 + DEFECT_TYPES.index("spot")
    # four scratches: named right, called a spot, called a spot, missed; two spots, both named right
    truth = [scratch, scratch, scratch, scratch, spot, spot, 0, 0]
    called = [scratch, spot, spot, 0, spot, spot, 0, spot]
    logits = torch.full((len(truth), 1 + len(DEFECT_TYPES)), -5.0)
    logits[torch.arange(len(truth)), torch.tensor(called)] = 5.0
    labels = torch.tensor([[t, -1 if t == 0 else 0, 1] for t in truth])
    out = module.scores(logits, None, labels)
    assert out["recall_scratch"] == 0.75 and out["type_scratch"] == 0.25
    assert out["recall_spot"] == 1.0 and out["type_spot"] == 1.0
    assert out["ok_specificity"] == 0.5 and out["presence"] == 6 / 8
    assert "type_chip" not in out
