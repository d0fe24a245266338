"""Demo preset, tokenizer corpus and in-memory training data drawn from the synthetic world."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from service.model.presets import Preset
from service.world import COLOURS, DEFECT_TYPES, GRID_CELLS, PART_NAMES, PART_TYPES, cell_of, generate_examples
from service.world.questions import GENERAL_QUESTION_TYPES, PHRASINGS, format_inspection_answer

DEMO_PRESET = Preset(
    vision_dim=192,
    vision_layers=5,
    vision_heads=6,
    image_size=96,
    patch_size=8,
    text_dim=256,
    text_layers=4,
    text_heads=4,
    text_kv_heads=4,
    text_ffn=704,
    max_positions=256,
    vocab_size=384,
)
"""The demo base: 96 px images, 12×12 patches of 8 px, ViT d=192 × 5 layers, Llama d=256 × 4 layers.

Patch 8 rather than 12: trained on dense defect labels for 300 steps, a 12 px patch tower never
flags a 1-2 px defect (49.1 % presence, majority 50.9 %) while an 8 px one reaches 61.5 % and a 6 px
one 68.0 % at twice the cost and 256 LLM tokens (``bench/defect_probe.py --parts patch``,
docs/model-card.md)."""

EVAL_SEED = 12345
"""The held-out seed of :mod:`service.demo.evaluate`; training never draws data from it."""

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
MAX_COUNT = 4


def tokenizer_corpus() -> list[str]:
    """Every instruction phrasing and every possible answer, in the prompt format the base uses."""
    answers = [PART_NAMES[p] for p in PART_TYPES] + list(COLOURS) + [str(i) for i in range(1, 10)] + list(GRID_CELLS)
    answers += ["ok"] + [format_inspection_answer(d, c) for d in DEFECT_TYPES for c in GRID_CELLS]
    instructions = [text for table in PHRASINGS.values() for group in table.values() for text in group]
    corpus = [f"USER: <image>\n{q} ASSISTANT: {a}" for q in instructions for a in answers[:8]]
    corpus += [f"USER: <image>\n{instructions[i % len(instructions)]} ASSISTANT: {a}" for i, a in enumerate(answers)]
    return corpus * 4


@dataclass
class ImagePool:
    """Rendered general scenes as uint8 pixels plus every attribute label and answer per image."""

    pixels: torch.Tensor  # [N, 3, S, S] uint8
    part: torch.Tensor  # [N] index into PART_TYPES
    colour: torch.Tensor  # [N] index into COLOUR_NAMES
    count: torch.Tensor  # [N] count - 1
    position: torch.Tensor  # [N] index into GRID_CELLS, -1 when count > 1
    occupancy: torch.Tensor  # [N, 9] float, 1 where a part sits in that cell
    answers: list[dict[str, str]] = field(default_factory=list)  # question type → answer

    def __len__(self) -> int:
        return int(self.part.shape[0])


def pixel_tensor(examples: list) -> torch.Tensor:
    """Rendered ``(image, record)`` examples → uint8 pixels ``[N, 3, S, S]``."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im, _ in examples])).permute(0, 3, 1, 2)


def defect_patch(scene_defect: dict, grid: int) -> int:
    """Row-major index of the patch, on a ``grid`` × ``grid`` patch grid, holding the defect's centre."""
    col = min(grid - 1, max(0, int(scene_defect["x"] * grid)))
    row = min(grid - 1, max(0, int(scene_defect["y"] * grid)))
    return row * grid + col


def build_pool(n: int, seed: int, size: int = DEMO_PRESET.image_size) -> ImagePool:
    """Render ``n`` general scenes (seed must differ from :data:`EVAL_SEED`)."""
    if seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} is reserved for held-out evaluation")
    examples = generate_examples(n, seed, kind="general", size=size)
    pixels = pixel_tensor(examples)
    part, colour, count, position, occupancy, answers = [], [], [], [], [], []
    for _, record in examples:
        meta = record["meta"]
        part.append(PART_TYPES.index(meta["part_type"]))
        colour.append(COLOUR_NAMES.index(meta["colour"]))
        count.append(meta["count"] - 1)
        cells = meta["positions"]
        position.append(GRID_CELLS.index(cells[0]) if meta["count"] == 1 else -1)
        occupancy.append([1.0 if c in cells else 0.0 for c in GRID_CELLS])
        row = {"part": PART_NAMES[meta["part_type"]], "colour": meta["colour"], "count": str(meta["count"])}
        if meta["count"] == 1:
            row["position"] = cells[0]
        answers.append(row)
    return ImagePool(
        pixels.contiguous(),
        torch.tensor(part),
        torch.tensor(colour),
        torch.tensor(count),
        torch.tensor(position),
        torch.tensor(occupancy),
        answers,
    )


@dataclass
class DefectPool:
    """Rendered inspection close-ups (half defective) with the patch that holds each defect."""

    pixels: torch.Tensor  # [N, 3, S, S] uint8
    defect: torch.Tensor  # [N] 0 = none, else 1 + index into DEFECT_TYPES
    patch: torch.Tensor  # [N] row-major index of the patch holding the defect's centre, -1 if none
    cell: torch.Tensor  # [N] index into GRID_CELLS of the defect's 3x3 cell (the answer's location), -1 if none

    def __len__(self) -> int:
        return int(self.defect.shape[0])


def build_defect_pool(n: int, seed: int, patch_size: int = DEMO_PRESET.patch_size,
                      size: int = DEMO_PRESET.image_size) -> DefectPool:
    """Render ``n`` inspection scenes and label, per image, the defect type, its patch and its 3x3 cell.

    These labels train the vision tower only (so that its features carry defects); the base's
    language stage never sees an inspection question.
    """
    if seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} is reserved for held-out evaluation")
    examples = generate_examples(n, seed, kind="inspection", size=size)
    pixels = pixel_tensor(examples)
    grid = size // patch_size
    defect, patch, cell = [], [], []
    for _, record in examples:
        scene_defect = record["meta"]["scene"]["defect"]
        if scene_defect is None:
            defect.append(0)
            patch.append(-1)
            cell.append(-1)
            continue
        defect.append(1 + DEFECT_TYPES.index(scene_defect["defect_type"]))
        patch.append(defect_patch(scene_defect, grid))
        cell.append(GRID_CELLS.index(cell_of(scene_defect["x"], scene_defect["y"])))
    return DefectPool(pixels.contiguous(), torch.tensor(defect), torch.tensor(patch), torch.tensor(cell))


def normalise(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` → float pixel values as the CLIP image processor makes them."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def sample_questions(pool: ImagePool, indices: list[int], rng: random.Random) -> list[tuple[str, str, str]]:
    """One ``(question_type, instruction, answer)`` per image index, question types balanced."""
    out = []
    for i in indices:
        answers = pool.answers[i]
        qtype = rng.choice([t for t in GENERAL_QUESTION_TYPES if t in answers])
        count = int(pool.count[i]) + 1
        table = PHRASINGS[qtype]
        group = table["any"] if "any" in table else (table["one"] if count == 1 else table["many"])
        out.append((qtype, rng.choice(group), answers[qtype]))
    return out
