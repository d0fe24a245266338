"""ReservedLayer against transformers' DynamicLayer: the same operations give the same keys and values."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from service.model.kv_cache import (
    DEFAULT_ROW_ROOM,
    ReservedCache,
    ReservedLayer,
    compact_rows,
    drop_leading_columns,
    is_growing,
    stack_rows,
    widen,
)


def kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(*t.shape[:2], width - t.shape[2], t.shape[3]), t], dim=2)


def merge(layer, other, how: str) -> None:
    """Rows joining: ``stack_rows`` (what RunningBatch.merge runs), or the two tensors assigned
    in either order (as transformers' own code may do)."""
    width = max(layer.keys.shape[2], other.keys.shape[2])
    if how == "stack":
        stack_rows(Cache(layers=[layer]), Cache(layers=[other]), width)
        return
    keys = torch.cat([left_pad(layer.keys, width), left_pad(other.keys, width)])
    values = torch.cat([left_pad(layer.values, width), left_pad(other.values, width)])
    if how == "values first":
        layer.values, layer.keys = values, keys
    else:
        layer.keys, layer.values = keys, values


# Each program is a list of operations applied to a DynamicLayer and a ReservedLayer alike.
PROGRAMS = {
    "decode past the room": [("prefill", 3, 7)] + [("step",)] * 9,
    "rows leave then decode": [("prefill", 4, 6), ("step",), ("select", [0, 2]), ("step",), ("step",)],
    "leading columns dropped": [("prefill", 3, 6), ("step",), ("drop", 2), ("step",), ("select", [1]), ("step",)],
    "wider rows join": [("prefill", 2, 3), ("step",), ("merge", 2, 9, "stack"), ("step",), ("step",)],
    "narrower rows join": [("prefill", 2, 9), ("step",), ("merge", 3, 2, "stack"), ("step",), ("select", [4, 0]),
                           ("step",)],
    "rows join, keys assigned first": [("prefill", 2, 3), ("step",), ("merge", 2, 9, "keys first"), ("step",)],
    "rows join, values assigned first": [("prefill", 2, 9), ("merge", 1, 4, "values first"), ("step",)],
    "crop": [("prefill", 2, 5), ("step",), ("step",), ("crop", -2), ("step",)],
    "rows appended, then into the spare rows left": [("prefill", 2, 5), ("step",), ("append", 2), ("step",),
                                                     ("compact", [0, 3]), ("append", 1), ("step",), ("step",)],
    "appended past the room": [("prefill", 1, 3)] + [("append", 1), ("step",)] * 6,
    "rows moved after a column drop, then widened over it": [("prefill", 5, 6), ("step",), ("drop", 3),
                                                            ("compact", [3, 4]), ("widen", 7), ("step",)],
    "many rows moved, only their filled columns": [("prefill", 12, 4), ("step",), ("drop", 1),
                                                   ("compact", [0, 7, 8, 9, 10, 11]), ("step",), ("widen", 6),
                                                   ("step",)],
    "widened in place over dropped columns": [("prefill", 3, 6), ("step",), ("drop", 4), ("widen", 6), ("append", 1),
                                             ("step",)],
    "widened into a new buffer": [("prefill", 2, 4), ("widen", 9), ("append", 1), ("step",), ("select", [2, 0]),
                                  ("step",)],
    "assigned over spare rows": [("prefill", 2, 3), ("append", 2), ("compact", [1, 2]), ("merge", 1, 4, "keys first"),
                                 ("step",)],
}


@pytest.mark.parametrize("program", list(PROGRAMS), ids=list(PROGRAMS))
def test_reserved_layer_matches_dynamic_layer(program):
    plain, reserved = DynamicLayer(), ReservedLayer(reserve=4)
    seed = 0
    for op in PROGRAMS[program]:
        seed += 1
        if op[0] == "prefill":
            keys, values = kv(op[1], op[2], seed)
            got = [layer.update(keys, values) for layer in (plain, reserved)]
        elif op[0] == "step":
            keys, values = kv(plain.keys.shape[0], 1, seed)
            got = [layer.update(keys, values) for layer in (plain, reserved)]
            assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
        elif op[0] == "select":
            for layer in (plain, reserved):
                layer.batch_select_indices(torch.tensor(op[1]))
        elif op[0] == "drop":
            plain.keys, plain.values = plain.keys[..., op[1] :, :], plain.values[..., op[1] :, :]
            reserved.drop_leading(op[1])
        elif op[0] == "merge":
            keys, values = kv(op[1], op[2], seed)
            for layer in (plain, reserved):
                other = type(layer)()
                other.update(keys, values)
                merge(layer, other, how=op[3])
        elif op[0] == "crop":
            for layer in (plain, reserved):
                layer.crop(op[1])
        elif op[0] == "append":
            keys, values = kv(op[1], plain.keys.shape[2], seed)
            plain.keys, plain.values = torch.cat([plain.keys, keys]), torch.cat([plain.values, values])
            reserved.append_rows(keys, values, room=2)
        elif op[0] == "widen":
            plain.keys, plain.values = left_pad(plain.keys, op[1]), left_pad(plain.values, op[1])
            reserved.widen(op[1])
        elif op[0] == "compact":
            for layer in (plain, reserved):
                compact_rows(Cache(layers=[layer]), op[1])
        assert torch.equal(plain.keys, reserved.keys), op
        assert torch.equal(plain.values, reserved.values), op
        assert reserved.get_seq_length() == plain.get_seq_length()


def test_decoding_writes_in_place_until_the_room_runs_out():
    """The point of the layer: a decode step does not copy the cache, except once per ``reserve`` steps."""
    layer = ReservedLayer(reserve=4)
    layer.update(*kv(2, 5, 0))
    buffers = []
    for step in range(10):
        layer.update(*kv(2, 1, step + 1))
        buffers.append(layer._buffers["keys"].data_ptr())
    # The prefill left room for 4; each copy makes room for 4 more after the new token.
    changed = [step + 1 for step in range(1, 10) if buffers[step] != buffers[step - 1]]
    assert changed == [5, 10]


def test_cache_replaces_only_plain_layers(tiny_base):
    cache = ReservedCache(tiny_base.model.config)
    assert cache.layers and all(type(layer) is ReservedLayer for layer in cache.layers)
    assert is_growing(ReservedLayer()) and is_growing(DynamicLayer())
    assert not is_growing(DynamicSlidingWindowLayer(sliding_window=8))


def test_drop_leading_columns_on_either_kind_of_layer():
    keys, values = kv(2, 6, 0)
    cache = Cache(layers=[DynamicLayer(), ReservedLayer()])
    for layer in cache.layers:
        layer.update(keys, values)
    drop_leading_columns(cache, 2)
    for layer in cache.layers:
        assert torch.equal(layer.keys, keys[..., 2:, :]) and torch.equal(layer.values, values[..., 2:, :])


def test_an_adopted_buffer_is_read_and_written_in_place():
    keys, values = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    layer = ReservedLayer(reserve=4)
    layer.adopt(keys, values, 6)
    assert torch.equal(layer.keys, keys[:, :, :6]) and layer.get_seq_length() == 6
    new_k, new_v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    k, v = layer.update(new_k, new_v)  # fits the 4 columns of room: no copy
    assert k.data_ptr() == keys.data_ptr() and v.data_ptr() == values.data_ptr()
    assert torch.equal(k[:, :, 6:], new_k) and torch.equal(v[:, :, :6], values[:, :, :6])
    k, _ = layer.update(new_k[:, :, :1], new_v[:, :, :1])  # no room left: a new buffer
    assert k.data_ptr() != keys.data_ptr() and k.shape[2] == 11 and torch.equal(k[:, :, 6:10], new_k)


@pytest.mark.parametrize(
    "keep", [[0, 1, 2, 3, 4], [1, 2, 3, 4], [0, 1, 2, 3], [0, 4], [2], [1, 3], [0, 2, 4],
             list(range(6, 12)), [0, 3, 7, 8, 9, 10, 11]],  # (of 12 rows: more than FEW_ROWS move)
)
@pytest.mark.parametrize("layer_type", [ReservedLayer, DynamicLayer])
def test_compacting_rows_keeps_exactly_the_kept_rows_and_says_in_what_order(keep, layer_type):
    keys, values = kv(5 if max(keep) < 5 else 12, 6, 0)
    layer = layer_type()
    layer.update(keys, values)
    cache = Cache(layers=[layer])
    order = compact_rows(cache, keep)
    assert sorted(order) == keep
    assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])
    if layer_type is ReservedLayer:  # rows already in place did not move: one copied per row that left below
        assert all(order[j] == j for j in range(len(keep)) if j in keep)
        new_k, new_v = kv(len(keep), 1, 1)
        k, v = layer.update(new_k, new_v)
        assert torch.equal(k[:, :, -1:], new_k) and torch.equal(k[:, :, :6], keys[order])


