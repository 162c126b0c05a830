"""Expert-load balance in training: the paper's measure (MaxVio) and how fast the router biases move.

MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", the
measure behind the DeepSeek-V3 report's balancing ablation). For one MoE layer whose E routed experts
received L_i token slots (each token counts once for each of its K experts):

    MaxVio = max_i L_i / mean_i L_i - 1

0 is a perfectly even split; E / K - 1 is the worst case (one group of K experts takes every token),
3 for ``tiny`` (16 experts, top-4). Where the loads come from decides which MaxVio it is:

- MaxVio_batch: the loads of one training step's (global) batch. The trainer logs it per step and per
  layer, with its worst layer (``maxvio``) and its mean over layers (``maxvio_mean``).
- MaxVio_global: the loads summed over a whole held-out set (the paper's Table). The evaluation logs it
  (``val_maxvio``, ``val_maxvio_mean``, per layer).

Beside them each step logs each router's input alignment (``gate_alignment_layers``: |mean of the unit
gate inputs|^2 over the batch's tokens, this process's, coscale.model.moe.input_alignment): near 1, every
token reaches the router pointing the same way, and no bias can balance it.

Both are computed on the device from the routers' counters (:func:`load_balance`, no host sync, so it
runs inside the training step) or from hooks during evaluation (:func:`counting_expert_loads`).

Bias update speed: auxiliary-loss-free balancing moves each router bias by ``gamma`` per step
(:func:`coscale.model.moe.update_router_biases`). DeepSeek-V3's gamma = 0.001 suits ~10^5 steps; a run
of a few hundred steps needs the biases to cover the spread of the affinity scores within its warm-up,
so the default here scales with the run (:func:`default_bias_update_speed`; docs/training.md says why).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from coscale.model.moe import Gate

# Names of the balance metrics a training step returns (0-d device tensors), besides one
# ``maxvio/<layer>`` per MoE layer (see moe_gates for the layer labels).
BALANCE_NAMES = ("maxvio", "maxvio_mean", "moe_load_max_over_mean", "moe_load_max_over_min",
                 "moe_all_experts_loaded", "moe_any_routed")
PER_LAYER_PREFIX = "maxvio/"
ALIGNMENT_PREFIX = "alignment/"  # each router's input alignment (coscale.model.moe.input_alignment)


def moe_gates(model: nn.Module) -> list[tuple[str, Gate]]:
    """Every router of ``model`` with its layer's label: ``layer3`` for decoder layer 3, ``mtp1`` for the
    first MTP module's MoE (any other placement keeps its module name)."""
    gates = []
    for name, module in model.named_modules():
        if not isinstance(module, Gate):
            continue
        if m := re.search(r"(?:^|\.)layers\.(\d+)\.", name):
            label = f"layer{m.group(1)}"
        elif m := re.search(r"(?:^|\.)mtp\.(\d+)\.", name):
            label = f"mtp{int(m.group(1)) + 1}"
        else:
            label = name
        gates.append((label, module))
    return gates


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio of each row of ``loads`` [..., E] (tokens per expert): max / mean - 1, NaN where no token
    was routed. On the device, no host sync. Computed as 1 / mean(load / max) - 1 so that no sum of
    large counts can overflow float32."""
    loads = loads.float()
    peak = loads.amax(-1)
    mean_over_max = (loads / peak.clamp_min(1e-30).unsqueeze(-1)).mean(-1)  # in [1/E, 1] where peak > 0
    return torch.where(peak > 0, 1 / mean_over_max - 1, torch.full_like(peak, float("nan")))


def balance_metrics(loads: torch.Tensor, labels: list[str]) -> dict[str, torch.Tensor]:
    """The balance metrics of per-layer loads [layers, E] (rows labelled ``labels``), as 0-d device tensors:
    MaxVio of the worst layer and the mean over layers (layers that saw no token left out), MaxVio per
    layer (NaN where it saw none), and the worst layer's max/mean and max/min with two flags (every
    expert loaded; any token routed) that say where those are defined."""
    loads = loads.float()
    per_layer = max_violation(loads)  # (layers,); NaN for a layer that saw no token (MTP in evaluation)
    routed = ~per_layer.isnan()
    worst = torch.where(routed.any(), torch.where(routed, per_layer, float("-inf")).amax(), float("nan"))
    mins = loads.amin(1)
    max_min = (loads.amax(1) / mins.clamp_min(1e-9)).amax()
    values = (worst, per_layer.nanmean(), worst + 1, max_min, (mins > 0).all().float(), (loads.sum() > 0).float())
    layers = {PER_LAYER_PREFIX + label: v for label, v in zip(labels, per_layer.unbind())}
    return dict(zip(BALANCE_NAMES, values)) | layers


def load_balance(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Balance metrics (:func:`balance_metrics`) of the tokens the routers counted since the last bias
    update: the last step's batch (MaxVio_batch). Run it before ``update_router_biases`` resets the
    counters; with several processes sum the counters over the world first (``World.sum_router_loads``),
    so these describe the global batch. None for a dense model."""
    gates = moe_gates(model)
    if not gates:
        return None
    labels = [label for label, _ in gates]
    alignment = {ALIGNMENT_PREFIX + label: gate.input_alignment for label, gate in gates}
    return balance_metrics(torch.stack([gate.expert_load for _, gate in gates]), labels) | alignment


