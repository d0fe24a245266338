"""The image-prefix KV cache: a prompt run over its cached prefix equals the whole prompt run alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.cache_utils import Cache

from service.model.generate import GenerationRequest, RunningBatch, encode_prompt, generate
from service.model.kv_cache import ReservedLayer
from service.model.lora import AdapterConfig
from service.model.prefix_cache import (
    PrefixCache,
    PrefixEntry,
    append_prefixes,
    prefix_key,
    prefix_length,
    prefix_rows,
)
from tests.model.test_generate import images, load_random_adapters


@pytest.mark.parametrize(
    ("ids", "expected"),
    [([1, 2, 3], 0), ([1, 9, 9, 4], 3), ([9, 5], 1), ([1, 9, 2, 9, 9, 7, 8], 5), ([], 0)],
)
def test_prefix_ends_at_the_last_image_token(ids, expected):
    assert prefix_length(ids, image_token_id=9) == expected


def test_prefix_key_depends_on_scope_tokens_and_images():
    key = prefix_key("base", [1, 9, 9], ["img-a"])
    assert key == prefix_key("base", [1, 9, 9], ["img-a"])
    assert len({key, prefix_key("load-1", [1, 9, 9], ["img-a"]), prefix_key("base", [1, 9, 9], ["img-b"]),
                prefix_key("base", [2, 9, 9], ["img-a"]), prefix_key("base", [1, 9, 9], ["img-a", "img-a"])}) == 5


def entry(n_positions: int, value: float = 0.0) -> PrefixEntry:
    """A 2-layer entry of ``n_positions`` float32 positions: 2 layers x (k, v) x 4 x n x 8 x 4 bytes."""
    return PrefixEntry(torch.full((2, 2, 4, n_positions, 8), value))


def test_lru_is_bounded_in_bytes():
    one = entry(10).nbytes
    assert one == 2 * 2 * 4 * 10 * 8 * 4
    cache = PrefixCache(capacity_bytes=3 * one)
    for name in "abc":
        cache.put(name, entry(10))
    assert cache.get("a") is not None  # a is now the most recent; b the least
    cache.put("d", entry(10))
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    assert len(cache) == 3 and cache.nbytes == 3 * one
    cache.put("a", entry(5))  # replacing an entry gives back its bytes
    assert cache.nbytes == 2 * one + entry(5).nbytes
    cache.put("huge", entry(40))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (3, 2)


def random_entry(n_positions: int, seed: int) -> PrefixEntry:
    return PrefixEntry(torch.randn(2, 2, 4, n_positions, 8, generator=torch.Generator().manual_seed(seed)))


def test_prefixes_appended_to_a_cache_equal_the_stacked_prefixes():
    """What a join pass writes for its newcomers: each prefix right-aligned to the cache's length,
    zeros on its left padding, below the rows already there, which stay as they were."""
    cache = Cache(layers=[ReservedLayer(reserve=4), ReservedLayer(reserve=4)])
    running = torch.randn(2, 2, 3, 4, 9, 8)  # layers x (k, v) x 3 rows x 4 heads x 9 positions x 8
    for index, layer in enumerate(cache.layers):
        layer.update(running[index, 0], running[index, 1])
    first = random_entry(9, 1)
    assert torch.equal(append_prefixes(cache, [first], room=5), torch.ones(1, 9, dtype=torch.long))
    buffers = []
    for layer in cache.layers:  # spare rows now; fill them with what a reused buffer may hold
        for buffer in layer._buffers.values():
            buffer[4:].fill_(float("nan"))
            buffers.append(buffer.data_ptr())
    entries = [random_entry(9, 2), random_entry(4, 3), random_entry(7, 4)]
    mask = append_prefixes(cache, entries, room=5)
    want, want_mask = prefix_rows([first, *entries], 9)
    assert torch.equal(mask, want_mask[1:])
    assert mask.sum(1).tolist() == [9, 4, 7] and mask[:, -1].all()  # each prefix's own length, right-aligned
    for index, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, torch.cat([running[index, 0], want[index, 0]]))
        assert torch.equal(layer.values, torch.cat([running[index, 1], want[index, 1]]))
        assert layer._buffers["keys"].shape[2] - layer.get_seq_length() >= 5  # the room asked for
    # written in place, into the spare rows: one copy of each prefix
    assert [b.data_ptr() for layer in cache.layers for b in layer._buffers.values()] == buffers
    with pytest.raises(ValueError, match="does not fit"):
        append_prefixes(cache, [random_entry(10, 5)], room=1)


def requests(scopes: bool = True) -> list[GenerationRequest]:
    """Rows on the base and on adapters; one image, two images, no image; one prompt twice."""
    ims = images()
    rows = [
        GenerationRequest("What colour is the part?", [ims[0]], slot=0, max_new_tokens=6),
        GenerationRequest("Where is it?", [ims[1], ims[2]], slot=1, max_new_tokens=4),
        GenerationRequest("Describe", [], slot=2, max_new_tokens=8),
        GenerationRequest("How many parts are there in this picture?", [ims[2]], slot=3, max_new_tokens=5),
        GenerationRequest("Colour?", [ims[0]], slot=0, max_new_tokens=6),
        GenerationRequest("Colour?", [ims[0]], slot=1, max_new_tokens=6),
    ]
    if scopes:
        for row in rows:
            row.prefix_scope = f"slot-{row.slot}"
    return rows


def test_prompts_over_cached_prefixes_equal_whole_prompts(tiny_base):
    load_random_adapters(tiny_base)
    reference = RunningBatch.prefill(tiny_base, requests(scopes=False))
    prefixes = PrefixCache()
    first = RunningBatch.prefill(tiny_base, requests(), prefixes=prefixes)
    # Every row with images and a scope was looked up and missed; the duplicate prefix is kept once.
    assert (prefixes.hits, prefixes.misses, len(prefixes)) == (0, 5, 4)
    torch.testing.assert_close(first.logits, reference.logits)

    again = RunningBatch.prefill(tiny_base, requests(), prefixes=prefixes)
    assert (prefixes.hits, prefixes.misses) == (5, 5)
    order = [row.key for row in again.rows]
    assert sorted(order[1:]) == [0, 1, 3, 4, 5] and order[0] == 2  # the text-only row ran whole, first
    torch.testing.assert_close(again.logits, reference.logits[order], rtol=1e-4, atol=1e-4)
    # What was cached for the two-image row: its prompt up to its last image token, and no further.
    two_images = encode_prompt(tiny_base, "Where is it?", 2)
    n = prefix_length(two_images, tiny_base.image_token_id)
    assert two_images[n - 1] == tiny_base.image_token_id and tiny_base.image_token_id not in two_images[n:]
    assert sorted(e.length for e in prefixes._items.values()) == sorted(
        [prefix_length(encode_prompt(tiny_base, "x", k), tiny_base.image_token_id) for k in (1, 1, 1)] + [n])


def test_generation_over_cached_prefixes_equals_generation_without(tiny_base):
    load_random_adapters(tiny_base)
    want = [r.token_ids for r in generate(tiny_base, requests(scopes=False))]
    prefixes = PrefixCache()
    assert [r.token_ids for r in generate(tiny_base, requests(), prefixes=prefixes)] == want
    hit = generate(tiny_base, requests(), prefixes=prefixes)
    assert prefixes.hits == 5
    assert [r.token_ids for r in hit] == want
    assert [r.prompt_tokens for r in hit] == [len(encode_prompt(tiny_base, r.instruction, len(r.images)))
                                              for r in requests()]
    # Each row alone, over its cached prefix, too.
    for req, tokens in zip(requests(), want, strict=True):
        assert generate(tiny_base, [req], prefixes=prefixes)[0].token_ids == tokens


def test_a_prefix_is_reused_only_within_its_scope(tiny_base):
    """A slot refilled with other weights must get a new scope: its old prefixes are never read."""
    red = Image.new("RGB", (40, 40), (200, 10, 10))
    prefixes = PrefixCache()
    load_random_adapters(tiny_base)
    on_first = generate(tiny_base, [GenerationRequest("Colour?", [red], slot=1, max_new_tokens=6, prefix_scope="load-1")],
                        prefixes=prefixes)[0].token_ids
    config = AdapterConfig(peft_type="DUAL_LORA", r=8, lora_alpha=16)
    other = tiny_base.slots.new_adapter(config, seed=11)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(11))
    tiny_base.slots.load(1, other)
    want = generate(tiny_base, [GenerationRequest("Colour?", [red], slot=1, max_new_tokens=6)])[0].token_ids
    assert want != on_first
    got = generate(tiny_base, [GenerationRequest("Colour?", [red], slot=1, max_new_tokens=6, prefix_scope="load-2")],
                   prefixes=prefixes)[0].token_ids
    assert prefixes.hits == 0 and got == want
    # A row without a scope (or on a trainable adapter) is never looked up.
    generate(tiny_base, [GenerationRequest("Colour?", [red], slot=1, max_new_tokens=2)], prefixes=prefixes)
    assert (prefixes.hits, prefixes.misses) == (0, 2)


def test_a_prompt_ending_with_its_image_is_run_whole(tiny_base):
    """With a template that puts the image last there is nothing to run after the prefix: no caching."""
    from service.model.base import PromptFormat

    tiny_base.prompt = PromptFormat(template="USER: {instruction} {images}", image_placeholder="<image>")
    request = GenerationRequest("Colour?", [images()[0]], max_new_tokens=4, prefix_scope="base")
    prefixes = PrefixCache()
    want = generate(tiny_base, [GenerationRequest("Colour?", [images()[0]], max_new_tokens=4)])[0].token_ids
    for _ in range(2):
        assert generate(tiny_base, [request], prefixes=prefixes)[0].token_ids == want
    assert len(prefixes) == 0 and prefixes.hits == prefixes.misses == 0
