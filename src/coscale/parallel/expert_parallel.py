"""Expert parallelism applied to a plain model: swap each routed-experts module for one that holds only
this rank's experts and reaches the others through dispatch / combine.

The model does not know it is sharded (torchtitan's rule): :func:`apply_expert_parallel` finds every
module shaped like ``coscale.model.moe.GroupedExperts`` (parameters ``w_gate [E, I, H]``,
``w_up [E, I, H]``, ``w_down [E, H, I]`` and ``forward(x, topk_idx, topk_weight)``), builds an
:class:`ExpertParallelExperts` with rows ``[ep_rank * E_l, (ep_rank + 1) * E_l)`` of those tensors, and
puts it in its place. The gate, shared experts and everything else are untouched.

Checkpoints keep the plain model's names and shapes:

- ``state_dict()`` all-gathers the expert tensors over the EP group (every EP rank must call it; rank 0
  writes) and ``load_state_dict`` accepts the full ``[E, ...]`` tensors and keeps its slice, so a
  checkpoint saved at one EP size loads at any other, and into the plain model. A shard of exactly
  ``[E_l, ...]`` rows is loaded as it is.
- ``state_dict(keep_vars=True)`` returns the live local parameters ``[E_l, ...]`` (no communication):
  in-place loaders such as ``coscale.checkpoint.load_checkpoint(model, path,
  expert_range=local_expert_range(model))`` fill them directly.
- ``with gathered_experts(model):`` (entered on every EP rank) gathers once and makes every
  ``state_dict`` call return the full tensors without communicating, so rank 0 alone can run
  ``coscale.checkpoint.save_pretrained(model, path)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from coscale.errors import CheckpointError, ConfigError
from coscale.kernels.fp8_weight_cache import weight_cache_of
from coscale.parallel.dispatch import combine, dispatch
from coscale.parallel.groups import guarded
from coscale.parallel.routes import Topology, Traffic, topology

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


def local_experts_forward(x: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate: torch.Tensor,
                          w_up: torch.Tensor, w_down: torch.Tensor, impl: str = "auto",
                          precision: str = "bf16", cache_fp8_weights: bool = False) -> torch.Tensor:
    """x [R, H] grouped by local expert (``tokens_per_expert`` rows each) -> down(silu(gate x) * up x).

    As in GroupedExperts: ``impl`` "grouped" (or "auto" on CUDA) or ``precision`` "fp8" calls
    coscale.kernels.moe.grouped_experts_forward with one unit-weight expert per row; otherwise a loop
    over the contiguous per-expert segments.
    """
    use_grouped = precision == "fp8" or impl == "grouped" or (impl == "auto" and x.is_cuda)
    if use_grouped:
        from coscale.kernels.moe import grouped_experts_forward

        e_local = tokens_per_expert.numel()
        local_idx = torch.repeat_interleave(torch.arange(e_local, device=x.device), tokens_per_expert)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        return grouped_experts_forward(x, local_idx.unsqueeze(1), ones, w_gate, w_up, w_down,
                                       precision=precision, fp8_weight_cache=cache_fp8_weights)
    outs = []
    for e, xe in enumerate(torch.split(x, tokens_per_expert.tolist())):
        h = nn.functional.silu(xe @ w_gate[e].to(x.dtype).T) * (xe @ w_up[e].to(x.dtype).T)
        outs.append(h @ w_down[e].to(x.dtype).T)
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])


class ExpertParallelExperts(nn.Module):
    """Routed experts sharded over an EP group: same forward contract as GroupedExperts."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, ep: Any, *,
                 dispatch_codec: Any = "bf16", combine_codec: Any = "bf16", two_hop: bool = False,
                 impl: str = "auto", precision: str = "bf16", micro_batches: int = 1, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.topology: Topology = topology(ep)
        if n_experts % self.topology.size:
            raise ConfigError(
                f"expert-parallel size {self.topology.size} does not divide the {n_experts} routed "
                "experts; choose an EP size that divides n_routed_experts"
            )
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        self.n_local = n_experts // self.topology.size
        self.first_expert = self.topology.rank * self.n_local
        self.dispatch_codec, self.combine_codec = dispatch_codec, combine_codec
        self.two_hop, self.impl, self.precision = two_hop, impl, precision
        self.micro_batches = micro_batches  # > 1: overlap one micro-batch's all-to-all with another's compute
        self.fp8_weight_cache = False  # as GroupedExperts.fp8_weight_cache
        self.traffic = Traffic()  # payload bytes sent by the dispatches of this module
        kw = {"dtype": dtype, "device": device}
        self.w_gate = nn.Parameter(torch.empty(self.n_local, intermediate, hidden, **kw))
        self.w_up = nn.Parameter(torch.empty(self.n_local, intermediate, hidden, **kw))
        self.w_down = nn.Parameter(torch.empty(self.n_local, hidden, intermediate, **kw))
        for p in (self.w_gate, self.w_up, self.w_down):
            p._coscale_expert = True  # gradient sync: replicated over DP only
        self._full: dict[str, torch.Tensor] | None = None  # set inside gathered_experts()

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.n_local - 1} of {self.n_experts}, "
                f"ep={self.topology.size}, dispatch={self.dispatch_codec}, combine={self.combine_codec}, "
                f"two_hop={self.two_hop}")

    def compute(self, recv: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return local_experts_forward(recv, tokens_per_expert, self.w_gate, self.w_up, self.w_down,
                                     self.impl, self.precision, weight_cache_of(self))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        if self.micro_batches > 1:
            from coscale.parallel.overlap import overlapped_experts_forward

            return overlapped_experts_forward(self, x, topk_idx, topk_weight, self.micro_batches)
        recv, meta = dispatch(x, topk_idx, topk_weight, self.topology, self.n_experts,
                              self.dispatch_codec, self.combine_codec, self.two_hop, self.traffic)
        return combine(self.compute(recv, meta.tokens_per_expert), meta)

    # ---- checkpoints: full expert tensors on save, this rank's slice on load ----------------------
    def _gather_full(self, t: torch.Tensor) -> torch.Tensor:
        if self.topology.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.topology.size)]
        guarded("all_gather(experts for state_dict)",
                lambda: dist.all_gather(parts, t.contiguous(), group=self.topology.group),
                self.topology.timeout_s)
        return torch.cat(parts)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in EXPERT_PARAMS:
            t = getattr(self, name)
            if self._full is not None:
                destination[prefix + name] = self._full[name]
            elif keep_vars:
                destination[prefix + name] = t
            else:
                destination[prefix + name] = self._gather_full(t.detach())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in EXPERT_PARAMS:
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            src, dst = state_dict[key], getattr(self, name)
            if src.shape[0] == self.n_experts and src.shape[1:] == dst.shape[1:]:
                src = src[self.first_expert:self.first_expert + self.n_local]
            if src.shape != dst.shape:
                error_msgs.append(
                    f"{key}: checkpoint shape {tuple(src.shape)} is neither the full [{self.n_experts}, ...] "
                    f"nor this rank's [{self.n_local}, ...] slice of {tuple(dst.shape)}"
                )
                continue
            with torch.no_grad():
                dst.copy_(src)


