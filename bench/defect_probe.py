"""Is the defect signal in the demo base's image features? Probes on frozen features, then a tower fine-tune.

An LLM-side adapter can only read what the image tokens carry. This measures, on held-out
inspection images (half of them defective, tiny and large defects):

1. ``probe``: for every hidden state of the frozen vision tower (0 = patch embeddings … -1) and
   for the projector output (VCE + MLP, what the LLM sees), an attention-pooled MLP probe trained on
   the frozen tokens to predict defect presence + type and location; held-out accuracy. The
   attention-pooled probe reads location from token *content* only (as an LLM must, when its RoPE
   positions are relative to a prompt of varying length); ``location_by_index`` is the same call made
   from token *index*: a per-token defect scorer, and the cell of its highest-scoring token.
2. ``finetune``: the upper bound with the tower itself trained (from the demo base's weights) on
   defect labels for ``--finetune-steps`` steps, with image-level labels (one label per image,
   max-pooled over patch logits) and with dense labels (the patch holding the defect is labelled
   with its type, every other patch "none").

3. ``patch``: which patch size can learn defects at all: for each ``--patch-sizes`` a *fresh* tower
   of the demo width and depth is trained from scratch on dense defect labels (as above) for
   ``--patch-steps`` steps, batch 32, on ``--patch-n`` rendered images; held-out image-level
   presence, recall and specificity, and seconds (the cost of each patch size, measured in one run).

    python bench/defect_probe.py [--n 3000] [--probe-steps 600] [--finetune-steps 300] [--parts probe finetune]
    python bench/defect_probe.py --parts patch --patch-sizes 12 8 6 --out bench/results/defect_patch.json

Results go to ``--out`` (default ``bench/results/defect_probe.json``, measured on an earlier base;
``defect_probe_fb24e29a.json`` is an older base's probe, with per-type recall;
``defect_probe_fb1b00d8.json`` adds ``type_<name>``, how often the probe *names* each type); the
figures are quoted in docs/model-card.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from service.demo.data import defect_patch, normalise, pixel_tensor  # noqa: E402
from service.model.base import load_base  # noqa: E402
from service.world import DEFECT_TYPES, GRID_CELLS, generate_examples  # noqa: E402

log = logging.getLogger("bench.defect_probe")
DEMO_BASE = Path(__file__).resolve().parents[1] / "service" / "assets" / "demo-base"
DATA_SEED = 7000
N_CLASSES = 1 + len(DEFECT_TYPES)  # "none" + each defect type


class Probe(nn.Module):
    """Two learned queries attention-pool the tokens ``[B, N, d]``: → type logits ``[B, 6]``, cell ``[B, 9]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.queries = nn.Parameter(torch.randn(2, dim) * dim**-0.5)
        self.type_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, N_CLASSES))
        self.cell_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, len(GRID_CELLS)))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(tokens)
        weights = torch.einsum("bnd,qd->bqn", self.key(h), self.queries).div(math.sqrt(h.shape[-1])).softmax(-1)
        pooled = torch.einsum("bqn,bnd->bqd", weights, h)
        return self.type_head(pooled[:, 0]), self.cell_head(pooled[:, 1])


