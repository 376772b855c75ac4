"""A KV cache that writes each step's keys and values in place.

transformers' ``DynamicCache`` concatenates at every step, copying the whole cache (a sixth of a decode step's
time on CPU); the buffers here keep spare columns and double when they run out.
"""

from __future__ import annotations

from typing import Any

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per model layer: keys, values (rows, heads, length, dim)
ROOM = 64  # spare columns a cache buffer is given when it is (re)built


def _cache_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class ColumnLayer(DynamicLayer):
        """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns."""

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
            super().__init__()
            if keys is not None and values is not None:
                self.adopt(keys, values)

        def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Hold a copy of ``keys``/``values`` with room to grow."""
            used = keys.shape[2]
            self.hold(_with_room(keys, used + ROOM), _with_room(values, used + ROOM), used)
            self._k[:, :, :used], self._v[:, :, :used] = keys, values

        def hold(self, keys: torch.Tensor, values: torch.Tensor, used: int) -> None:
            """Take ``keys``/``values`` as the buffers, of which the first ``used`` columns hold tokens."""
            self.dtype, self.device = keys.dtype, keys.device
            self._k, self._v = keys, values
            self.keys, self.values = keys[:, :, :used], values[:, :, :used]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.adopt(key_states, value_states)
                return self.keys, self.values
            used, new = self.keys.shape[2], key_states.shape[2]
            if used + new > self._k.shape[2]:  # out of room: double it (one copy, amortised over many steps)
                keys, values, size = self.keys, self.values, max(used + new, 2 * used)
                self.hold(_with_room(keys, size), _with_room(values, size), used)
                self._k[:, :, :used], self._v[:, :, :used] = keys, values
            self._k[:, :, used : used + new] = key_states
            self._v[:, :, used : used + new] = value_states
            self.keys, self.values = self._k[:, :, : used + new], self._v[:, :, : used + new]
            return self.keys, self.values

    return ColumnLayer


_column_layer: type | None = None


def column_cache(layers: Layers | None = None, used: int | None = None) -> Any:
    """A transformers ``Cache`` of ``ColumnLayer``s: empty, holding a copy of ``layers``, or, with ``used``,
    taking ``layers`` as its buffers (their first ``used`` columns hold tokens)."""
    global _column_layer
    from transformers.cache_utils import Cache

    if _column_layer is None:
        _column_layer = _cache_layer_class()
    if layers is None:
        return Cache(layer_class_to_replicate=_column_layer)
    cache = Cache(layers=[_column_layer() for _ in layers])
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.hold(keys, values, used) if used is not None else layer.adopt(keys, values)
    return cache


def _with_room(t: torch.Tensor, columns: int) -> torch.Tensor:
    """An uninitialised buffer like ``t`` (rows, heads, length, dim) with ``columns`` columns."""
    return t.new_empty((t.shape[0], t.shape[1], columns, t.shape[3]))
