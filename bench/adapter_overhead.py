"""Adapter overhead of the slot layers, measured side by side in one run.

On a random LLaVA whose LLM has a realistic width (preset ``bench``: 8 layers, d=1024, 16 heads),
time one prefill and one decode step at batch 8 for:

* base (every row on slot 0);
* one LoRA adapter on every row; one Dual-LoRA adapter (same rank) on every row;
* 8 rows on 8 different Dual-LoRA adapters (and on 8 different LoRA adapters);
* PEFT's own mixed-batch forward (``adapter_names``) over 8 LoRA adapters, and PEFT's base.

Configurations are timed round-robin in a rotating order (so machine noise hits them alike) and the median of
``--repeats`` runs is reported, as a ratio to the base measured in the same run.

    python bench/adapter_overhead.py [--rank 16] [--prompt-len 64] [--repeats 7] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from service.model.base import load_base  # noqa: E402
from service.model.lora import AdapterConfig, adapter_batch  # noqa: E402
from service.model.presets import build_random_base  # noqa: E402

N_ADAPTERS = 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_adapter(base, peft_type: str, rank: int, seed: int):
    config = AdapterConfig(peft_type=peft_type, r=rank, lora_alpha=2 * rank)
    adapter = base.slots.new_adapter(config, seed=seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return adapter


class Case:
    """A named forward configuration: prefill and decode callables built on shared inputs."""

    def __init__(self, name, prefill, decode):
        self.name, self.prefill, self.decode = name, prefill, decode
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}


def ours_case(name, model, ids, mask, slots):
    state = {}

    def prefill():
        with adapter_batch(slots):
            state["out"] = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    prefill()  # a cache for the decode step
    cache = state["out"].cache
    step_ids = ids[:, -1:]
    step_mask = torch.cat([mask, mask[:, -1:]], dim=1)

    def decode():
        with adapter_batch(slots):
            model(input_ids=step_ids, attention_mask=step_mask, cache=cache, use_cache=True)
        cache.crop(-1)  # drop the step just appended

    return Case(name, prefill, decode)


def peft_case(name, model, ids, mask, adapter_names):
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)
    cache = out.cache
    step_ids = ids[:, -1:]
    step_mask = torch.cat([mask, mask[:, -1:]], dim=1)

    def prefill():
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)

    def decode():
        model(input_ids=step_ids, attention_mask=step_mask, cache=cache, use_cache=True, **kwargs)
        cache.crop(-1)  # drop the step just appended

    return Case(name, prefill, decode)


def build_peft(base_dir: Path, rank: int, dtype, device, seed: int):
    import peft
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], exclude_modules=r".*vision_tower.*")
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    model = peft.get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    return model.eval(), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    args = parser.parse_args()

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.ERROR)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        base_dir = build_random_base(Path(tmp) / "base", "bench", seed=0)
        base = load_base(base_dir, device=device, dtype=dtype, n_slots=2 * N_ADAPTERS, max_rank=args.rank)
        duals = [random_adapter(base, "DUAL_LORA", args.rank, seed=i) for i in range(N_ADAPTERS)]
        loras = [random_adapter(base, "LORA", args.rank, seed=100 + i) for i in range(N_ADAPTERS)]
        for i, adapter in enumerate(duals):
            base.slots.load(1 + i, adapter)
        for i, adapter in enumerate(loras):
            base.slots.load(1 + N_ADAPTERS + i, adapter)

        vocab = base.model.config.text_config.vocab_size
        ids = torch.randint(5, vocab, (args.batch, args.prompt_len), device=device)
        mask = torch.ones_like(ids)
        b = args.batch
        lora_slot, dual_slot = 1 + N_ADAPTERS, 1
        different_duals = [1 + (i % N_ADAPTERS) for i in range(b)]
        different_loras = [1 + N_ADAPTERS + (i % N_ADAPTERS) for i in range(b)]
        model = base.model
        with torch.inference_mode():
            cases = [
                ours_case("base", model, ids, mask, [0] * b),
                ours_case("1 LoRA", model, ids, mask, [lora_slot] * b),
                ours_case("1 Dual-LoRA", model, ids, mask, [dual_slot] * b),
                ours_case(f"{N_ADAPTERS} different LoRA", model, ids, mask, different_loras),
                ours_case(f"{N_ADAPTERS} different Dual-LoRA", model, ids, mask, different_duals),
            ]
            if not args.no_peft:
                peft_model, names = build_peft(base_dir, args.rank, dtype, device, seed=1)
                with peft_model.disable_adapter():
                    pass
                cases += [
                    peft_case("PEFT base (adapters disabled)", peft_model, ids, mask, ["__base__"] * b),
                    peft_case("PEFT 1 LoRA", peft_model, ids, mask, [names[0]] * b),
                    peft_case(f"PEFT {N_ADAPTERS} different LoRA (adapter_names)", peft_model, ids, mask,
                              [names[i % N_ADAPTERS] for i in range(b)]),
                ]
            for case in cases:  # warm-up
                case.prefill()
                case.decode()
            for rep in range(args.repeats):
                # Rotate the order every round: the first big forward after a phase change pays for
                # page faults in the allocator, and rotation spreads that cost over all cases.
                order = cases[rep % len(cases) :] + cases[: rep % len(cases)]
                for phase in ("prefill", "decode"):
                    for case in order:
                        fn = getattr(case, phase)
                        sync(device)
                        t = time.perf_counter()
                        fn()
                        sync(device)
                        case.times[phase].append(time.perf_counter() - t)

    med = {c.name: {p: statistics.median(t) for p, t in c.times.items()} for c in cases}
    ref = med["base"]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    print(f"# adapter overhead: batch {args.batch}, prompt {args.prompt_len}, rank {args.rank}, {dtype}, {machine}, "
          f"torch {torch.__version__}, median of {args.repeats}\n")
    print("| configuration | prefill ms | prefill / base | decode ms | decode / base |")
    print("|---|---:|---:|---:|---:|")
    for c in cases:
        m = med[c.name]
        print(f"| {c.name} | {m['prefill'] * 1e3:.1f} | {m['prefill'] / ref['prefill']:.3f} | "
              f"{m['decode'] * 1e3:.2f} | {m['decode'] / ref['decode']:.3f} |")
    one_lora, one_dual = med["1 LoRA"], med["1 Dual-LoRA"]
    many_dual = med[f"{N_ADAPTERS} different Dual-LoRA"]
    print()
    for phase in ("prefill", "decode"):
        line = (f"{phase}: Dual-LoRA / LoRA = {one_dual[phase] / one_lora[phase]:.3f} (target <= 1.10); "
                f"{N_ADAPTERS} different / 1 Dual-LoRA = {many_dual[phase] / one_dual[phase]:.3f} (target <= 1.10)")
        if not args.no_peft:
            peft_mixed = med[f"PEFT {N_ADAPTERS} different LoRA (adapter_names)"]
            ours_mixed = med[f"{N_ADAPTERS} different LoRA"]
            line += f"; PEFT mixed / ours mixed LoRA = {peft_mixed[phase] / ours_mixed[phase]:.2f}"
        print(line)


if __name__ == "__main__":
    main()
