"""Batched generation: rows with different adapters and settings equal each row run alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import service.model.generate as generate_module
from service.model.generate import (
    GenerationRequest,
    ImageFeatureCache,
    PromptTooLongError,
    RunningBatch,
    embed_prompts,
    encode_prompt,
    generate,
)
from service.model.lora import AdapterConfig, adapter_batch
from tests.helpers import bias_eos


def load_random_adapters(base):
    """Slots 1, 2: Dual-LoRA; slot 3: LoRA — with large enough B to change the answers."""
    for slot, (peft_type, seed) in {1: ("DUAL_LORA", 1), 2: ("DUAL_LORA", 2), 3: ("LORA", 3)}.items():
        config = AdapterConfig(peft_type=peft_type, r=8 if slot != 2 else 4, lora_alpha=16)
        adapter = base.slots.new_adapter(config, seed=seed)
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
        base.slots.load(slot, adapter)


def images():
    return [
        Image.new("RGB", (40, 40), (200, 10, 10)),
        Image.new("RGB", (64, 32), (10, 200, 10)),
        Image.radial_gradient("L").convert("RGB"),
    ]


def test_mixed_batch_logits_equal_each_row_alone(tiny_base):
    load_random_adapters(tiny_base)
    ims = images()
    rows = [encode_prompt(tiny_base, "What colour is it?", 1) for _ in range(4)]
    feats = [[f] for f in tiny_base.encode_images(tiny_base.preprocess_images(ims[:1] * 4))]
    embeds, mask = embed_prompts(tiny_base, rows, feats)
    slots = [0, 1, 2, 3]
    with torch.no_grad(), adapter_batch(slots):
        mixed = tiny_base.model(inputs_embeds=embeds, attention_mask=mask).logits
    outputs = []
    for i, slot in enumerate(slots):
        with torch.no_grad(), adapter_batch([slot]):
            alone = tiny_base.model(inputs_embeds=embeds[i : i + 1], attention_mask=mask[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        outputs.append(alone)
    # Every adapter changes the output, and differently.
    for i in range(1, 4):
        assert not torch.allclose(outputs[0], outputs[i], atol=1e-3)
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-3)


def test_batched_generation_equals_each_request_alone(tiny_base):
    load_random_adapters(tiny_base)
    ims = images()
    requests = [
        GenerationRequest("What colour is the part?", [ims[0]], slot=0, max_new_tokens=6),
        GenerationRequest("Where is it?", [ims[1], ims[2]], slot=1, max_new_tokens=4),
        GenerationRequest("Describe", [], slot=2, max_new_tokens=8),
        GenerationRequest("How many parts are there in this picture?", [ims[2]], slot=3, max_new_tokens=5),
        GenerationRequest("What colour is the part?", [ims[0]], slot=1, max_new_tokens=3, temperature=0.8, seed=7),
    ]
    batched = generate(tiny_base, requests)
    for req, got in zip(requests, batched, strict=True):
        alone = generate(tiny_base, [req])[0]
        assert got.token_ids == alone.token_ids
        assert got.prompt_tokens == len(encode_prompt(tiny_base, req.instruction, len(req.images)))
        assert len(got.token_ids) <= req.max_new_tokens
    assert batched[0].token_ids != generate(tiny_base, [GenerationRequest(**{**requests[0].__dict__, "slot": 1})])[0].token_ids


def test_sampling_is_reproducible_with_a_seed(tiny_base):
    im = images()[0]
    req = GenerationRequest("What colour?", [im], max_new_tokens=12, temperature=1.5, seed=3)
    a, b = generate(tiny_base, [req])[0], generate(tiny_base, [req])[0]
    c = generate(tiny_base, [GenerationRequest("What colour?", [im], max_new_tokens=12, temperature=1.5, seed=4)])[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_generation_stops_at_eos(tiny_base):
    bias_eos(tiny_base, 1e4)
    out = generate(tiny_base, [GenerationRequest("hi", [], max_new_tokens=10)])[0]
    assert out.finish_reason == "stop" and out.token_ids == [] and out.completion_tokens == 1


def test_prompt_longer_than_the_context_is_refused(tiny_base):
    with pytest.raises(PromptTooLongError):
        generate(tiny_base, [GenerationRequest("word " * 300, [], max_new_tokens=4)])
    with pytest.raises(PromptTooLongError):
        generate(tiny_base, [GenerationRequest("hi", [], max_new_tokens=tiny_base.max_context)])


def test_image_token_in_the_instruction_is_refused(tiny_base):
    with pytest.raises(ValueError, match="image token"):
        generate(tiny_base, [GenerationRequest("look <image>", [images()[0]], max_new_tokens=2)])


def test_image_features_are_computed_once_per_distinct_image(tiny_base):
    cache = ImageFeatureCache(capacity=8)
    im = images()[0]
    same_pixels = Image.new("RGB", (40, 40), (200, 10, 10))
    reqs = [GenerationRequest("a", [im], max_new_tokens=2), GenerationRequest("b", [same_pixels], max_new_tokens=2)]
    first = generate(tiny_base, reqs, cache=cache)
    assert cache.misses == 1 and cache.hits == 0
    second = generate(tiny_base, reqs, cache=cache)
    assert cache.hits == 1
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


def test_finished_rows_leave_the_batch(tiny_base, monkeypatch):
    """Decode steps after a row finishes run without it, and without the padding only it needed."""
    bias_eos(tiny_base, -1e4)  # every row runs to its max_new_tokens
    load_random_adapters(tiny_base)
    ims = images()
    requests = [
        GenerationRequest("What colour is the part?", [ims[0], ims[1]], slot=1, max_new_tokens=2),
        GenerationRequest("Describe", [], slot=2, max_new_tokens=0),
        GenerationRequest("Describe it", [], slot=3, max_new_tokens=5),
    ]
    masks: list[tuple[int, int]] = []
    forward = generate_module._forward

    def recording_forward(*args, **inputs):
        masks.append(tuple(inputs["attention_mask"].shape))
        return forward(*args, **inputs)

    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "_forward", recording_forward)
        batched = generate(tiny_base, requests)
    assert [len(r.token_ids) for r in batched] == [2, 0, 5]
    for req, got in zip(requests, batched, strict=True):
        assert got.token_ids == generate(tiny_base, [req])[0].token_ids
    image_row, text_row = batched[0].prompt_tokens, batched[2].prompt_tokens
    assert image_row > text_row + 1
    # Prefill: all three rows, padded to the image row. Step 1: rows 0 and 2. Steps 2-4: row 2
    # alone, its mask no wider than its own prompt and answer so far.
    assert masks == [(3, image_row), (2, image_row + 1)] + [(1, text_row + k) for k in range(2, 5)]


@pytest.mark.parametrize("first_wide", [True, False], ids=["joiners-narrower", "joiners-wider"])
def test_rows_that_join_a_running_batch_equal_each_request_alone(tiny_base, first_wide):
    """Continuous batching: rows prefilled later and merged between decode steps (the caches
    left-padded to one width, whichever side is narrower) decode exactly as they would alone."""
    bias_eos(tiny_base, -1e4)  # every row runs to its max_new_tokens
    load_random_adapters(tiny_base)
    ims = images()
    wide = [GenerationRequest("What colour is the part?", [ims[0], ims[1]], slot=1, max_new_tokens=6),
            GenerationRequest("Describe", [], slot=0, max_new_tokens=3)]
    narrow = [GenerationRequest("Describe it", [], slot=3, max_new_tokens=4),
              GenerationRequest("Where?", [], slot=2, max_new_tokens=5, temperature=0.9, seed=5)]
    first, joiners = (wide, narrow) if first_wide else (narrow, wide)
    batch = RunningBatch.prefill(tiny_base, first, keys=["f0", "f1"])
    got = dict(batch.step())
    assert not got and len(batch) == 2
    batch.merge(RunningBatch.prefill(tiny_base, joiners, keys=["j0", "j1"]))
    assert len(batch) == 4
    while batch:
        got.update(batch.step())
    assert set(got) == {"f0", "f1", "j0", "j1"}
    for key, req in zip(["f0", "f1", "j0", "j1"], first + joiners, strict=True):
        alone = generate(tiny_base, [req])[0]
        assert got[key].token_ids == alone.token_ids and len(alone.token_ids) == req.max_new_tokens
        assert got[key].timing.batch_size == 4


def test_finished_rows_are_returned_at_the_step_they_finish(tiny_base):
    bias_eos(tiny_base, -1e4)
    batch = RunningBatch.prefill(tiny_base, [GenerationRequest("a", [], max_new_tokens=1),
                                             GenerationRequest("b", [], max_new_tokens=3)])
    assert [key for key, _ in batch.step()] == [0]
    assert len(batch) == 1 and batch.step() == []
    (key, result), = batch.step()
    assert key == 1 and len(result.token_ids) == 3 and not batch
    assert result.timing.decode_ms > 0 and result.timing.prefill_ms > 0


def test_a_checked_request_is_not_tokenised_or_hashed_again(tiny_base, monkeypatch):
    """``check_request`` (the engine runs it on the submitting thread) fills in the prompt's ids and
    the images' hashes; the prefill on the model's thread uses them instead of computing them again."""
    import service.model.generate as generation
    from service.model.generate import check_request, image_key
    from service.model.prefix_cache import PrefixCache

    ims = images()
    requests = [GenerationRequest("What colour?", [ims[0]], max_new_tokens=3, prefix_scope="base"),
                GenerationRequest("Describe it.", [ims[1], ims[2]], max_new_tokens=3, prefix_scope="base"),
                GenerationRequest("hi", [], max_new_tokens=3)]
    want = [r.token_ids for r in generate(tiny_base, requests)]
    for request in requests:
        assert check_request(tiny_base, request) == len(request.prompt_ids)
        assert request.prompt_ids == encode_prompt(tiny_base, request.instruction, len(request.images))
        assert request.image_keys == [image_key(im) for im in request.images]

    def recomputed(*args, **kwargs):
        raise AssertionError("computed again on the model's thread")

    monkeypatch.setattr(generation, "encode_prompt", recomputed)
    monkeypatch.setattr(generation, "image_key", recomputed)
    prefixes = PrefixCache(64 * 2**20)
    for _ in range(2):  # the prefixes missed, then hit
        assert [r.token_ids for r in generate(tiny_base, requests, prefixes=prefixes)] == want
    assert prefixes.hits == 2


JOINS = {
    # (running rows, decode steps before the join, how many of the newcomers join):
    # running rows wider than the joiners' prefixes (one with two images) / text only, with only
    # prefix hits joining (the cache is widened for them) / done at the join step (the joiners
    # run alone)
    "running-wider": ([("Where is it?", 2, 1, 6), ("Describe", 0, 0, 6)], 2, 4),
    "running-narrower": ([("Describe it", 0, 3, 5), ("Where?", 0, 2, 6)], 1, 2),
    "running-done": ([("Describe it", 0, 3, 1), ("What colour?", 1, 0, 1)], 0, 4),
}


@pytest.mark.parametrize("case", list(JOINS))
def test_rows_joining_over_cached_prefixes_equal_each_request_alone(tiny_base, case):
    """Newcomers whose image prefixes are cached run their prompts' rest in the running rows' next
    decode pass (one forward pass for both); a newcomer without a cached prefix is prefilled
    and merged as before. Every row decodes exactly as it would alone."""
    from service.model.prefix_cache import PrefixCache

    bias_eos(tiny_base, -1e4)
    load_random_adapters(tiny_base)
    ims = images()
    first_spec, steps, n_joining = JOINS[case]
    first = [GenerationRequest(text, ims[:n], slot=slot, max_new_tokens=m, prefix_scope=f"slot-{slot}")
             for text, n, slot, m in first_spec]
    joiners = [GenerationRequest("What colour is the part?", [ims[0], ims[1]], slot=1, max_new_tokens=5, prefix_scope="slot-1"),
               GenerationRequest("Colour?", [ims[2]], slot=0, max_new_tokens=3, prefix_scope="slot-0"),
               GenerationRequest("How many?", [ims[1]], slot=2, max_new_tokens=4, prefix_scope="slot-2"),  # missed
               GenerationRequest("Hi", [], slot=3, max_new_tokens=2, prefix_scope="slot-3")][:n_joining]  # no image
    keys = ["f0", "f1", "j0", "j1", "j2", "j3"][: 2 + n_joining]
    prefixes = PrefixCache()
    generate(tiny_base, joiners[:2], prefixes=prefixes)  # their prefixes are cached now
    batch = RunningBatch.prefill(tiny_base, first, keys=["f0", "f1"], prefixes=prefixes)
    got = {}
    for _ in range(steps):
        got.update(batch.step())
    width = batch.mask.shape[1]
    batch.add(joiners, keys=keys[2:], prefixes=prefixes)
    assert [j.row.key for j in batch.joining] == ["j0", "j1"] and len(batch) == len(keys)
    assert sorted(batch.keys) == keys
    if case == "running-narrower":
        assert width < max(j.entry.length for j in batch.joining)
    while batch:
        got.update(batch.step())
    assert set(got) == set(keys)
    for key, req in zip(keys, first + joiners, strict=True):
        alone = generate(tiny_base, [GenerationRequest(req.instruction, req.images, slot=req.slot,
                                                       max_new_tokens=req.max_new_tokens)])[0]
        assert got[key].token_ids == alone.token_ids and len(alone.token_ids) == req.max_new_tokens, key
        assert got[key].prompt_tokens == alone.prompt_tokens
    assert got["j0"].timing.prefill_ms > 0 and got["j0"].timing.batch_size >= 4


def test_rows_joining_over_cached_prefixes_do_not_copy_the_running_rows(tiny_base):
    """The point of joining in the decode pass: once the cache has spare rows and room, the running
    rows' keys and values stay where they are when newcomers join."""
    from service.model.prefix_cache import PrefixCache

    bias_eos(tiny_base, -1e4)
    ims = images()
    ask = [GenerationRequest(q, [im], max_new_tokens=8, prefix_scope="base") for q in ("Colour?", "Where?") for im in ims]
    prefixes = PrefixCache()
    generate(tiny_base, ask, prefixes=prefixes)
    batch = RunningBatch.prefill(tiny_base, ask[:2], prefixes=prefixes)
    batch.add(ask[2:3], keys=[2], prefixes=prefixes)
    batch.step()  # the first join makes a buffer with spare rows
    buffers = [layer._buffers["keys"].data_ptr() for layer in batch.cache.layers]
    for i in (3, 4):
        batch.add(ask[i : i + 1], keys=[i], prefixes=prefixes)
        batch.step()
        assert [layer._buffers["keys"].data_ptr() for layer in batch.cache.layers] == buffers
    assert len(batch.rows) == 5


