"""Train the project's demo base (LLaVA architecture: ViT + VCE projector + small Llama) from scratch.

Usage::

    python -m service.demo.train_base --out service/assets/demo-base [--seed 0] \
        [--vision-steps 1200 --vision-minutes 11] [--language-steps 500 --language-minutes 13]

Recipe (DESIGN.md section 6 warns that end-to-end training from scratch stays at chance on shape):

1. Build a random LLaVA directory with :data:`~service.demo.data.DEMO_PRESET` and a BPE tokenizer
   trained on the world's instructions and answers; load it with the real :func:`load_base`.
2. *Vision stage*: pre-train the vision tower alone with attention-pooled classification heads on
   the patch tokens of the layer LLaVA projects (``-2``): part type, colour, count, position (single
   part) and a 9-cell occupancy map; with ``--defect-pool``, also a per-patch defect head on
   inspection close-ups (:class:`DefectHead`). The heads are thrown away afterwards.
3. *Language stage*: freeze the tower; train the LLM, the VCE attention and the MLP projector on
   general questions (part, colour, count, position) with loss on the answer tokens only; with
   ``--language-defect-weight``, a defect head on the projector output keeps defects in what the
   LLM reads; with ``--image-positions`` the projector gets a learned embedding per patch position
   (trained at ``--position-lr``), and ``--language-position-weight`` makes every projected token
   name its own row and column (:class:`PositionHead`), so the LLM can tell where a defect is.
   ``--init-from DIR --vision-steps 0`` continues this stage from a saved base;
   ``--init-from DIR --vision-distill-weight W`` first sharpens a trained tower on defects while
   distillation holds its general features (the committed base's third command);
   ``--defect-summary-weight`` / ``--language-summary-weight`` add :class:`DefectSummaryHead`, which
   makes every token state the close-up's defect type and cell (its fourth and fifth);
   ``--defect-class-weights chip=4,scratch=2`` weighs those heads' terms by defect type, for the
   types the tower misses, and the vision log reports each type's recall (``found_<type>``);
   ``--neutral-output-rows`` finally makes the LM head neutral on every token no general answer
   uses (:func:`neutral_output_rows`), so adapters can teach new answer words.
4. Save with :func:`save_base` in float16 and write ``MODEL_CARD.json`` (fingerprint of the saved
   weights as :func:`load_base` loads them in float32, recipe, timings, held-out accuracy).

Only general questions are trained; inspection is left to the ``line-inspection`` adapter.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from service.demo.data import (
    COLOUR_NAMES,
    DEMO_PRESET,
    MAX_COUNT,
    DefectPool,
    ImagePool,
    build_defect_pool,
    build_pool,
    normalise,
    sample_questions,
    tokenizer_corpus,
)
from service.model.base import BaseModel, load_base, save_base
from service.model.generate import answer_token_ids
from service.model.presets import build_random_base
from service.model.training import TrainingExample, adapter_loss, build_batch
from service.world import DEFECT_TYPES, GRID_CELLS, PART_TYPES

log = logging.getLogger("service.demo.train_base")

MODEL_CARD_FILE = "MODEL_CARD.json"


class AttributeHeads(nn.Module):
    """Learned-query attention pooling over patch tokens, one query per attribute / grid cell."""

    def __init__(self, dim: int):
        super().__init__()
        self.names = ("part", "colour", "count", "position")
        self.n_cells = len(GRID_CELLS)
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(len(self.names) + self.n_cells, dim) * dim**-0.5)
        self.key = nn.Linear(dim, dim)
        sizes = (len(PART_TYPES), len(COLOUR_NAMES), MAX_COUNT, len(GRID_CELLS))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, k)) for k in sizes)
        self.cell_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``tokens [B, HW, d]`` → logits per attribute and occupancy logits ``[B, 9]``."""
        h = self.norm(tokens)
        scores = torch.einsum("bnd,qd->bqn", self.key(h), self.queries) / math.sqrt(h.shape[-1])
        pooled = torch.einsum("bqn,bnd->bqd", scores.softmax(-1), h)
        logits = [head(pooled[:, i]) for i, head in enumerate(self.heads)]
        cells = self.cell_head(pooled[:, len(self.names) :]).squeeze(-1)
        return logits, cells


