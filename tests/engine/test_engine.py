"""The engine: dynamic and continuous batching equal one-by-one, slot LRU, hot swap, back-pressure, cancel."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from PIL import Image

from service.config import Settings
from service.engine.engine import Engine, SlotTable
from service.engine.jobs import AnswerJob
from service.errors import InvalidInput, NotFound, Overloaded
from tests.helpers import bias_eos, poll, publish_random_adapter

RED = Image.new("RGB", (40, 40), (200, 20, 20))
GREEN = Image.new("RGB", (40, 40), (20, 200, 20))


@pytest.fixture()
def make_engine(tiny_base, tmp_path):
    engines = []

    def make(**overrides):
        overrides.setdefault("n_slots", tiny_base.slots.n_slots)
        settings = Settings(model=tmp_path, adapter_dir=tmp_path / "adapters", **overrides)
        engine = Engine(settings, base=tiny_base)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def hold_worker(engine) -> tuple[threading.Event, threading.Event]:
    """Make the worker block inside each batch until ``gate`` is set; ``entered`` tells it has a batch."""
    gate, entered = threading.Event(), threading.Event()
    original = engine._admit

    def held(batch):
        entered.set()
        gate.wait(30)
        original(batch)

    engine._admit = held
    return gate, entered


def jobs():
    return [
        AnswerJob("What colour?", [RED], None, 6),
        AnswerJob("What colour?", [RED], "a", 6),
        AnswerJob("Where is it?", [GREEN], "b", 4),
        AnswerJob("Describe", [], "c", 5),
        AnswerJob("What colour?", [GREEN, RED], "a@1", 3),
        AnswerJob("hi", [], None, 2, temperature=0.7),
    ]


def test_concurrent_requests_are_batched_and_equal_one_by_one(make_engine, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    for seed, name in enumerate("abc", start=1):
        publish_random_adapter(tiny_base, store, name, 1, seed=seed, peft_type="LORA" if name == "c" else "DUAL_LORA")
    engine = make_engine(max_batch_size=8, max_wait_ms=200)
    alone = [engine.answer(job) for job in jobs()[:5]]
    rows = [engine.submit(job) for job in jobs()[:5]]
    together = [row.future.result(timeout=60) for row in rows]
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert max(r["timing_ms"]["batch_size"] for r in together) > 1
    assert together[1]["adapter"] == {"name": "a", "version": 1}
    assert len({r["answer"] for r in together[:4]}) == 4  # base and three adapters all differ


def test_lru_evicts_the_least_recently_used_idle_adapter(make_engine, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    for seed, name in enumerate("abc", start=1):
        publish_random_adapter(tiny_base, store, name, 1, seed=seed)
    engine = make_engine(n_slots=2, max_batch_size=1)
    first = engine.answer(AnswerJob("What colour?", [RED], "a", 5))["answer"]
    engine.answer(AnswerJob("What colour?", [RED], "b", 5))
    engine.answer(AnswerJob("What colour?", [RED], "a", 5))  # a is now the most recent
    engine.answer(AnswerJob("What colour?", [RED], "c", 5))  # evicts b
    assert set(engine.slots.resident) == {("a", 1), ("c", 1)}
    assert engine.answer(AnswerJob("What colour?", [RED], "a", 5))["answer"] == first


def test_a_batch_needing_more_adapters_than_slots_is_split(make_engine, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    for seed, name in enumerate("abc", start=1):
        publish_random_adapter(tiny_base, store, name, 1, seed=seed)
    reference = make_engine(n_slots=4)
    want = [reference.answer(AnswerJob("What colour?", [RED], n, 4))["answer"] for n in "abc"]
    engine = make_engine(n_slots=2, max_batch_size=8, max_wait_ms=200)
    rows = [engine.submit(AnswerJob("What colour?", [RED], n, 4)) for n in "abc"]
    got = [row.future.result(timeout=60)["answer"] for row in rows]
    assert got == want


def test_slot_table_never_evicts_a_pinned_slot():
    table = SlotTable(2)
    s1, _ = table.assign(("a", 1), pinned=set())
    s2, _ = table.assign(("b", 1), pinned={s1})
    slot, evicted = table.assign(("c", 1), pinned={s1})
    assert evicted == ("b", 1) and slot == s2
    with pytest.raises(RuntimeError):
        table.assign(("d", 1), pinned={s1, s2})


def test_hot_swap_new_version_and_live_pointer_without_restart(make_engine, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    publish_random_adapter(tiny_base, store, "a", 1, seed=1)
    engine = make_engine()
    v1 = engine.answer(AnswerJob("What colour?", [RED], "a", 6))
    publish_random_adapter(tiny_base, store, "a", 2, seed=2)  # written by "another process"
    v2 = engine.answer(AnswerJob("What colour?", [RED], "a", 6))
    assert (v1["adapter"]["version"], v2["adapter"]["version"]) == (1, 2)
    assert v1["answer"] != v2["answer"]
    (store / "a" / "live").write_text("1\n")  # rollback
    assert engine.answer(AnswerJob("What colour?", [RED], "a", 6))["answer"] == v1["answer"]


def test_a_running_request_finishes_on_the_version_it_started_with(make_engine, tiny_base, tmp_path):
    store = tmp_path / "adapters"
    publish_random_adapter(tiny_base, store, "a", 1, seed=1)
    publish_random_adapter(tiny_base, store, "a", 2, seed=2, live=False)
    engine = make_engine(max_wait_ms=300)
    row = engine.submit(AnswerJob("What colour?", [RED], "a", 6))
    (store / "a" / "live").write_text("2\n")  # moved while the request waits
    assert row.future.result(timeout=60)["adapter"] == {"name": "a", "version": 1}


def test_full_queue_is_overloaded_and_bad_requests_fail_at_submit(make_engine, tiny_base, tmp_path):
    engine = make_engine(max_queue=1, max_batch_size=1)
    gate, entered = hold_worker(engine)
    first = engine.submit(AnswerJob("hi", [], None, 2))
    assert entered.wait(30)  # the worker has taken `first` and is blocked
    engine.submit(AnswerJob("hi", [], None, 2))
    with pytest.raises(Overloaded):
        engine.submit(AnswerJob("hi", [], None, 2))
    gate.set()
    assert first.future.result(timeout=60)["answer"] is not None
    with pytest.raises(InvalidInput):
        engine.submit(AnswerJob("word " * 400, [], None, 2))
    with pytest.raises(NotFound):
        engine.submit(AnswerJob("hi", [], "missing", 2))


def test_cancelled_rows_stop_early(make_engine):
    engine = make_engine(max_wait_ms=200)
    keep = engine.submit(AnswerJob("hi", [], None, 20))
    drop = engine.submit(AnswerJob("hi", [], None, 20))
    drop.cancel()
    assert keep.future.result(timeout=60)["usage"]["completion_tokens"] >= 1
    with pytest.raises(Exception, match="cancelled"):
        drop.future.result(timeout=60)


def test_a_lone_request_does_not_wait_for_company_but_a_crowd_is_batched(make_engine):
    """The batch wait applies only once batches have company: one client never pays it."""
    engine = make_engine(max_batch_size=8, max_wait_ms=3000)
    for _ in range(2):
        started = time.perf_counter()
        result = engine.answer(AnswerJob("hi", [], None, 2))
        assert time.perf_counter() - started < 2.0  # far below the 3 s wait
        assert result["timing_ms"]["batch_size"] == 1 and result["timing_ms"]["queue"] < 1000
    # A crowd: rows that arrive while another runs join it at its next step, without any wait...
    gate, entered = hold_worker(engine)
    blocker = engine.submit(AnswerJob("hi", [], None, 2))
    assert entered.wait(30)
    crowd = [engine.submit(AnswerJob("hi", [], None, 2)) for _ in range(4)]
    gate.set()
    assert blocker.future.result(timeout=60)["timing_ms"]["batch_size"] == 5
    assert [r.future.result(timeout=60)["timing_ms"]["batch_size"] for r in crowd] == [5] * 4
    assert all(r.future.result()["timing_ms"]["queue"] < 1000 for r in crowd)
    # ...and once batches have company, the worker waits for rows arriving one by one.
    second = []
    for _ in range(4):
        second.append(engine.submit(AnswerJob("hi", [], None, 2)))
        time.sleep(0.05)  # arriving one by one, well inside the wait
    assert [r.future.result(timeout=60)["timing_ms"]["batch_size"] for r in second] == [4] * 4


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    return poll(condition, timeout_s, interval_s=0.002)  # decode steps of the tiny base take ~1 ms


def test_a_short_request_joins_a_long_one_and_is_answered_first(make_engine, tiny_base, tmp_path):
    """Continuous batching: a request arriving while a long answer decodes joins it at the next
    step and is answered as soon as it finishes, with the answers each would get alone."""
    bias_eos(tiny_base, -1e4)  # every row runs to its max_new_tokens
    publish_random_adapter(tiny_base, tmp_path / "adapters", "a", 1, seed=1)
    engine = make_engine(max_batch_size=8, max_wait_ms=0)
    long_job = AnswerJob("Describe the part", [RED], None, 120)
    short_job = AnswerJob("What colour?", [GREEN], "a", 3)
    alone = {"long": engine.answer(long_job), "short": engine.answer(short_job)}
    tokens: list[str] = []
    long_row = engine.submit(long_job, on_text=tokens.append)
    assert wait_until(lambda: len(tokens) >= 5)  # the long answer is decoding
    short = engine.submit(short_job).future.result(timeout=60)
    assert not long_row.future.done()  # answered while the long one still decodes
    long = long_row.future.result(timeout=60)
    assert short["answer"] == alone["short"]["answer"] and long["answer"] == alone["long"]["answer"]
    assert short["usage"]["completion_tokens"] == 3 and long["usage"]["completion_tokens"] == 120
    assert short["timing_ms"]["batch_size"] == long["timing_ms"]["batch_size"] == 2
    assert short["timing_ms"]["batch"] < long["timing_ms"]["batch"]


def test_a_row_waiting_for_a_slot_is_not_overtaken_by_later_requests(make_engine, tiny_base, tmp_path):
    """With every slot pinned by running rows, a row on another adapter waits until one is
    released; while it waits, later requests stay queued behind it (no starvation), even those
    whose adapter is resident."""
    bias_eos(tiny_base, -1e4)
    store = tmp_path / "adapters"
    for seed, name in enumerate("ab", start=1):
        publish_random_adapter(tiny_base, store, name, 1, seed=seed)
    engine = make_engine(n_slots=1, max_batch_size=8, max_wait_ms=0)
    want = {n: engine.answer(AnswerJob("What colour?", [RED], n, 4))["answer"] for n in "ab"}
    finished: list[str] = []
    tokens: list[str] = []
    running = engine.submit(AnswerJob("Describe", [RED], "a", 60), on_text=tokens.append)
    running.future.add_done_callback(lambda _: finished.append("running a"))
    assert wait_until(lambda: len(tokens) >= 3)
    needs_slot = engine.submit(AnswerJob("What colour?", [RED], "b", 4))
    needs_slot.future.add_done_callback(lambda _: finished.append("b"))
    assert wait_until(lambda: engine._deferred)  # slot 1 holds `a`, pinned by the running row
    later = engine.submit(AnswerJob("What colour?", [RED], "a", 4))  # `a` is resident, but it waits
    later.future.add_done_callback(lambda _: finished.append("later a"))
    assert later.future.result(timeout=60)["answer"] == want["a"]
    assert needs_slot.future.result(timeout=60)["answer"] == want["b"]
    assert running.future.result(timeout=60)["usage"]["completion_tokens"] == 60
    assert finished == ["running a", "b", "later a"]


def test_newcomers_wait_to_be_join_ratio_per_running_row(make_engine, tiny_base):
    """Gathering: one newcomer per two running rows waits; a second one makes them join together."""
    bias_eos(tiny_base, -1e4)
    engine = make_engine(max_batch_size=16, max_wait_ms=0, join_ratio=1.0, max_join_steps=10_000)
    tokens: list[str] = []
    longs = [engine.submit(AnswerJob("Describe", [RED], None, 150), on_text=tokens.append if i == 0 else None)
             for i in range(2)]
    assert wait_until(lambda: engine._running is not None and len(engine._running) == 2 and len(tokens) >= 3)
    first = engine.submit(AnswerJob("What colour?", [GREEN], None, 4))
    steps = engine._steps
    assert wait_until(lambda: engine._steps >= steps + 20)
    assert engine._queue.qsize() == 1 and not first.future.done()  # 1 waiting < 1.0 x 2 running
    second = engine.submit(AnswerJob("What colour?", [RED], None, 4))
    results = [r.future.result(timeout=60) for r in (first, second)]
    assert not any(r.future.done() for r in longs)  # joined the running longs, answered before them
    assert [r["timing_ms"]["batch_size"] for r in results] == [4, 4]
    assert results[0]["timing_ms"]["queue"] > results[1]["timing_ms"]["queue"]


def test_a_newcomer_joins_after_max_join_steps_even_alone(make_engine, tiny_base):
    bias_eos(tiny_base, -1e4)
    engine = make_engine(max_batch_size=16, max_wait_ms=0, join_ratio=100.0, max_join_steps=5)
    tokens: list[str] = []
    long = engine.submit(AnswerJob("Describe", [RED], None, 150), on_text=tokens.append)
    assert wait_until(lambda: len(tokens) >= 3)
    done_at: list[int] = []
    newcomer = engine.submit(AnswerJob("What colour?", [GREEN], None, 4))
    submitted_at = newcomer.arrived_step
    newcomer.future.add_done_callback(lambda _: done_at.append(engine._steps))
    result = newcomer.future.result(timeout=60)
    assert not long.future.done() and result["timing_ms"]["batch_size"] == 2
    assert done_at[0] - submitted_at >= 5 + 4  # waited 5 steps, then decoded its 4 tokens


def test_a_newcomer_over_a_cached_prefix_runs_in_the_running_rows_decode_pass(make_engine, tiny_base, monkeypatch):
    """A question on an image already asked about joins a running batch without a prefill pass of
    its own: its prompt's rest rides along with the running row's next decode token."""
    from service.model.generate import RunningBatch

    bias_eos(tiny_base, -1e4)
    engine = make_engine(max_batch_size=8, max_wait_ms=0)
    question = AnswerJob("What colour?", [GREEN], None, 4)
    alone = engine.answer(question)  # (GREEN's prefix on the base is cached now)
    joined: list[int] = []
    join = RunningBatch._join
    monkeypatch.setattr(RunningBatch, "_join", lambda batch, tokens: (joined.append(len(batch.joining)), join(batch, tokens)))
    tokens: list[str] = []
    long = engine.submit(AnswerJob("Describe", [RED], None, 150), on_text=tokens.append)
    assert wait_until(lambda: len(tokens) >= 3)
    hits = engine.prefixes.hits
    result = engine.submit(question).future.result(timeout=60)
    assert result["answer"] == alone["answer"] and result["usage"] == alone["usage"]
    assert joined == [1] and engine.prefixes.hits == hits + 1
    assert not long.future.done() and result["timing_ms"]["batch_size"] == 2
    assert long.future.result(timeout=60)["usage"]["completion_tokens"] == 150


def test_image_prefixes_are_reused_but_never_across_adapters_sharing_a_slot(make_engine, tiny_base, tmp_path):
    """Questions on one image and adapter reuse its prefix; a slot refilled by another adapter (or
    the same one loaded again) starts afresh, and every answer equals an engine without the cache."""
    store = tmp_path / "adapters"
    for seed, name in enumerate("ab", start=1):
        publish_random_adapter(tiny_base, store, name, 1, seed=seed)
    asked = [("What colour?", "a"), ("Where is it?", "a"), ("What colour?", "b"), ("What colour?", "a"),
             ("What colour?", None), ("Where is it?", None)]
    reference = make_engine(n_slots=1, max_batch_size=1, prefix_cache_mb=0)
    assert reference.prefixes is None
    want = [reference.answer(AnswerJob(q, [RED], name, 6))["answer"] for q, name in asked]
    reference.close()
    engine = make_engine(n_slots=1, max_batch_size=1)
    got = [engine.answer(AnswerJob(q, [RED], name, 6))["answer"] for q, name in asked]
    assert got == want
    assert len(set(want[:3])) > 1  # a and b answer differently, so reusing a's prefix for b would show
    # Hits: a's second question, and the base's second; a after b was loaded again into the slot: a miss.
    assert (engine.prefixes.hits, engine.prefixes.misses) == (2, 4)


def test_torch_threads_sets_the_model_threads(make_engine):
    before = torch.get_num_threads()
    try:
        make_engine(torch_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_many_clients_on_more_adapters_than_slots_with_a_swap_and_cancels(make_engine, tiny_base, tmp_path):
    """Everything at once, as a loaded server sees it: 8 client threads asking on the base and on 5
    adapters (LoRA and Dual-LoRA) through 2 slots, so adapters are evicted and loaded again between
    and during batches and their image prefixes must never be mixed up; a new version of one adapter
    goes live while requests run; some rows are cancelled. Every answer equals what the version it
    reports answers alone, every cancelled row ends, and nothing is left behind."""
    bias_eos(tiny_base, -1e4)  # answers run to their max_new_tokens: rows leave at different steps
    store = tmp_path / "adapters"
    names = ["a", "b", "c", "d", "e"]
    for seed, name in enumerate(names, start=1):
        publish_random_adapter(tiny_base, store, name, 1, seed=seed, peft_type="LORA" if name in "ce" else "DUAL_LORA")
    engine = make_engine(n_slots=2, max_batch_size=6, max_wait_ms=2)
    questions = [("What colour?", [RED]), ("Where is it?", [GREEN]), ("What colour?", [GREEN, RED]), ("Describe", [])]
    outcomes: list[tuple[tuple, dict | None]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            ask(random.Random(c))
        except BaseException as exc:  # (a thread's failure would otherwise only show as a missing outcome)
            errors.append(f"client {c}: {exc!r}")

    def ask(rng: random.Random) -> None:
        for _ in range(6):
            adapter = rng.choice([None, *names, "a@1"])
            q = rng.randrange(len(questions))
            tokens = rng.randint(1, 8)
            row = engine.submit(AnswerJob(questions[q][0], questions[q][1], adapter, tokens))
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.004)
                row.cancel()
            try:  # (a row cancelled while decoding is answered with what it has, "cancelled")
                result = row.future.result(timeout=120)
            except Exception as exc:  # only a row cancelled before it started may end without one
                assert "cancelled" in str(exc), exc
                result = None
            with lock:
                outcomes.append(((q, tokens), result))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for thread in threads:
        thread.start()
    assert poll(lambda: len(outcomes) >= 12, 60)
    publish_random_adapter(tiny_base, store, "a", 2, seed=11)  # goes live mid-run
    for thread in threads:
        thread.join(180)
        assert not thread.is_alive()

    assert not errors and len(outcomes) == 48, errors
    answered = [(key, r) for key, r in outcomes if r is not None]
    assert len(answered) >= 30
    assert {r["adapter"]["version"] for _, r in answered if r["adapter"] and r["adapter"]["name"] == "a"} <= {1, 2}
    assert engine.answer(AnswerJob("What colour?", [RED], "a", 2))["adapter"]["version"] == 2
    assert max(r["timing_ms"]["batch_size"] for _, r in answered) > 2
    reference = make_engine(max_batch_size=1, prefix_cache_mb=0)  # the plainest path: one row, no prefix cache
    for (q, tokens), result in answered:
        ref = result["adapter"]
        pinned = f"{ref['name']}@{ref['version']}" if ref else None
        want = reference.answer(AnswerJob(questions[q][0], questions[q][1], pinned, tokens))
        if result["finish_reason"] == "cancelled":  # cancelled while decoding: what it had so far
            assert want["answer"].startswith(result["answer"]), (q, tokens, pinned)
            assert result["usage"]["completion_tokens"] < tokens
            continue
        assert result["answer"] == want["answer"], (q, tokens, pinned)
        assert result["usage"]["completion_tokens"] == tokens
    assert engine._running is None or not engine._running
    assert engine._queue.qsize() == 0 and len(engine.slots.resident) <= 2


def test_a_given_base_with_fewer_slots_than_the_settings_is_refused(tiny_base, tmp_path):
    settings = Settings(model=tmp_path, adapter_dir=tmp_path / "adapters", n_slots=tiny_base.slots.n_slots + 1)
    with pytest.raises(ValueError, match="adapter slots"):
        Engine(settings, base=tiny_base)
