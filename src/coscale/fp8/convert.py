"""convert_to_fp8: apply the FP8 recipe to a plain model after construction (torchtitan-style).

What stays in high precision, as in DeepSeek-V3 (report section 3.3): the embedding, the output head,
the MoE router (``mlp.gate``, not an nn.Linear in coscale anyway), norms, and the attention core
(softmax and the score/value products are not nn.Linear modules, so they are never converted). Every
other nn.Linear becomes an FP8Linear sharing the same Parameter objects, so parameter names, the
state_dict and any optimizer state are unchanged. Modules with a ``precision`` attribute (the routed
experts, coscale.model.moe.GroupedExperts) get ``precision = "fp8"``, which routes their GEMMs through
coscale.kernels.fp8_grouped_linear.fp8_grouped_linear.
"""

from __future__ import annotations

from torch import nn

from coscale.fp8.linear import FP8Linear

__all__ = ["DEFAULT_SKIP", "convert_to_fp8", "is_skipped"]

# A pattern starting with "." must equal one dotted component of the qualified name (".gate" skips
# "mlp.gate" but not "mlp.gate_proj"); any other pattern matches as a substring.
DEFAULT_SKIP = ("lm_head", "embed", ".gate")


def is_skipped(name: str, skip=DEFAULT_SKIP) -> bool:
    parts = name.split(".")
    for pattern in skip:
        if pattern.startswith("."):
            if pattern[1:] in parts:
                return True
        elif pattern in name:
            return True
    return False


def convert_to_fp8(model: nn.Module, skip=DEFAULT_SKIP, backend: str = "auto", round_scale: bool = False):
    """Swap nn.Linear -> FP8Linear (except names matching ``skip``); set ``precision="fp8"`` where
    a module has that attribute. Converts in place and returns the model."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_skipped(name, skip)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(linear, backend, round_scale))
    for name, module in model.named_modules():
        if hasattr(module, "precision") and not isinstance(module, FP8Linear) and not is_skipped(name, skip):
            module.precision = "fp8"
    return model