def test_appended_rows_go_into_spare_rows_and_room_without_a_copy():
    """What joining over cached prefixes relies on: once a buffer has spare rows and room, rows
    appended, rows leaving and decode steps write in place; widening over dropped columns too."""
    cache = Cache(layers=[ReservedLayer(reserve=8), ReservedLayer(reserve=8)])
    for layer in cache.layers:
        layer.update(*kv(3, 5, 0))
    for layer in cache.layers:
        layer.append_rows(*kv(2, 5, 1), room=4)  # no spare rows yet: a copy
    layer = cache.layers[0]
    buffer = layer._buffers["keys"]
    assert buffer.shape[0] == 5 + DEFAULT_ROW_ROOM and layer.keys.shape == (5, 2, 5, 4)
    before = layer.keys.clone()
    layer.update(*kv(5, 4, 2))  # the room asked for
    compact_rows(Cache(layers=[layer]), [0, 2, 4])
    layer.append_rows(*kv(4, 9, 3), room=8)
    assert layer._buffers["keys"].data_ptr() == buffer.data_ptr()
    assert layer.keys.shape == (7, 2, 9, 4) and torch.equal(layer.keys[2, :, :5], before[2])
    layer.drop_leading(3)
    layer.widen(9)  # the 3 dropped columns are zeroed and in use again
    assert layer._buffers["keys"].data_ptr() == buffer.data_ptr()
    assert torch.equal(layer.keys[:, :, :3], torch.zeros(7, 2, 3, 4)) and torch.equal(layer.keys[2, :, 3:5], before[2, :, 3:5])
    widen(cache, 12)  # the second layer has no dropped columns: a new buffer, spare rows kept
    other = cache.layers[1]
    assert other.keys.shape == (5, 2, 12, 4) and other._buffers["keys"].shape[0] == 5 + DEFAULT_ROW_ROOM
    with pytest.raises(ValueError, match="positions"):
        layer.append_rows(*kv(1, 4, 4), room=1)
