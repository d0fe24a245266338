"""SizedLRU: one unit per value by default, or a size per value; least recently used out first."""

from __future__ import annotations

from service.lru import SizedLRU
from service.model.generate import ImageFeatureCache


def test_counted_by_default_least_recently_used_out_first():
    cache = SizedLRU[str](capacity=2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # b is now the least recent
    cache.put("c", "C")
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert (len(cache), cache.total, cache.hits, cache.misses) == (2, 2, 3, 1)
    cache.put("a", "A2")  # replacing keeps the count
    assert (len(cache), cache.total, cache.get("a")) == (2, 2, "A2")


def test_sized_values_and_one_too_large_for_the_whole_cache():
    cache = SizedLRU[str](capacity=5, size=len)
    cache.put("x", "xxx")
    cache.put("y", "yy")
    cache.put("z", "z")  # 6 > 5: x, the least recent, goes
    assert cache.get("x") is None and cache.total == 3
    cache.put("big", "bbbbbb")
    assert cache.get("big") is None and len(cache) == 2


def test_the_image_feature_cache_holds_capacity_images():
    cache = ImageFeatureCache(capacity=3)
    for key in "abcd":
        cache.put(key, key)
    assert len(cache) == 3 and cache.get("a") is None


def test_shared_between_threads_its_count_and_order_stay_consistent():
    """The HTTP layer's event loop and thread pool share the decoded images; the engine's worker and
    the HTTP threads share the prompt cache. Without the lock, a ``get`` moving a key that another
    thread just evicted raised ``KeyError``, and the total drifted."""
    import sys
    import threading

    cache = SizedLRU[int](capacity=8, size=lambda value: 1 + value % 3)
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        try:
            for i in range(20_000):
                key = str((i * 7 + seed) % 13)
                if cache.get(key) is None:
                    cache.put(key, i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert cache.total == sum(1 + value % 3 for value in cache._items.values()) <= cache.capacity
    assert cache.hits + cache.misses == 4 * 20_000