@contextlib.contextmanager
def counting_expert_loads(model: nn.Module) -> Iterator[torch.Tensor | None]:
    """Count the experts every router picks inside the block, training or not (the routers count only in
    training mode): yields a float32 [layers, E] tensor (layers in :func:`moe_gates` order) that the
    forward passes fill, or None for a dense model. Used for MaxVio_global over held-out batches."""
    gates = moe_gates(model)
    if not gates:
        yield None
        return
    first = gates[0][1]
    loads = torch.zeros(len(gates), first.n_experts, device=first.weight.device)

    def counter(row: int):
        def hook(_gate, _inputs, outputs):
            flat = outputs[0].flatten()  # topk_idx; a scatter-add, not bincount, which syncs on CUDA
            loads[row].scatter_add_(0, flat, torch.ones_like(flat, dtype=loads.dtype))
        return hook

    handles = [gate.register_forward_hook(counter(row)) for row, (_, gate) in enumerate(gates)]
    try:
        yield loads
    finally:
        for handle in handles:
            handle.remove()



# ---- how fast the router biases move ----------------------------------------------------------------

# How far a router bias should be able to move within the warm-up. Measured on tiny's default run
# (docs/training.md): the per-expert mean affinity scores spread by a standard deviation of 0.1-0.2
# (sigmoid scores in (0, 1)), and balanced biases settle at a standard deviation of 0.15-0.28 (a range
# of 0.5-0.75), so a bias travels 0.2-0.35 from zero.
BIAS_TRAVEL = 0.2
MIN_HORIZON = 10  # steps: no run moves a bias by more than BIAS_TRAVEL / 10 per step


def default_bias_update_speed(steps: int, warmup: int, long_run_gamma: float = 0.001) -> float:
    """gamma for a run of ``steps`` optimizer steps with ``warmup`` warm-up steps: fast enough that a bias
    can move by BIAS_TRAVEL within the warm-up (or the first tenth of a run without one), and never
    slower than ``long_run_gamma`` (the model config's ``bias_update_speed``: DeepSeek-V3's 0.001, which
    a run of 200 warm-up steps or more gets). 0 there keeps balancing off."""
    if long_run_gamma == 0:
        return 0.0
    return max(long_run_gamma, BIAS_TRAVEL / bias_horizon(steps, warmup))


def bias_horizon(steps: int, warmup: int) -> int:
    """The steps within which the default gamma lets a bias move by BIAS_TRAVEL: the warm-up, or the first
    tenth of a run without one, and at least MIN_HORIZON."""
    return max(warmup or steps // 10, MIN_HORIZON)


def resolve_bias_update_speed(cfg, model_cfg) -> float:
    """The gamma a run uses: ``--bias-update-speed`` when given, else :func:`default_bias_update_speed`
    (``cfg`` a TrainConfig, ``model_cfg`` its ModelConfig)."""
    if cfg.bias_update_speed is not None:
        return cfg.bias_update_speed
    return default_bias_update_speed(cfg.steps, cfg.warmup, model_cfg.bias_update_speed)
