"""The KV cache of affiner's batch decoder: transformers' `DynamicCache`, whose layers grow in place, and whose rows
can be joined by rows prefilled apart or lose the columns no row attends to any more.

transformers' dynamic layers append a step's keys and values with `torch.cat`, a copy of the whole cache at every
step: measured on Gemma 3 270M on a 2-core Zen 4, 75 ms of a 210 ms decode step for 64 rows of ~300 columns, more
than all its attention. Here a layer keeps spare columns after its states and writes each step into them, so the
cache is copied once every `SPARE` steps (or when rows join or leave), never at every step. What the model sees is
unchanged: the same keys and values, as views, and transformers' own masks and sizes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

SPARE = 64  # columns kept free after a layer's states: one copy of the cache every 64 steps


class _Growing:
    """In-place appending for a dynamic layer: `keys`/`values` are views of `room` buffers with spare columns. A
    tensor set from outside (rows selected by `batch_select_indices`, `join_layers`, `drop_leading`) is adopted into
    new buffers at the next step."""

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored column followed by the new ones, as views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.keys is not getattr(self, "_view", None) or self._end + new > self._room[0].shape[-2]:
            self._adopt(key_states, value_states, new)
        for room, states in zip(self._room, (key_states, value_states)):
            room[:, :, self._end:self._end + new] = states
        self._end += new
        return self._room[0][:, :, self._start:self._end], self._room[1][:, :, self._start:self._end]

    def keep_from(self, start: int) -> None:
        """Store only the columns of the buffers from `start` on (a sliding window's last ones)."""
        self._start = max(self._start, start)
        self.keys = self._view = self._room[0][:, :, self._start:self._end]
        self.values = self._room[1][:, :, self._start:self._end]

    def _adopt(self, key_states: torch.Tensor, value_states: torch.Tensor, new: int) -> None:
        stored = [t if t.dim() == 4 else s[:, :, :0] for t, s in ((self.keys, key_states), (self.values, value_states))]
        kept = stored[0].shape[-2]
        self._room = []
        for tensor, states in zip(stored, (key_states, value_states)):
            shape = (*states.shape[:2], kept + new + SPARE, states.shape[-1])
            room = states.new_empty(shape)
            room[:, :, :kept] = tensor
            self._room.append(room)
        self._start, self._end = 0, kept


class GrowingLayer(_Growing, DynamicLayer):
    """A full-attention layer: every column is kept."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.append(key_states, value_states)
        self.keep_from(self._start)
        return keys, values


class GrowingWindowLayer(_Growing, DynamicSlidingWindowLayer):
    """A sliding-window layer: the step sees its stored window and the new columns; its last `sliding_window - 1`
    columns are kept, as transformers' layer keeps them."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.append(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keep_from(self._end - self.sliding_window + 1)
        return keys, values


PLAIN = (DynamicLayer, DynamicSlidingWindowLayer, GrowingLayer, GrowingWindowLayer)


def new_cache(model) -> DynamicCache:
    """transformers' dynamic cache for `model`, its plain layers replaced by growing ones."""
    cache = DynamicCache(config=model.config)
    if joinable(cache):
        cache.layers = [GrowingWindowLayer(layer.sliding_window) if layer.is_sliding else GrowingLayer()
                        for layer in cache.layers]
    return cache


def joinable(cache) -> bool:
    """Whether rows prefilled apart can join this cache: its layers are transformers' plain dynamic ones (full or
    sliding-window attention) or ours, whose tensors `join_layers` knows how to pad; other caches (quantised,
    recurrent layers of hybrid models) are decoded batch after batch instead."""
    layers = getattr(cache, "layers", None)
    # A sliding-window layer is read through `cumulative_length` (transformers 5.x's name for its length so far).
    return bool(layers) and all(type(layer) in PLAIN and not getattr(layer, "record_past", False)
                                and (not layer.is_sliding or hasattr(layer, "cumulative_length")) for layer in layers)


def join_layers(mine, theirs, width: int) -> None:
    """One layer of two caches as one, for sequences of `width` columns, left-padded with zeros (masked): a
    sliding-window layer keeps only its window's last columns, so both are padded to what it keeps of `width`."""
    kept = min(width, mine.sliding_window - 1) if mine.is_sliding else width
    if not mine.is_initialized or not theirs.is_initialized:  # a layer the model never wrote (shared KV): nothing
        return
    mine.keys = torch.cat([pad_left(mine.keys, kept, 0, dim=2), pad_left(theirs.keys, kept, 0, dim=2)])
    mine.values = torch.cat([pad_left(mine.values, kept, 0, dim=2), pad_left(theirs.values, kept, 0, dim=2)])
    if mine.is_sliding:
        mine.cumulative_length = width


def drop_leading(layer, columns: int) -> None:
    """The first `columns` of a layer's sequence dropped (padding in every row); a sliding-window layer, which holds
    only its last columns, loses those of them that were among the dropped."""
    if not layer.is_initialized:
        return
    if layer.is_sliding:
        layer.cumulative_length -= columns
        extra = layer.keys.shape[2] - layer.cumulative_length
    else:
        extra = columns
    if extra > 0:
        layer.keys, layer.values = layer.keys[:, :, extra:], layer.values[:, :, extra:]


def pad_left(tensor: torch.Tensor, width: int, value: int | None = None, dim: int = 1) -> torch.Tensor:
    """`tensor` widened to `width` along `dim` on the left with `value` (None: a copy of its first column)."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    pad = tensor.narrow(dim, 0, 1).expand(*shape) if value is None else tensor.new_full(shape, value)
    return torch.cat([pad, tensor], dim=dim)
