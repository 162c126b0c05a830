"""One training step and the held-out evaluation, on the device.

The step is a function of device tensors that returns device tensors: nothing in it waits for the
device (no ``.item()``, ``.tolist()``, ``bool(tensor)`` or printing), so the host can queue the next
step while this one runs, and the whole step can later be compiled or captured in a CUDA graph.
The trainer reads its metrics a step late (:mod:`coscale.train.readout`).

Order of one step (DeepSeek-V3 report, sections 2.1.2 and 2.2): the loss (next-token + MTP + the
sequence-wise balance loss) on this rank's rows of the global batch, backward, gradients of the
global batch (``World.sync_gradients``), the clip with the whole model's norm, AdamW, then the
auxiliary-loss-free bias update from the expert loads of the global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from coscale.model.moe import update_router_biases
from coscale.parallel.world import World

# The metrics a step returns (0-d device tensors; NaN where a model has no such loss, e.g. no MTP).
LOSS_NAMES = ("loss", "total_loss", "mtp_loss", "aux_loss", "grad_norm")
# Expert-load balance of the step, worst MoE layer (see load_balance); absent for a dense model.
BALANCE_NAMES = ("moe_load_max_over_mean", "moe_load_max_over_min", "moe_all_experts_loaded", "moe_any_routed")


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """BF16 autocast for bf16 (any device) and fp8 (CUDA: the layers FP8 leaves out run in BF16)."""
    if precision == "bf16" or (precision == "fp8" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
               batch: tuple[torch.Tensor, torch.Tensor], *, gamma: float, grad_clip: float,
               autocast: Callable[[], contextlib.AbstractContextManager],
               loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step on the global ``batch`` (input ids, labels; the same on every rank).

    ``loss_fn`` is ``model.compute_loss`` or a compiled form of it. Returns :data:`LOSS_NAMES` (world
    means; the grad norm is already global) and, for an MoE model, :data:`BALANCE_NAMES` (of the
    global batch), all as 0-d tensors on the device.
    """
    input_ids, labels = (world.shard(t).to(world.device, non_blocking=True) for t in batch)
    with autocast():
        out = (loss_fn or model.compute_loss)(input_ids, labels)
    out.loss.backward()
    world.sync_gradients(model)
    grad_norm = world.clip_grad_norm_(model, grad_clip) if grad_clip else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    world.sum_router_loads(model)  # global loads: the logged statistics and every rank's bias update
    balance = load_balance(model)  # read before update_router_biases resets the counters
    update_router_biases(model, gamma=gamma)
    nan = torch.full((), float("nan"), device=out.loss.device)
    losses = torch.stack([_value(v, nan) for v in (out.main_loss, out.loss, out.mtp_loss, out.aux_loss, grad_norm)])
    metrics = dict(zip(LOSS_NAMES, world.mean(losses).unbind()))
    if balance is not None:
        metrics |= dict(zip(BALANCE_NAMES, balance.unbind()))
    return metrics


def _value(t: torch.Tensor | None, missing: torch.Tensor) -> torch.Tensor:
    return missing if t is None else t.detach().float()


def load_balance(model: nn.Module) -> torch.Tensor | None:
    """Expert-load balance of the last step, worst layer, on the device (no host sync).

    Reads the routers' ``expert_load`` counters (tokens routed since the last bias update), so it must
    run before ``update_router_biases`` resets them; None for a dense model. With several processes the
    counters are summed over the world first, so these are the global batch's statistics. Returns
    [max/mean, max/min, 1 if every expert got a token else 0, 1 if any token was routed else 0].
    """
    loads = [m.expert_load for m in model.modules() if hasattr(m, "expert_load") and m.expert_load.numel()]
    if not loads:
        return None
    stacked = torch.stack([load.float() for load in loads])  # (layers, E)
    max_mean = (stacked.amax(1) / stacked.mean(1).clamp_min(1e-9)).amax()
    mins = stacked.amin(1)
    max_min = (stacked.amax(1) / mins.clamp_min(1e-9)).amax()
    return torch.stack([max_mean, max_min, (mins > 0).all().float(), (stacked.sum() > 0).float()])


def metrics_record(values: dict[str, float]) -> dict[str, float | None]:
    """The logged form of :func:`coscale.train.step.train_step`'s values: NaN (no such loss) is None;
    load-balance statistics only when a token was routed, max/min only when every expert got one."""
    record: dict[str, float | None] = {}
    for name in LOSS_NAMES:
        value = values[name]
        record[name] = None if math.isnan(value) else value
    if values.get("moe_any_routed"):
        record["moe_load_max_over_mean"] = values["moe_load_max_over_mean"]
        record["moe_load_max_over_min"] = values["moe_load_max_over_min"] if values["moe_all_experts_loaded"] \
            else None
    return record


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], world: World,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean next-token loss (nats) of the main model over fixed held-out batches (every rank calls it
    and gets the same value; one host sync at the end)."""
    was_training = model.training
    model.eval()
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=world.device), 0.0
    for batch in batches:
        input_ids, labels, weight = world.eval_rows(*batch)
        with autocast():
            logits = model(input_ids.to(world.device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(world.device).flatten(), reduction="sum")
        loss_sum += weight * loss.double()
        count += weight * labels.numel()
    model.train(was_training)
    total, count = world.mean(torch.stack([loss_sum, loss_sum.new_tensor(count)])).tolist()
    return total / count
