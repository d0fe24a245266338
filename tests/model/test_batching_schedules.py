"""Continuous batching under random schedules: whenever rows arrive, join, finish or are cancelled,
each row decodes exactly the tokens it decodes alone.

The engine drives :class:`~service.model.generate.RunningBatch` with whatever arrives between decode
steps, so every path of the batch meets every other: prefix hits joining the decode pass (with
the pass's padding packed away and the running rows attending with one query), misses prefilled
and merged, rows leaving and the cache compacted, the cache widened for a longer prefix, its
leading padding dropped, LoRA and Dual-LoRA rows of different ranks mixed with base rows. The
hand-written cases in ``test_generate.py`` pin each path down; this test draws schedules that
combine them (derandomised: the same 60 schedules every run; ``HYPOTHESIS_PROFILE=deep`` draws 600
new ones, about a minute on 2 cores).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.model.generate import GenerationRequest, RunningBatch, generate
from service.model.prefix_cache import PrefixCache
from tests.helpers import bias_eos
from tests.model.test_generate import images, load_random_adapters

INSTRUCTIONS = ("What colour is the part?", "Where?", "Describe it", "How many parts are there here?")
IMAGE_SETS = ((), (0,), (1,), (0, 1), (2, 0, 1))

# (instruction, images, slot, max_new_tokens, seed or None for greedy)
request_specs = st.tuples(
    st.sampled_from(range(len(INSTRUCTIONS))),
    st.sampled_from(IMAGE_SETS),  # few sets, so that later arrivals often find their prefix cached
    st.integers(0, 3),  # slot 0: the base; 1, 2: Dual-LoRA of ranks 8 and 4; 3: LoRA
    st.integers(1, 6),
    st.none() | st.integers(0, 3),
)
# Each event: a group of arrivals, then some decode steps, then maybe a cancellation (an index
# into the rows started so far).
events = st.lists(
    st.tuples(st.lists(request_specs, min_size=1, max_size=4), st.integers(0, 3), st.none() | st.integers(0, 20)),
    min_size=1, max_size=5,
)


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    from service.model.base import load_base

    base = load_base(tiny_base_dir, n_slots=4, max_rank=8)
    bias_eos(base, -1e4)  # every row runs to its max_new_tokens unless cancelled
    load_random_adapters(base)
    return base


def request(spec, ims, cancelled: set | None = None, key=None) -> GenerationRequest:
    instruction, image_set, slot, max_new_tokens, seed = spec
    return GenerationRequest(
        INSTRUCTIONS[instruction], [ims[i] for i in image_set], slot=slot, max_new_tokens=max_new_tokens,
        temperature=0.0 if seed is None else 0.8, seed=seed, prefix_scope=f"slot-{slot}",
        is_cancelled=None if cancelled is None else (lambda: key in cancelled),
    )


DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"


@settings(max_examples=600 if DEEP else 60, derandomize=not DEEP, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schedule=events, warm=st.lists(request_specs, max_size=6), use_prefixes=st.sampled_from([True, True, False]))
def check_random_schedules(base, schedule, warm, use_prefixes):
    ims = images()
    prefixes = PrefixCache() if use_prefixes else None
    if prefixes is not None and warm:  # some prompts' image prefixes cached before the batch starts
        generate(base, [request(spec, ims) for spec in warm], prefixes=prefixes)

    specs: dict[int, tuple] = {}
    cancelled: set[int] = set()
    got = {}
    batch: RunningBatch | None = None
    for group, steps, cancel in schedule:
        keys = list(range(len(specs), len(specs) + len(group)))
        specs.update(zip(keys, group, strict=True))
        requests = [request(spec, ims, cancelled, key) for key, spec in zip(keys, group, strict=True)]
        if batch:  # as the engine admits: join the running rows, or start a batch when none run
            batch.add(requests, keys=keys, prefixes=prefixes)
        else:
            batch = RunningBatch.prefill(base, requests, keys=keys, prefixes=prefixes)
        for _ in range(steps):
            got.update(batch.step())
        if cancel is not None and cancel < len(specs):
            cancelled.add(cancel)
    while batch:
        got.update(batch.step())

    assert set(got) == set(specs)
    for key, spec in specs.items():
        alone = generate(base, [request(spec, ims)])[0]
        result = got[key]
        assert result.prompt_tokens == alone.prompt_tokens
        if result.finish_reason == "cancelled":
            assert key in cancelled
            assert result.token_ids == alone.token_ids[: len(result.token_ids)], key
        else:
            assert result.token_ids == alone.token_ids, (key, spec)
            assert len(result.token_ids) == spec[3]


def test_random_schedules_decode_every_row_as_alone(base, monkeypatch):
    """Every drawn schedule (see :func:`check_random_schedules`), and together they reach each
    path of the batch: otherwise the examples would prove less than they seem to."""
    import service.model.generate as generation
    import service.model.kv_cache as kv_cache

    reached = dict.fromkeys(["join", "packed join", "split attention", "merge", "rows left", "leading padding dropped",
                             "cache widened", "cancelled"], 0)

    def count(owner, name, path, when=lambda *args: True):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            reached[path] += bool(when(out, *args))
            return out

        monkeypatch.setattr(owner, name, counted)

    count(RunningBatch, "_join", "join")
    # (a packed pass in which some row brings only its last position: a running row in a join pass)
    count(generation, "packing_for", "packed join", lambda out, real: out is not None and real.shape[1] > 1
          and bool((real[:, :-1] == 0).all(-1).any()))
    count(generation, "leading_last_only_rows", "split attention", lambda out, real: out > 0)
    count(RunningBatch, "merge", "merge")
    count(generation, "_keep_rows", "rows left")
    count(kv_cache.ReservedLayer, "drop_leading", "leading padding dropped", lambda out, layer, n: n > 0)
    count(generation, "widen", "cache widened")
    count(generation._Row, "result", "cancelled", lambda out, row, base: out.finish_reason == "cancelled")

    check_random_schedules(base)
    assert all(reached.values()), reached