def is_grouped_experts(module: nn.Module) -> bool:
    """Duck-typed: a module owning 3-D w_gate/w_up/w_down parameters (coscale's GroupedExperts)."""
    params = dict(module.named_parameters(recurse=False))
    return (not isinstance(module, ExpertParallelExperts)
            and all(n in params and params[n].dim() == 3 for n in EXPERT_PARAMS))


def apply_expert_parallel(model: nn.Module, ep: Any, **options: Any) -> nn.Module:
    """Replace every GroupedExperts of ``model`` (in place) by an ExpertParallelExperts holding this
    rank's slice of its weights. ``options`` go to ExpertParallelExperts (codecs, two_hop, impl)."""
    topo = topology(ep)
    targets = [(name, m) for name, m in model.named_modules() if is_grouped_experts(m)]
    if not targets:
        raise ConfigError("apply_expert_parallel: the model has no routed-experts module (w_gate/w_up/w_down)")
    for name, module in targets:
        n_experts, intermediate, hidden = module.w_gate.shape
        opts = {"impl": getattr(module, "impl", "auto"), "precision": getattr(module, "precision", "bf16"),
                **options}
        sharded = ExpertParallelExperts(n_experts, hidden, intermediate, topo, dtype=module.w_gate.dtype,
                                        device=module.w_gate.device, **opts)
        sharded.load_state_dict(module.state_dict())
        sharded.fp8_weight_cache = getattr(module, "fp8_weight_cache", False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not child:
            raise ConfigError("apply_expert_parallel needs the experts to be a submodule, not the model")
        setattr(parent, child, sharded)
    return model


def expert_parallel_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def local_expert_range(model: nn.Module) -> range | None:
    """The global indices of this rank's experts (the same in every layer); None without EP."""
    modules = expert_parallel_modules(model)
    if not modules:
        return None
    m = modules[0]
    return range(m.first_expert, m.first_expert + m.n_local)


@contextmanager
def gathered_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Enter on every EP rank: full expert tensors are gathered once, and inside the block every
    ``state_dict`` call (any ``keep_vars``) returns them without communicating."""
    modules = expert_parallel_modules(model)
    try:
        for m in modules:
            with torch.no_grad():
                m._full = {name: m._gather_full(getattr(m, name).detach()) for name in EXPERT_PARAMS}
        yield model
    finally:
        for m in modules:
            m._full = None


def total_traffic(model: nn.Module) -> Traffic:
    total = Traffic()
    for m in expert_parallel_modules(model):
        total.add(m.traffic)
    return total


def check_loadable(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError (instead of a long RuntimeError) when a state_dict does not fit."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit the expert-parallel model: {e}") from None