def test_last_only_logits_equal_the_last_position_with_one_plain_matmul(tiny_base):
    """``_forward(last_only=True)`` gives the full pass's last-position logits, and its LM head runs
    as one matmul (transformers' ``logits_to_keep=1`` slice made it a batched matmul against one
    copy of the head's weight per row)."""
    from torch.profiler import profile

    from service.model.generate import _forward

    ids = torch.randint(5, tiny_base.model.config.text_config.vocab_size, (3, 6))
    mask = torch.ones_like(ids)
    slots = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        full = _forward(tiny_base, slots, None, input_ids=ids, attention_mask=mask).logits
        with profile() as prof:
            last = _forward(tiny_base, slots, None, last_only=True, input_ids=ids, attention_mask=mask).logits
    assert last.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    assert not [e for e in prof.events() if e.name == "aten::bmm"]  # (no adapter, SDPA attention: only a head would)


def test_image_keys_given_by_the_caller_are_kept_and_checked(tiny_base, monkeypatch):
    """A caller that names its images (the HTTP layer hashes the uploaded bytes) saves the pixel
    hash; the keys then name the images in the caches, and their count must match."""
    import service.model.generate as generation
    from service.model.generate import check_request

    def hashed(*args, **kwargs):
        raise AssertionError("the pixels were hashed")

    monkeypatch.setattr(generation, "image_key", hashed)
    ims = images()
    named = GenerationRequest("What colour?", [ims[0], ims[1]], max_new_tokens=3, image_keys=["bytes:a", "bytes:b"])
    check_request(tiny_base, named)
    assert named.image_keys == ["bytes:a", "bytes:b"]
    cache = ImageFeatureCache()
    generate(tiny_base, [named], cache=cache)
    assert cache.get("bytes:a") is not None and cache.get("bytes:b") is not None
    with pytest.raises(ValueError, match="2 image keys for 1 images"):
        check_request(tiny_base, GenerationRequest("x", [ims[0]], image_keys=["bytes:a", "bytes:b"]))


def test_prompts_are_tokenised_once_per_instruction_and_image_count(tiny_base, monkeypatch):
    first = encode_prompt(tiny_base, "What colour is it?", 1)
    two_images = encode_prompt(tiny_base, "What colour is it?", 2)
    assert two_images.count(tiny_base.image_token_id) == 2 * tiny_base.tokens_per_image

    def tokenised_again(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(tiny_base, "tokenizer", tokenised_again)
    again = encode_prompt(tiny_base, "What colour is it?", 1)
    assert again == first and again is not first
    again.append(0)  # a caller's copy: the cached prompt is untouched
    assert encode_prompt(tiny_base, "What colour is it?", 1) == first
    assert encode_prompt(tiny_base, "What colour is it?", 2) == two_images
    with pytest.raises(AssertionError, match="tokenised again"):
        encode_prompt(tiny_base, "Where is it?", 1)


def test_a_refused_instruction_is_refused_again_not_cached(tiny_base):
    image_token = tiny_base.image_token
    for _ in range(2):
        with pytest.raises(ValueError, match="image token"):
            encode_prompt(tiny_base, f"What is {image_token} this?", 1)
    assert len(tiny_base.prompt_ids) == 0
