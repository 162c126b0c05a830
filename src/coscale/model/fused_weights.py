"""One GEMM for several projections of the same input, at inference: their weights as views of one tensor.

At decode a small GEMM costs a fixed few microseconds whatever its size (cuBLAS about 5 us at 16 rows on the
H200, BENCHMARKS.md run 27), so two projections of the same x cost twice that. A module that mixes in
`StackedWeights` can stack the weights of such nn.Linear layers into one [sum of out_features, in_features]
tensor (`stack_weights()`), each layer's weight re-pointed at its rows of it: the layers keep their parameter
objects (same names, same values, no second copy; an optimizer holding them still steps them), and the
module multiplies x by `stacked_weight` once and splits the result. MLA's q (or q_a) and kv_a projections and
SwiGLU's gate and up projections use it (coscale.infer.layers.use_decode_kernels).

The stacked tensor must never disagree with the layers' weights. Moving or converting the module
(`.to()`, `.half()`) gives each parameter its own storage again, so `_apply` stacks them anew; loading a
state dict copies into the views (with `assign=True` it replaces the parameters, and a load post-hook
stacks them anew).
"""

from __future__ import annotations

import torch
from torch import nn


def concatenate_weights(*layers: nn.Module) -> torch.Tensor | None:
    """The stacked weight of `layers` (bias-free nn.Linear of one dtype and device, the same in_features),
    each layer's weight parameter re-pointed at its rows; None, and nothing changed, where they do not
    qualify (an FP8 layer, a bias)."""
    if not all(isinstance(m, nn.Linear) for m in layers):
        return None
    weights = [m.weight for m in layers]
    if any(m.bias is not None for m in layers) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    stacked = torch.cat([w.detach() for w in weights])
    start = 0
    for w in weights:
        w.data = stacked[start:start + w.shape[0]]  # the same Parameter object, now a view
        start += w.shape[0]
    return stacked


def is_stacked(stacked: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether the layers' weights are still the consecutive rows of `stacked` (the same storage)."""
    start = stacked.storage_offset()
    for m in layers:
        w = m.weight
        if (w.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr() or w.storage_offset() != start
                or w.stride() != stacked.stride()):
            return False
        start += w.numel()
    return start == stacked.storage_offset() + stacked.numel()


class StackedWeights:
    """Mixin for an nn.Module whose `stacked_layers()` multiply the same input (module docstring)."""

    stacked_weight: torch.Tensor | None = None

    def stacked_layers(self) -> tuple[nn.Module, ...]:
        """The layers that read the same input, in the order their outputs are split (none by default)."""
        return ()

    def stack_weights(self, on: bool = True) -> bool:
        """Multiply the input by the stacked layers in one GEMM (without gradients): True where they qualify.
        `on=False` goes back to one GEMM a layer (the weights stay views of the stacked tensor)."""
        layers = self.stacked_layers()
        if not on:
            self.stacked_weight = None
        elif self.stacked_weight is None or not is_stacked(self.stacked_weight, *layers):
            self.stacked_weight = concatenate_weights(*layers)
        if not getattr(self, "_restacks_on_load", False):
            self.register_load_state_dict_post_hook(_restack_after_load)
            self._restacks_on_load = True
        return self.stacked_weight is not None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # a move or conversion gives each parameter its own storage
        if self.stacked_weight is not None:
            self.stack_weights()  # stacks again unless nothing moved (`.to()` the device they are on)
        return out


def _restack_after_load(module: StackedWeights, incompatible_keys) -> None:
    if module.stacked_weight is not None:
        module.stack_weights()
