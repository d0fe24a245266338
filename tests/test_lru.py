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
