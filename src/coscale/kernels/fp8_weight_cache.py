"""FP8 copies of weights kept between calls, owned by the module that owns the weights.

Quantizing a weight costs one read of it (and a byte transpose for W^T) in every forward. Between two
optimizer steps the weights do not change, so inference and every micro-batch after the first of an
optimizer step can reuse the FP8 copies. An ``FP8WeightCache`` holds them for one owner: a module
switches caching on with its ``fp8_weight_cache`` attribute (``GroupedExperts``, ``FP8Linear``, the
expert-parallel experts): ``True`` gives it a cache of its own, ``False``/``None`` switch it off, or
assign an ``FP8WeightCache``.

Who invalidates: the owner of the optimizer. Call ``invalidate_fp8_weight_caches(model)`` after every
``optimizer.step()``, and after any other write to the weights that autograd's version counter does
not see (``.data`` writes, loading a checkpoint through ``.data``). There is no global hook.

Safety net: an entry is used only while each weight is the same tensor object (held by weak
reference) with the same storage address, version counter, shape, dtype and device, and the
quantization settings match. In-place updates through autograd (``w.add_(...)``, non-fused
optimizers, ``load_state_dict``) bump the version counter and are caught without ``invalidate()``;
fused optimizers (``fused=True``) and ``.data`` writes do not bump it, and only ``invalidate()``
protects against them. Inference tensors have no version counter: the address, shape and object
identity are checked.

Cost: the FP8 copies, 1 byte per parameter (2 once W^T was needed, i.e. once the input needed a
gradient) plus one FP32 scale per 128x128 block. No host synchronisation (the checks read tensor
metadata only).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from coscale.errors import CoscaleError

__all__ = ["FP8WeightCache", "as_weight_cache", "invalidate_fp8_weight_caches", "weight_cache_of"]

def _version(w: torch.Tensor) -> int:
    return -1 if w.is_inference() else w._version  # inference tensors keep no version counter


def _stamp(weights: Sequence[torch.Tensor]) -> tuple:
    return tuple((w.data_ptr(), _version(w), tuple(w.shape), w.dtype, w.device) for w in weights)


@dataclass
class _Entry:
    refs: tuple  # weak references to the weights the copies were made from
    stamp: tuple
    settings: Hashable
    value: tuple  # (wq, w_scale, wq_t or None, wt_scale or None)

    def serves(self, weights: Sequence[torch.Tensor], settings: Hashable, need_t: bool) -> bool:
        return (
            all(ref() is w for ref, w in zip(self.refs, weights))
            and self.settings == settings
            and self.stamp == _stamp(weights)
            and (self.value[2] is not None or not need_t)
        )


class FP8WeightCache:
    """FP8 copies of one owner's weights, reused until ``invalidate()`` (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], _Entry] = {}

    def __repr__(self) -> str:
        return f"FP8WeightCache(entries={len(self._entries)})"

    def __getstate__(self) -> dict:  # pickling or deep-copying the owner copies no FP8 data
        return {"_entries": {}}

    @property
    def num_entries(self) -> int:
        """How many weight groups have FP8 copies now (e.g. 2 for GroupedExperts: gate+up, down)."""
        return len(self._entries)

    def invalidate(self) -> None:
        """Drop every FP8 copy; the next call quantizes again. Call after each optimizer step."""
        self._entries.clear()

    def get(
        self,
        weights: Sequence[torch.Tensor],
        settings: Hashable,
        need_t: bool,
        quantize: Callable[[], tuple],
    ) -> tuple:
        """The FP8 copies of ``weights`` made with ``settings`` (e.g. the backend), with W^T when
        ``need_t``: the kept ones when they still serve, else ``quantize()``'s result, kept.
        ``quantize`` returns (wq, w_scale, wq_t, wt_scale), the last two None without W^T."""
        key = tuple(id(w) for w in weights)
        entry = self._entries.get(key)
        if entry is not None and entry.serves(weights, settings, need_t):
            return entry.value
        self._entries.pop(key, None)
        entry = None  # no reference to the stale copies is left while the new ones are allocated
        value = quantize()
        self._entries[key] = _Entry(tuple(weakref.ref(w) for w in weights), _stamp(weights), settings, value)
        return value


def as_weight_cache(value) -> FP8WeightCache | None:
    """The switch a module's ``fp8_weight_cache`` attribute takes: True -> a new FP8WeightCache,
    False/None -> None, an FP8WeightCache -> itself."""
    if value is None or value is False:
        return None
    if value is True:
        return FP8WeightCache()
    if isinstance(value, FP8WeightCache):
        return value
    raise CoscaleError(f"fp8_weight_cache must be True, False, None or an FP8WeightCache; got {value!r}")


def weight_cache_of(module: nn.Module) -> FP8WeightCache | None:
    """``module.fp8_weight_cache`` as a cache object or None; a ``True`` switch is replaced on the
    module by the FP8WeightCache it stands for, so the module owns that one cache from then on."""
    value = getattr(module, "fp8_weight_cache", None)
    cache = as_weight_cache(value)
    if value is True:
        module.fp8_weight_cache = cache
    return cache


def invalidate_fp8_weight_caches(model: nn.Module) -> int:
    """Invalidate the FP8WeightCache of every module of ``model``; returns how many there were.
    The training loop calls it after every ``optimizer.step()``."""
    values = (getattr(m, "fp8_weight_cache", None) for m in model.modules())
    caches = {id(c): c for c in values if isinstance(c, FP8WeightCache)}  # one cache may serve two modules
    for cache in caches.values():
        cache.invalidate()
    return len(caches)
