"""FP8 training recipe (DeepSeek-V3): E4M3 GEMM inputs, 1x128 activation / 128x128 weight scales.

- ``FP8Linear`` / ``FP8LinearFunction`` / ``fp8_linear``  forward, dgrad and wgrad in FP8
- ``convert_to_fp8(model)``   swap nn.Linear -> FP8Linear except the head, embedding and router
- ``FP8WeightCache`` / ``invalidate_fp8_weight_caches(model)``  FP8 weight copies kept between calls by
  the module that owns the weights (``fp8_weight_cache = True`` on FP8Linear or GroupedExperts); the
  owner of the optimizer invalidates them after every ``optimizer.step()``
- kernels: ``coscale.kernels.quant`` (quantization), ``coscale.kernels.fp8_gemm`` (block-scaled GEMM),
  ``coscale.kernels.fp8_grouped_linear`` (routed experts, ``fp8_grouped_linear``)
See docs/fp8.md for the recipe, the layouts and which path promotes how.
"""

from coscale.fp8.convert import DEFAULT_SKIP, convert_to_fp8, is_skipped
from coscale.fp8.linear import FP8Linear, FP8LinearFunction, fp8_linear
from coscale.kernels.fp8_weight_cache import FP8WeightCache, invalidate_fp8_weight_caches

__all__ = [
    "FP8Linear",
    "FP8LinearFunction",
    "fp8_linear",
    "convert_to_fp8",
    "is_skipped",
    "DEFAULT_SKIP",
    "FP8WeightCache",
    "invalidate_fp8_weight_caches",
]
