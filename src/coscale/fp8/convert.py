"""convert_to_fp8: apply the FP8 recipe to a plain model after construction (torchtitan-style).

What stays in high precision, as in DeepSeek-V3 (report section 3.3): the embedding, the output head,
the MoE router (``mlp.gate``, not an nn.Linear in coscale anyway), norms, and the attention core
(softmax and the score/value products are not nn.Linear modules, so they are never converted). Every
other nn.Linear becomes an FP8Linear sharing the same Parameter objects, so parameter names, the
state_dict and any optimizer state are unchanged. Modules with a ``precision`` attribute (the routed
experts, coscale.model.moe.GroupedExperts, and the shared experts, SharedExperts) get ``precision = "fp8"``
by the experts' size rule, which routes their GEMMs through coscale.kernels.fp8_moe; the linear layers
inside such a module stay nn.Linear (the module's FP8 path reads their weights).

``policy`` (coscale.fp8.policy) decides by size which of those layers run in FP8: "all" (the default
here: every one) or "auto" (only where FP8 is measured to pay; what ``coscale train`` uses).
``describe_fp8_layers`` says which layers run in FP8 and why (the run header prints it).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from coscale.fp8.linear import FP8Linear
from coscale.fp8.policy import FP8Policy, as_policy

__all__ = ["DEFAULT_SKIP", "convert_to_fp8", "describe_fp8_layers", "is_skipped"]

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


def _experts_size(module: nn.Module) -> tuple[int, int] | None:
    """(hidden, intermediate) of a routed-experts module, None when it does not say."""
    hidden, intermediate = getattr(module, "hidden", None), getattr(module, "intermediate", None)
    return (hidden, intermediate) if isinstance(hidden, int) and isinstance(intermediate, int) else None


def _owned_by_fp8_module(model: nn.Module, name: str) -> bool:
    """Whether the linear layer ``name`` belongs to a module that runs its own FP8 path (one with a
    ``precision`` attribute: the shared experts, coscale.model.moe.SharedExperts): its size rule decides
    for the module's layers together, and they stay nn.Linear."""
    parent_name = name.rpartition(".")[0]
    return hasattr(model.get_submodule(parent_name) if parent_name else model, "precision")


def convert_to_fp8(model: nn.Module, skip=DEFAULT_SKIP, backend: str = "auto", round_scale: bool = False,
                   policy: FP8Policy | str = "all"):  # fmt: skip
    """Swap nn.Linear -> FP8Linear (except names matching ``skip`` and layers ``policy`` keeps in BF16);
    set ``precision="fp8"`` where a module has that attribute (the routed experts, by their size).
    Converts in place and returns the model."""
    policy = as_policy(policy)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_skipped(name, skip) and not _owned_by_fp8_module(model, name)
        and policy.linear(module.in_features, module.out_features)
    ]  # fmt: skip
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(linear, backend, round_scale))
    for name, module in model.named_modules():
        if hasattr(module, "precision") and not isinstance(module, FP8Linear) and not is_skipped(name, skip):
            size = _experts_size(module)
            if size is None or policy.experts(*size):
                module.precision = "fp8"
    return model


def _kinds(names: list[tuple[str, str]]) -> str:
    """'q_a_proj 7168->1536 x3, ...': layers grouped by their last name and shape."""
    counts = Counter(f"{name.rpartition('.')[2]} {shape}" for name, shape in names)
    return ", ".join(f"{kind}{f' x{n}' if n > 1 else ''}" for kind, n in counts.items())


def describe_fp8_layers(model: nn.Module, policy: FP8Policy | str, skip=DEFAULT_SKIP) -> str:
    """Which layers of a converted model run in FP8 and which stay in BF16, and why (one line)."""
    policy = as_policy(policy)
    fp8, small = [], []
    experts: dict[str, tuple[list[str], list[str]]] = {}  # "routed experts" / "shared experts": (fp8, bf16)
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            fp8.append((name, f"{module.in_features}->{module.out_features}"))
        elif type(module) is nn.Linear and not is_skipped(name, skip) and not _owned_by_fp8_module(model, name):
            small.append((name, f"{module.in_features}->{module.out_features}"))
        elif hasattr(module, "precision") and _experts_size(module) is not None and not is_skipped(name, skip):
            hidden, width = _experts_size(module)
            lists = experts.setdefault(getattr(module, "FP8_LABEL", "routed experts"), ([], []))
            lists[0 if module.precision == "fp8" else 1].append(f"{hidden}/{width}")
    parts = [f"fp8 layers ({policy.name}: {policy.rule()}): {len(fp8)} of {len(fp8) + len(small)} linear layers"
             + (f" ({_kinds(fp8)})" if fp8 else "")]
    for label, (on, off) in experts.items():
        parts.append(f"{label} of {len(on)} of {len(on) + len(off)} MoE layers"
                     + (f" (hidden/width {', '.join(sorted(set(on)))})" if on else ""))
    line = "; ".join(parts)
    kept = ([_kinds(small)] if small else []) + [f"{label} {', '.join(sorted(set(off)))}"
                                                 for label, (_, off) in experts.items() if off]  # fmt: skip
    return line + (f"; bf16, too small for fp8 to pay: {'; '.join(kept)}" if kept else "")