class DefectHead(nn.Module):
    """Per-patch defect classifier: ``tokens [B, HW, d]`` → logits ``[B, HW, 1 + n_defect_types]`` (0 = none).

    Dense labels (the patch holding the defect carries its type, every other patch "none") are what
    makes a small tower learn 1-2 px defects at all; one label per image stays at chance.

    ``patch_weight`` is the weight of the one defective patch in the per-patch cross-entropy
    (``None``: ``HW / 4``, so both classes count about equally). With ``image_weight > 0`` the loss
    also has an image-level term: binary cross-entropy of :meth:`image_score` against "this image
    has a defect". Without it, a heavily weighted defect patch and a max over patches flag most good
    images (in an exploratory run: 69 % of them after 400 steps, at 94-100 % recall); with it, the
    image-level decision — what a ``line-inspection`` adapter has to make — is trained directly.

    ``class_weight`` (``[1 + n_defect_types]``, see :func:`parse_class_weights`) scales the loss of
    a defective patch and of a defective image by its type's weight, for types the tower misses
    (on the base ``sha256:fb1b00d8…`` the adapter found 4.6 % of chips).
    """

    def __init__(self, dim: int, patch_weight: float | None = None, image_weight: float = 0.0,
                 class_weight: torch.Tensor | None = None):
        super().__init__()
        self.patch_weight = patch_weight
        self.image_weight = image_weight
        self.class_weight = class_weight
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1 + len(DEFECT_TYPES)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    @staticmethod
    def image_score(logits: torch.Tensor) -> torch.Tensor:
        """``[B, HW, C]`` → ``[B]`` log-odds that the image holds a defect: a soft maximum over patches
        (log-mean-exp) of each patch's log-odds "some defect type" vs "none"."""
        per_patch = torch.logsumexp(logits[..., 1:], -1) - logits[..., 0]
        return torch.logsumexp(per_patch, 1) - math.log(per_patch.shape[1])

    def loss(self, logits: torch.Tensor, defect: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """Weighted per-patch cross-entropy (+ the image-level term); ``defect``/``patch`` ``[B]`` as in
        :class:`~service.demo.data.DefectPool`."""
        target = torch.zeros(logits.shape[:2], dtype=torch.long)
        has = patch >= 0
        target[has.nonzero()[:, 0], patch[has]] = defect[has]
        patch_weight = logits.shape[1] / 4 if self.patch_weight is None else self.patch_weight
        weight = torch.where(target > 0, patch_weight, 1.0)
        if self.class_weight is not None:
            weight = weight * self.class_weight[target]
        per_patch = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        loss = (per_patch * weight.flatten()).sum() / weight.sum()
        if self.image_weight:
            per_image = F.binary_cross_entropy_with_logits(
                self.image_score(logits), (defect > 0).float(), reduction="none"
            )
            image_weight = torch.ones_like(per_image) if self.class_weight is None else self.class_weight[defect]
            loss = loss + self.image_weight * (per_image * image_weight).sum() / image_weight.sum()
        return loss

    def image_presence(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the image-level score is positive (with the image term), else some patch is
        more likely defective than not."""
        if self.image_weight:
            return self.image_score(logits) > 0
        return logits.softmax(-1)[..., 1:].sum(-1).amax(1) > 0.5


class DefectSummaryHead(nn.Module):
    """Every token states the image's inspection answer: ``tokens [B, HW, d]`` → defect-type logits
    ``[B, HW, 1 + n_defect_types]`` (0 = none) and 3x3-cell logits ``[B, HW, 9]``.

    A linear read-out of each token (after LayerNorm), trained on *every* token. The per-patch
    :class:`DefectHead` marks the defect on the one token that holds it, and an adapter on the
    frozen LLM does not learn to point its answer at one token of 144 (on the base trained without
    this head, ``sha256:fb24e29a…``, the adapter placed 15 % of defects while a per-token probe
    found the right token for 73 %). With this head the features have to carry the answer on all
    tokens, where the LLM's diffuse attention reads it, as the 9-cell occupancy head did for the
    parts' positions; two continuations with it took the same adapter recipe to 49 % (1 000
    held-out images, docs/model-card.md).

    ``class_weight`` (``[1 + n_defect_types]``) weighs each image's type and cell terms by its
    defect type, as in :class:`DefectHead`.
    """

    def __init__(self, dim: int, class_weight: torch.Tensor | None = None):
        super().__init__()
        self.class_weight = class_weight
        self.norm = nn.LayerNorm(dim)
        self.type_head = nn.Linear(dim, 1 + len(DEFECT_TYPES))
        self.cell_head = nn.Linear(dim, len(GRID_CELLS))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(tokens)
        return self.type_head(h), self.cell_head(h)

    def loss(self, logits: tuple[torch.Tensor, torch.Tensor], defect: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every token against the image's type, plus (defective images only) its
        cell; ``defect``/``cell`` ``[B]`` as in :class:`~service.demo.data.DefectPool`."""
        type_logits, cell_logits = logits
        n = type_logits.shape[1]
        loss = F.cross_entropy(type_logits.flatten(0, 1), defect.repeat_interleave(n), weight=self.class_weight)
        has = defect > 0
        if has.any():
            per_token = F.cross_entropy(cell_logits[has].flatten(0, 1), cell[has].repeat_interleave(n), reduction="none")
            if self.class_weight is None:
                loss = loss + per_token.mean()
            else:
                weight = self.class_weight[defect[has]].repeat_interleave(n)
                loss = loss + (per_token * weight).sum() / weight.sum()
        return loss

    @staticmethod
    @torch.no_grad()
    def exact(logits: tuple[torch.Tensor, torch.Tensor], defect: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the token-averaged logits name the right type and, for a defect, the right cell."""
        type_logits, cell_logits = logits
        type_ok = type_logits.mean(1).argmax(-1) == defect
        cell_ok = cell_logits.mean(1).argmax(-1) == cell
        return type_ok & ((defect == 0) | cell_ok)


class PositionHead(nn.Module):
    """A linear read-out of each token's own row and column on the ``grid`` x ``grid`` patch grid.

    Thrown away after training: its loss makes the projector output carry where each token lies
    (a probe on the frozen output of the base before ``--image-positions`` placed defects in the
    right 3x3 cell 21 % of the time from token content, 73 % from token index).
    """

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.net = nn.Linear(dim, 2 * grid)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of row + column over every token of ``tokens`` ``[B, grid*grid, d]``."""
        b, n, _ = tokens.shape
        logits = self.net(tokens).view(b * n, 2, self.grid)
        index = torch.arange(n, device=tokens.device).repeat(b)
        return F.cross_entropy(logits[:, 0], index // self.grid) + F.cross_entropy(logits[:, 1], index % self.grid)


def parse_class_weights(spec: str | None) -> torch.Tensor | None:
    """``"chip=4,scratch=2"`` → loss weight per defect class ``[1 + n_defect_types]`` (index 0 =
    none; unnamed classes 1), or ``None`` for an empty spec. Raises ``ValueError`` on an unknown
    type or a weight that is not a positive number."""
    if not spec:
        return None
    weight = torch.ones(1 + len(DEFECT_TYPES))
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in DEFECT_TYPES:
            raise ValueError(f"{item.strip()!r}: expected TYPE=WEIGHT with TYPE one of {', '.join(DEFECT_TYPES)}")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"{item.strip()!r}: the weight must be a positive number")
        weight[1 + DEFECT_TYPES.index(name)] = number
    return weight


def found_by_type(called: torch.Tensor, defect: torch.Tensor) -> dict[str, float]:
    """Recall per defect type in one batch: ``{"found_chip": 0.2, ...}`` for the types present
    (``called``/``defect`` ``[B]``: the image was called defective / its defect index, 0 = none)."""
    found = {}
    for index, name in enumerate(DEFECT_TYPES, start=1):
        rows = defect == index
        if rows.any():
            found[f"found_{name}"] = called[rows].float().mean().item()
    return found


def cpu_name() -> str:
    """The CPU model the recipe ran on and its core count, for the model card: ``"Intel(R) Xeon(R) Processor, 2 cores"``."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def neutral_output_rows(base: BaseModel, answers: Iterable[str]) -> int:
    """Re-centre the LM head rows of tokens that no answer in ``answers`` uses onto the rows they use.

    The language stage trains on general answers only, so every other row of the (untied) LM head
    is trained purely as a softmax negative: pushed, all alike, away from the hidden states the LLM
    produces. An adapter on the LLM linears then cannot raise such a token against one the base
    already emits: on the base ``sha256:27ea9b0a…`` the ``line-inspection`` adapter gave the ``c``
    of `` s|c|r|at|ch`` (scratch) 0.08-0.10 probability after `` s`` on scratches *and* spots, the
    ``p`` of spot 0.5-0.6, and never answered "scratch".

    Each unused row ``u`` becomes ``mean_used + (u - mean_unused) * rms_used / rms_unused``: the
    shared push is removed and the rows keep their own directions at the used rows' spread. (Setting
    them all to ``mean_used`` makes them identical, so no hidden state can tell them apart: an adapter
    trained on such a head stalled at a loss of 2.2 where it reached 0.48 on the original one.)
    Returns the number of rows moved.
    """
    head = base.model.get_output_embeddings().weight  # [vocab, d_llm]
    if head.data_ptr() == base.model.get_input_embeddings().weight.data_ptr():
        raise ValueError("the LM head is tied to the input embeddings; resetting its rows would change the inputs too")
    used = torch.zeros(head.shape[0], dtype=torch.bool)
    used[base.tokenizer.eos_token_id] = True
    for answer in set(answers):
        used[answer_token_ids(base, answer)] = True
    if used.all():
        return 0
    with torch.no_grad():
        kept, moved = head[used].float(), head[~used].float()
        kept_centred, moved_centred = kept - kept.mean(0), moved - moved.mean(0)
        scale = kept_centred.pow(2).sum(-1).mean().sqrt() / moved_centred.pow(2).sum(-1).mean().sqrt().clamp(min=1e-12)
        head[~used] = (kept.mean(0) + moved_centred * scale).to(head.dtype)
    return int((~used).sum())


def _lr(step: int, total: int, peak: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 5 % driven by steps or by the time budget, whichever is ahead."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _time_fraction(start: float, budget: float | None) -> float:
    return (time.perf_counter() - start) / budget if budget else 0.0


def _eta(start: float, step: int, total: int) -> str:
    elapsed = time.perf_counter() - start
    left = elapsed / max(1, step) * (total - step)
    return f"{elapsed:6.0f}s elapsed, ETA {left:5.0f}s"


def vce_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """The hidden states ``[B, 1 + HW, d]`` of the tower layers the VCE projector reads."""
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    return [hidden[layer] for layer in layers]


def train_vision(
    base: BaseModel,
    pool: ImagePool,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 25,
    max_seconds: float | None = None,
    defects: DefectPool | None = None,
    defect_batch: int = 32,
    defect_weight: float = 1.0,
    defect_warmup_steps: int = 0,
    defect_patch_weight: float | None = None,
    defect_image_weight: float = 0.0,
    distill_weight: float = 0.0,
    summary_weight: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> dict[str, float]:
    """Stage 1: the vision tower learns the attributes through throw-away classification heads.

    With ``defects``, each step also feeds ``defect_batch`` inspection close-ups through the tower
    and a per-patch :class:`DefectHead` (loss times ``defect_weight``; ``defect_patch_weight`` and
    ``defect_image_weight`` as in :class:`DefectHead`), so the features the LLM later reads carry
    defects; no inspection *question* is trained here. ``summary_weight > 0`` adds a
    :class:`DefectSummaryHead` on the same close-ups, so every token carries the image's defect
    type and cell; ``class_weight`` weighs both heads' terms by defect type, and the log reports
    each type's recall (``found_<type>``). The first ``defect_warmup_steps`` steps train the defect head alone: joined
    from the start, the attribute losses dominate the clipped gradient and the defect head stays
    at chance for hundreds of steps.

    ``distill_weight > 0`` continues an already trained tower instead (``--init-from``): the
    ``batch_size`` general scenes per step no longer train attribute heads but keep every hidden
    state the VCE reads close to the starting tower's (mean squared error over the teacher's
    variance, averaged over those layers), so the LLM and projector trained on the old features
    stay valid while the defect head sharpens the tower.

    ``max_seconds`` caps the stage's wall time: the schedule anneals by time when that is ahead of
    the step count, and the stage stops when the budget is spent (a shared, busy machine).
    """
    tower = base.model.model.vision_tower
    layers = list(base.vce_config.feature_layers)
    teacher = copy.deepcopy(tower).eval().requires_grad_(False) if distill_weight > 0 else None
    tower.requires_grad_(True)
    tower.train()
    torch.manual_seed(seed)
    heads = AttributeHeads(tower.config.hidden_size)
    params = [p for p in tower.parameters() if p.requires_grad]
    if teacher is None:
        params += list(heads.parameters())
    if defects is not None:
        defect_head = DefectHead(tower.config.hidden_size, defect_patch_weight, defect_image_weight, class_weight)
        params += list(defect_head.parameters())
        if summary_weight:
            summary_head = DefectSummaryHead(tower.config.hidden_size, class_weight)
            params += list(summary_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    mean, std = base.image_processor.image_mean, base.image_processor.image_std
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, max(1, steps // 20), _time_fraction(start, max_seconds))
        general = defects is None or step >= defect_warmup_steps
        n_general = batch_size if general else 0
        idx = torch.randint(len(pool), (n_general,), generator=gen)
        pixels = pool.pixels[idx]
        if defects is not None:
            d_idx = torch.randint(len(defects), (defect_batch,), generator=gen)
            pixels = torch.cat([pixels, defects.pixels[d_idx]])
        pixel_values = normalise(pixels, mean, std)
        hidden = vce_hidden_states(tower, pixel_values, layers)
        tokens = hidden[0][:, 1:]  # the anchor layer's patch tokens
        loss = torch.zeros(())
        stats: dict[str, float] = {}
        if general and teacher is not None:
            with torch.no_grad():
                targets_hidden = vce_hidden_states(teacher, pixel_values[:n_general], layers)
            distill = sum(
                F.mse_loss(h[:n_general], t) / t.var() for h, t in zip(hidden, targets_hidden, strict=True)
            ) / len(layers)
            loss = loss + distill_weight * distill
            stats["distill"] = distill.item()
        elif general:
            logits, cells = heads(tokens[:n_general])
            targets = (pool.part[idx], pool.colour[idx], pool.count[idx], pool.position[idx])
            losses = [F.cross_entropy(lg, t, ignore_index=-1) for lg, t in zip(logits, targets, strict=True)]
            loss = loss + sum(losses) + F.binary_cross_entropy_with_logits(cells, pool.occupancy[idx])
            with torch.no_grad():
                for name, lg, t in zip(heads.names, logits, targets, strict=True):
                    keep = t >= 0
                    stats[f"acc_{name}"] = (lg[keep].argmax(-1) == t[keep]).float().mean().item() if keep.any() else 0.0
        if defects is not None:
            # General scenes may carry unlabelled defects too, so only the close-ups train this head.
            defect_logits = defect_head(tokens[n_general:])
            defect_loss = defect_head.loss(defect_logits, defects.defect[d_idx], defects.patch[d_idx])
            loss = loss + defect_weight * defect_loss
            with torch.no_grad():
                called = defect_head.image_presence(defect_logits)
                stats["acc_defect"] = (called == (defects.defect[d_idx] > 0)).float().mean().item()
                stats["loss_defect"] = defect_loss.item()
                stats.update(found_by_type(called, defects.defect[d_idx]))
            if summary_weight:
                summary_logits = summary_head(tokens[n_general:])
                summary_loss = summary_head.loss(summary_logits, defects.defect[d_idx], defects.cell[d_idx])
                loss = loss + summary_weight * summary_loss
                stats["acc_summary"] = summary_head.exact(
                    summary_logits, defects.defect[d_idx], defects.cell[d_idx]).float().mean().item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stats = {"loss": loss.item(), **stats}
        for k, v in stats.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        out_of_time = _time_fraction(start, max_seconds) >= 1.0
        if (step + 1) % log_every == 0 or step + 1 == steps or out_of_time:
            shown = " ".join(f"{k}={v:.3f}" for k, v in running.items())
            log.info("vision step %d/%d %s | %s", step + 1, steps, shown, _eta(start, step + 1, steps))
        if out_of_time:
            log.info("vision stage: time budget spent after %d steps", step + 1)
            break
    running["steps"] = step + 1
    tower.eval()
    tower.requires_grad_(False)
    return {k: round(v, 4) for k, v in running.items()}


def train_language(
    base: BaseModel,
    pool: ImagePool,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 25,
    max_seconds: float | None = None,
    train_vce: bool = True,
    defects: DefectPool | None = None,
    defect_batch: int = 32,
    defect_weight: float = 1.0,
    defect_patch_weight: float | None = None,
    defect_image_weight: float = 0.0,
    position_weight: float = 0.0,
    position_lr: float | None = None,
    summary_weight: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Stage 2: LLM + VCE + MLP projector learn to answer general questions (tower frozen).

    Returns the smoothed final loss and the number of steps run (``max_seconds`` as in
    :func:`train_vision`). ``train_vce=False`` keeps the VCE attention at its identity
    initialisation (zero ``output_proj``), which makes the result a plain LLaVA base: the
    no-VCE arm of ``bench/ablation.py``.

    With ``defects``, a throw-away per-patch :class:`DefectHead` on the projector output (LLM
    space) keeps defects in what the LLM reads: trained on general answers alone, the projector
    drops them (a probe reads defect presence at 76 % from the tower but 58 % after the projector).
    The LLM itself never sees an inspection question. ``defect_weight=0`` leaves that head out;
    ``summary_weight > 0`` adds a :class:`DefectSummaryHead` on the projected close-ups, so every
    token the LLM reads keeps the image's defect type and cell; ``class_weight`` as in
    :func:`train_vision`.

    ``position_weight`` adds a throw-away :class:`PositionHead` on the projected general scenes;
    the projector's position embedding (if it has one) trains at ``position_lr`` (default ``lr``)
    without weight decay.
    """
    base.model.requires_grad_(False)
    base.model.model.language_model.requires_grad_(True)
    base.model.lm_head.requires_grad_(True)
    base.projector.requires_grad_(True)
    if not train_vce:
        for module in (base.projector.attention, base.projector.query_norm, base.projector.value_norm):
            module.requires_grad_(False)
    params = [p for p in base.model.parameters() if p.requires_grad]
    text_dim = base.model.config.text_config.hidden_size
    if defects is not None:
        torch.manual_seed(seed)
        defect_head = (DefectHead(text_dim, defect_patch_weight, defect_image_weight, class_weight)
                       if defect_weight else None)
        summary_head = DefectSummaryHead(text_dim, class_weight) if summary_weight else None
        params += [p for head in (defect_head, summary_head) if head is not None for p in head.parameters()]
    if position_weight:
        position_head = PositionHead(text_dim, math.isqrt(base.tokens_per_image))
        params += list(position_head.parameters())
    positions = base.projector.position_embedding
    decay = [p for p in params if p.ndim >= 2 and p is not positions]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05, "peak": lr}, {"params": no_decay, "weight_decay": 0.0, "peak": lr}]
    if positions is not None:
        groups.append({"params": [positions], "weight_decay": 0.0, "peak": lr if position_lr is None else position_lr})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    mean, std = base.image_processor.image_mean, base.image_processor.image_std
    rng = random.Random(seed)
    defect_gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    running = None
    defect_accuracy = summary_accuracy = position_running = None
    steps_run = 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, group["peak"], max(1, steps // 20), _time_fraction(start, max_seconds))
        indices = [rng.randrange(len(pool)) for _ in range(batch_size)]
        questions = sample_questions(pool, indices, rng)
        examples = [TrainingExample(q, a) for _, q, a in questions]
        # The prompt needs one image placeholder per row: build_batch counts images per example.
        for ex in examples:
            ex.images = [None]  # type: ignore[list-item]
        batch = build_batch(base, examples)
        pixels = normalise(pool.pixels[torch.tensor(indices)], mean, std)
        feats = base.image_features(pixels)
        loss = adapter_loss(base, batch, None, image_features=[[f] for f in feats])
        if position_weight:
            position_loss = position_head.loss(feats)
            loss = loss + position_weight * position_loss
            position_running = position_loss.item() if position_running is None else (
                0.9 * position_running + 0.1 * position_loss.item())
        if defects is not None:
            d_idx = torch.randint(len(defects), (defect_batch,), generator=defect_gen)
            projected = base.image_features(normalise(defects.pixels[d_idx], mean, std))
            defect, cell = defects.defect[d_idx], defects.cell[d_idx]
            if defect_head is not None:
                defect_logits = defect_head(projected)
                loss = loss + defect_weight * defect_head.loss(defect_logits, defect, defects.patch[d_idx])
                with torch.no_grad():
                    accuracy = (defect_head.image_presence(defect_logits) == (defect > 0)).float().mean().item()
                defect_accuracy = accuracy if defect_accuracy is None else 0.9 * defect_accuracy + 0.1 * accuracy
            if summary_head is not None:
                summary_logits = summary_head(projected)
                loss = loss + summary_weight * summary_head.loss(summary_logits, defect, cell)
                accuracy = summary_head.exact(summary_logits, defect, cell).float().mean().item()
                summary_accuracy = accuracy if summary_accuracy is None else 0.9 * summary_accuracy + 0.1 * accuracy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        steps_run = step + 1
        out_of_time = _time_fraction(start, max_seconds) >= 1.0
        if (step + 1) % log_every == 0 or step + 1 == steps or out_of_time:
            shown = "" if defect_accuracy is None else f" acc_defect={defect_accuracy:.3f}"
            shown += "" if summary_accuracy is None else f" acc_summary={summary_accuracy:.3f}"
            shown += "" if position_running is None else f" loss_position={position_running:.3f}"
            log.info("language step %d/%d loss=%.4f%s | %s", step + 1, steps, running, shown, _eta(start, step + 1, steps))
        if out_of_time:
            log.info("language stage: time budget spent after %d steps", step + 1)
            break
    base.model.requires_grad_(False)
    return float(running or 0.0), steps_run


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def recipe_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option spelled out; unset ones left out)."""
    parts = ["python -m service.demo.train_base"]
    for name, value in vars(args).items():
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            parts.append(flag)
        elif value is not None and value is not False:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def chain_previous_stages(card: dict, initial: dict) -> None:
    """Record the stages that made the ``--init-from`` base, oldest first, in ``card``.

    ``recipe.previous`` and ``training.previous`` list one entry per earlier command (its recipe /
    training record, held-out general accuracy in ``eval_general``); a card from before this
    format keeps its first stage under ``stage1``.
    """
    for section in ("recipe", "training"):
        earlier = dict(initial[section])
        previous = list(earlier.pop("previous", []))
        if "stage1" in earlier:
            previous.append(dict(earlier.pop("stage1")))
            if "stage1_eval_general" in earlier:
                previous[-1]["eval_general"] = earlier.pop("stage1_eval_general")
        if section == "training" and "general" in initial.get("eval", {}):
            earlier["eval_general"] = initial["eval"]["general"]["accuracy"]
        card[section]["previous"] = previous + [earlier]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("service/assets/demo-base"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=12000, help="rendered training images")
    parser.add_argument("--defect-pool", type=int, default=8000,
                        help="rendered inspection images for the vision stage's defect head (0 = none)")
    parser.add_argument("--defect-batch", type=int, default=32, help="inspection images per vision step")
    parser.add_argument("--defect-weight", type=float, default=1.0, help="weight of the defect loss in stage 1")
    parser.add_argument("--defect-warmup-steps", type=int, default=0,
                        help="stage-1 steps on the defect head alone before the attribute heads join")
    parser.add_argument("--defect-patch-weight", type=float, default=None,
                        help="weight of the defective patch in the defect heads' per-patch loss (default: patches / 4)")
    parser.add_argument("--defect-image-weight", type=float, default=0.0,
                        help="weight of the defect heads' image-level defective/ok term (0 = none)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this saved base instead of a random one (e.g. --vision-steps 0 to continue "
                        "its language stage); its recipe is kept in the new card as the previous stages")
    parser.add_argument("--vision-distill-weight", type=float, default=0.0,
                        help="with --init-from: the vision stage keeps the tower's VCE-read hidden states on general "
                        "scenes close to the starting tower's (this weight) instead of training attribute heads")
    parser.add_argument("--language-defect-weight", type=float, default=0.0,
                        help="weight of the defect head on the projector output in stage 2 (0 = none)")
    parser.add_argument("--defect-summary-weight", type=float, default=0.0,
                        help="vision stage: weight of the head that makes every patch token state the image's "
                        "defect type and 3x3 cell (0 = none)")
    parser.add_argument("--language-summary-weight", type=float, default=0.0,
                        help="language stage: the same head on the projector output (0 = none)")
    parser.add_argument("--defect-class-weights", default=None, metavar="TYPE=W,...",
                        help="weigh the defect and summary heads' loss per defect type, e.g. chip=4,scratch=2 "
                        "(unnamed types 1; types: " + ", ".join(DEFECT_TYPES) + ")")
    parser.add_argument("--neutral-output-rows", action="store_true",
                        help="after training, re-centre the LM head rows of tokens no general answer uses on "
                        "the rows they use, so that an adapter can teach the base new answer words")
    parser.add_argument("--image-positions", action="store_true",
                        help="give the projector a learned position embedding per patch (zero at first; "
                        "a base that has one keeps it without this flag)")
    parser.add_argument("--position-lr", type=float, default=None,
                        help="peak learning rate of the position embedding (default: --language-lr)")
    parser.add_argument("--language-position-weight", type=float, default=0.0,
                        help="language stage: weight of the loss that makes each projected token name its "
                        "own row and column")
    parser.add_argument("--vision-steps", type=int, default=1200)
    parser.add_argument("--vision-batch", type=int, default=64)
    parser.add_argument("--vision-lr", type=float, default=1.5e-3)
    parser.add_argument("--language-steps", type=int, default=500)
    parser.add_argument("--language-batch", type=int, default=48)
    parser.add_argument("--language-lr", type=float, default=1e-3)
    parser.add_argument("--vision-minutes", type=float, default=11.0, help="wall-time cap of stage 1 (0 = none)")
    parser.add_argument("--language-minutes", type=float, default=13.0, help="wall-time cap of stage 2 (0 = none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out examples per kind (0 = skip)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vision_distill_weight and not args.init_from:
        parser.error("--vision-distill-weight needs --init-from (a trained tower to stay close to)")
    if (args.defect_summary_weight or args.language_summary_weight) and not args.defect_pool:
        parser.error("--defect-summary-weight / --language-summary-weight need --defect-pool > 0 (labelled close-ups)")
    try:
        class_weight = parse_class_weights(args.defect_class_weights)
    except ValueError as error:
        parser.error(f"--defect-class-weights: {error}")
    if class_weight is not None and not args.defect_pool:
        parser.error("--defect-class-weights needs --defect-pool > 0 (labelled close-ups)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    pool_seed = 1000 + args.seed
    log.info("rendering %d training images (seed %d)", args.pool, pool_seed)
    pool = build_pool(args.pool, pool_seed)
    defect_seed = 4000 + args.seed
    defects = None
    if args.defect_pool and (args.vision_steps or args.language_steps):  # a no-training command needs none
        log.info("rendering %d inspection images for the defect head (seed %d)", args.defect_pool, defect_seed)
        defects = build_defect_pool(args.defect_pool, defect_seed)
    logging.getLogger("service.model.base").setLevel(logging.ERROR)
    if args.init_from:
        base = load_base(args.init_from, n_slots=0)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_random_base(tmp, DEMO_PRESET, seed=args.seed, corpus=tokenizer_corpus())
            base = load_base(tmp, n_slots=0)
    if args.image_positions and base.projector.position_embedding is None:
        base.projector.add_image_positions(base.tokens_per_image, base.model.config.text_config.hidden_size)
    n_params = sum(p.numel() for p in base.model.parameters())
    log.info("%s base: %.2fM parameters, VCE %s", "initial" if args.init_from else "random", n_params / 1e6,
             base.vce_config)
    t1 = time.perf_counter()
    vision_stats = {} if args.vision_steps == 0 else train_vision(
        base,
        pool,
        args.vision_steps,
        args.vision_batch,
        args.vision_lr,
        args.seed,
        max_seconds=args.vision_minutes * 60 or None,
        defects=defects,
        defect_batch=args.defect_batch,
        defect_weight=args.defect_weight,
        defect_warmup_steps=args.defect_warmup_steps,
        defect_patch_weight=args.defect_patch_weight,
        defect_image_weight=args.defect_image_weight,
        distill_weight=args.vision_distill_weight,
        summary_weight=args.defect_summary_weight,
        class_weight=class_weight,
    )
    t2 = time.perf_counter()
    language_loss, language_steps = train_language(
        base,
        pool,
        args.language_steps,
        args.language_batch,
        args.language_lr,
        args.seed,
        max_seconds=args.language_minutes * 60 or None,
        defects=defects if args.language_defect_weight or args.language_summary_weight else None,
        defect_batch=args.defect_batch,
        defect_weight=args.language_defect_weight,
        defect_patch_weight=args.defect_patch_weight,
        defect_image_weight=args.defect_image_weight,
        position_weight=args.language_position_weight,
        position_lr=args.position_lr,
        summary_weight=args.language_summary_weight,
        class_weight=class_weight,
    )
    rows_reset = None
    if args.neutral_output_rows:
        rows_reset = neutral_output_rows(base, (answer for answers in pool.answers for answer in answers.values()))
        log.info("LM head: %d rows of tokens no general answer uses re-centred on the others", rows_reset)
    t3 = time.perf_counter()

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    base.model.to(torch.float16)
    base.model.config.name_or_path = "demo-base"
    save_base(base, out)
    loaded = load_base(out, n_slots=0)  # what users get: float32 from the float16 files
    card = {
        "model_id": "demo-base",
        "fingerprint": loaded.fingerprint,
        "architecture": {
            "preset": DEMO_PRESET.__dict__,
            "vocab_size": len(loaded.tokenizer),
            "vce": loaded.vce_config.to_dict(),
            "parameters": n_params,
            "tokens_per_image": loaded.tokens_per_image,
        },
        "recipe": {
            "command": recipe_command(args),
            "seed": args.seed,
            "pool_images": args.pool,
            "pool_seed": pool_seed,
            "init_from": str(args.init_from) if args.init_from else None,
            "language_defect_weight": args.language_defect_weight,
            "image_positions": loaded.vce_config.image_positions,
            "position_lr": args.position_lr,
            "language_position_weight": args.language_position_weight,
            "defect_pool_images": args.defect_pool,
            "defect_pool_seed": defect_seed,
            "defect_batch": args.defect_batch,
            "defect_weight": args.defect_weight,
            "defect_warmup_steps": args.defect_warmup_steps,
            "defect_patch_weight": args.defect_patch_weight,
            "defect_image_weight": args.defect_image_weight,
            "vision_distill_weight": args.vision_distill_weight,
            "defect_summary_weight": args.defect_summary_weight,
            "language_summary_weight": args.language_summary_weight,
            "defect_class_weights": args.defect_class_weights,
            "neutral_output_rows": args.neutral_output_rows,
            "vision": {"steps": args.vision_steps, "batch": args.vision_batch, "lr": args.vision_lr},
            "language": {"steps": args.language_steps, "batch": args.language_batch, "lr": args.language_lr},
            "saved_dtype": "float16",
        },
        "training": {
            "vision_final": vision_stats,
            "language_final_loss": round(language_loss, 4),
            "language_steps_run": language_steps,
            "output_rows_reset": rows_reset,
            "seconds": {
                "data_and_setup": round(t1 - t0, 1),
                "vision": round(t2 - t1, 1),
                "language": round(t3 - t2, 1),
                "total": round(t3 - t0, 1),
            },
            "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
        },
        "artifact_bytes": dir_size(out),
    }
    if args.init_from and (args.init_from / MODEL_CARD_FILE).exists():
        chain_previous_stages(card, json.loads((args.init_from / MODEL_CARD_FILE).read_text()))
    if args.eval_n:
        from service.demo.evaluate import evaluate

        card["eval"] = {
            kind: evaluate(loaded, n=args.eval_n, kind=kind, seed=12345) for kind in ("general", "inspection")
        }
    (out / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    card["artifact_bytes"] = dir_size(out)
    (out / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log.info("saved %s (%.1f MB), fingerprint %s", out, card["artifact_bytes"] / 1e6, card["fingerprint"])
    log.info("%s", json.dumps(card.get("eval", {}), indent=1))
    return card


if __name__ == "__main__":
    main()