def scores(type_logits: torch.Tensor, cell_logits: torch.Tensor | None, labels: torch.Tensor) -> dict[str, float]:
    """Presence, type (incl. none), location on defective images, tiny / large, per-type recall and
    per-type type accuracy (``type_<name>``: the probe names that type)."""
    pred = type_logits.argmax(-1)
    defective = labels[:, 0] > 0
    tiny = defective & (labels[:, 2] == 1)
    large = defective & (labels[:, 2] == 0)
    out = {
        "presence": ((pred > 0) == defective).float().mean().item(),
        "type": (pred == labels[:, 0]).float().mean().item(),
        "tiny_recall": (pred > 0)[tiny].float().mean().item(),
        "large_recall": (pred > 0)[large].float().mean().item(),
        "ok_specificity": (pred == 0)[~defective].float().mean().item(),
    }
    # Recall per defect type: which defects the features carry (an adapter cannot read the others).
    for k, name in enumerate(DEFECT_TYPES, start=1):
        of_type = labels[:, 0] == k
        if of_type.any():
            out[f"recall_{name}"] = (pred > 0)[of_type].float().mean().item()
            out[f"type_{name}"] = (pred == k)[of_type].float().mean().item()
    if cell_logits is not None:
        out["location"] = (cell_logits.argmax(-1)[defective] == labels[defective, 1]).float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def train_probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    probe = Probe(x.shape[-1])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(n_train, (128,), generator=gen)
        type_logits, cell_logits = probe(x[idx])
        loss = F.cross_entropy(type_logits, y[idx, 0]) + F.cross_entropy(cell_logits, y[idx, 1], ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_out = scores(*probe(x[n_train:]), y[n_train:])
        held_out["train_presence"] = scores(*probe(x[: min(n_train, 500)]), y[: min(n_train, 500)])["presence"]
    return held_out


def token_index_location(x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor, n_train: int, steps: int,
                         seed: int) -> dict[str, float]:
    """Where a per-token defect scorer fires, as a cell: location on held-out defective images.

    ``x`` ``[N, H*W, d]`` frozen tokens; ``patch`` ``[N]`` the defect's patch (-1 = none). The scorer
    (a small MLP on each token, trained on dense labels) knows nothing of position; the cell comes
    from the index of its top token, so this is what the tokens tell about location to a reader that
    knows each token's place.
    """
    grid = math.isqrt(x.shape[1])
    torch.manual_seed(seed)
    scorer = nn.Sequential(nn.LayerNorm(x.shape[-1]), nn.Linear(x.shape[-1], 128), nn.GELU(), nn.Linear(128, 1))
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    defective = patch >= 0
    target = torch.zeros(x.shape[:2])
    target[defective.nonzero()[:, 0], patch[defective]] = 1.0
    for _ in range(steps):
        idx = torch.randint(n_train, (128,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(scorer(x[idx]).squeeze(-1), target[idx],
                                                  pos_weight=torch.tensor(x.shape[1] / 4))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        top = scorer(x[n_train:]).squeeze(-1).argmax(-1)
    rows, cols = top // grid, top % grid
    cell = (rows * 3 // grid) * 3 + cols * 3 // grid
    held_out, labels = defective[n_train:], y[n_train:]
    right = cell == labels[:, 1]
    out = {"location_by_index": right[held_out].float().mean().item()}
    for k, name in enumerate(DEFECT_TYPES, start=1):
        of_type = labels[:, 0] == k
        if of_type.any():
            out[f"location_by_index_{name}"] = right[of_type].float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def finetune_tower(base, pixels: torch.Tensor, y: torch.Tensor, patch: torch.Tensor, n_train: int, steps: int,
                   dense: bool, seed: int) -> dict[str, Any]:
    """Train the tower (copy) + a per-patch head on defect labels; score image-level calls held out."""
    tower = base.model.model.vision_tower
    original = {k: v.clone() for k, v in tower.state_dict().items()}
    torch.manual_seed(seed)
    dim = tower.config.hidden_size
    head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, N_CLASSES))
    tower.requires_grad_(True)
    tower.train()
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    mean, std = base.image_processor.image_mean, base.image_processor.image_std
    anchor = base.vce_config.feature_layers[0]

    def patch_logits(p: torch.Tensor) -> torch.Tensor:
        return head(tower(normalise(p, mean, std), output_hidden_states=True).hidden_states[anchor][:, 1:])

    def image_logits(t: torch.Tensor) -> torch.Tensor:
        # "none" only if every patch says none; otherwise the most confident defect type anywhere
        probs = t.softmax(-1)
        return torch.cat([probs[..., :1].amin(1), probs[..., 1:].amax(1)], -1).clamp_min(1e-9).log()

    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(n_train, (64,), generator=gen)
        logits = patch_logits(pixels[idx])
        if dense:
            target = torch.zeros(logits.shape[:2], dtype=torch.long)
            has = patch[idx] >= 0
            target[has, patch[idx][has]] = y[idx, 0][has]
            weight = torch.where(target > 0, 20.0, 1.0)  # one defect patch among 64
            loss = (F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none") * weight.flatten()).sum()
            loss = loss / weight.sum()
        else:
            loss = F.cross_entropy(logits.amax(1), y[idx, 0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            log.info("  %s step %d/%d loss %.3f (%.0fs)", "dense" if dense else "image", step + 1, steps, loss.item(),
                     time.perf_counter() - start)
    tower.eval()
    with torch.no_grad():
        logits = torch.cat([patch_logits(pixels[i : i + 200]) for i in range(n_train, len(pixels), 200)])
    result = scores(image_logits(logits), None, y[n_train:])
    result["seconds"] = round(time.perf_counter() - start, 1)
    tower.load_state_dict(original)
    tower.requires_grad_(False)
    return result


def fresh_tower_by_patch(patch_size: int, n_train: int, n_held_out: int, steps: int, seed: int,
                         batch_size: int = 32, lr: float = 1e-3) -> dict[str, Any]:
    """Train a fresh demo-sized tower with ``patch_size`` on dense defect labels; held-out presence."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from service.demo.data import DEMO_PRESET, build_defect_pool

    size = DEMO_PRESET.image_size
    pool = build_defect_pool(n_train + n_held_out, DATA_SEED + 1, patch_size=patch_size, size=size)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=DEMO_PRESET.vision_dim, intermediate_size=4 * DEMO_PRESET.vision_dim,
                              num_hidden_layers=DEMO_PRESET.vision_layers, num_attention_heads=DEMO_PRESET.vision_heads,
                              image_size=size, patch_size=patch_size, hidden_act="quick_gelu")
    tower = CLIPVisionModel(config)
    dim = config.hidden_size
    from service.demo.train_base import DefectHead

    head = DefectHead(dim)  # the recipe's head with its default loss (defect patch weighted HW / 4)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    mean, std = [0.5] * 3, [0.25] * 3

    def patch_logits(p: torch.Tensor) -> torch.Tensor:
        return head(tower(normalise(p, mean, std), output_hidden_states=True).hidden_states[-2][:, 1:])

    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(n_train, (batch_size,), generator=gen)
        loss = head.loss(patch_logits(pool.pixels[idx]), pool.defect[idx], pool.patch[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            log.info("  patch %d step %d/%d loss %.3f (%.0fs)", patch_size, step + 1, steps, loss.item(),
                     time.perf_counter() - start)
    seconds = time.perf_counter() - start
    tower.eval()
    with torch.no_grad():
        logits = torch.cat([patch_logits(pool.pixels[i : i + 200]) for i in range(n_train, len(pool), 200)])
    called, truth = head.image_presence(logits), pool.defect[n_train:] > 0
    return {
        "tokens": (size // patch_size) ** 2,
        "presence": round((called == truth).float().mean().item(), 4),
        "recall": round(called[truth].float().mean().item(), 4),
        "specificity": round((~called[~truth]).float().mean().item(), 4),
        "chance": round(max(truth.float().mean().item(), 1 - truth.float().mean().item()), 4),
        "train_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEMO_BASE)
    parser.add_argument("--n", type=int, default=3000, help="inspection images (80 %% train, 20 %% held out)")
    parser.add_argument("--probe-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--parts", nargs="+", default=["probe", "finetune"], choices=["probe", "finetune", "patch"])
    parser.add_argument("--patch-sizes", nargs="+", type=int, default=[12, 8, 6])
    parser.add_argument("--patch-steps", type=int, default=300)
    parser.add_argument("--patch-n", type=int, default=6000, help="training images of the patch part (+800 held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/defect_probe.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if args.parts == ["patch"]:
        results = {"steps": args.patch_steps, "batch": 32, "n_train": args.patch_n, "n_held_out": 800,
                   "machine": {"platform": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads()}}
        for patch_size in args.patch_sizes:
            results[f"patch {patch_size}"] = fresh_tower_by_patch(patch_size, args.patch_n, 800, args.patch_steps,
                                                                  args.seed)
            log.info("patch %d: %s", patch_size, results[f"patch {patch_size}"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        return results
    if "patch" in args.parts:
        parser.error("--parts patch runs alone (its own --out)")
    base = load_base(args.base, n_slots=0)
    size = base.model.config.vision_config.image_size
    grid = size // base.model.config.vision_config.patch_size
    examples = generate_examples(args.n, DATA_SEED, kind="inspection", size=size)
    pixels = pixel_tensor(examples)
    labels, patch = [], []
    for _, record in examples:
        meta = record["meta"]
        defect = meta["scene"]["defect"]
        if defect is None:
            labels.append((0, -1, 0))
            patch.append(-1)
        else:
            labels.append((1 + DEFECT_TYPES.index(meta["defect"]), GRID_CELLS.index(meta["defect_location"]),
                           int(meta["size_class"] == "tiny")))
            patch.append(defect_patch(defect, grid))
    y, patch_t = torch.tensor(labels), torch.tensor(patch)
    n_train = int(0.8 * args.n)
    results: dict[str, Any] = {
        "n": args.n, "n_train": n_train, "data_seed": DATA_SEED, "base": str(args.base),
        "defective_share_held_out": round((y[n_train:, 0] > 0).float().mean().item(), 4),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if "probe" in args.parts:
        tower = base.model.model.vision_tower
        mean, std = base.image_processor.image_mean, base.image_processor.image_std
        hidden: list[list[torch.Tensor]] = [[] for _ in range(tower.config.num_hidden_layers + 1)]
        projected = []
        with torch.no_grad():
            for i in range(0, args.n, 200):
                p = normalise(pixels[i : i + 200], mean, std)
                states = tower(p, output_hidden_states=True).hidden_states
                for k, h in enumerate(states):
                    hidden[k].append(h[:, 1:])
                projected.append(base.encode_images(p))
        features = {f"tower hidden state {k}": torch.cat(h) for k, h in enumerate(hidden)}
        features["projector output (VCE + MLP)"] = torch.cat(projected)
        results["probe"] = {}
        for name, x in features.items():
            results["probe"][name] = train_probe(x, y, n_train, args.probe_steps, args.seed)
            results["probe"][name].update(token_index_location(x, y, patch_t, n_train, args.probe_steps, args.seed))
            log.info("%s: %s", name, results["probe"][name])
    if "finetune" in args.parts:
        results["finetune"] = {"steps": args.finetune_steps}
        for dense in (False, True):
            key = "dense labels" if dense else "image labels"
            results["finetune"][key] = finetune_tower(base, pixels, y, patch_t, n_train, args.finetune_steps, dense,
                                                      args.seed)
            log.info("tower fine-tune, %s: %s", key, results["finetune"][key])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
