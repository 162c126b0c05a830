"""One training step and the held-out evaluation, on the device.

The step is a function of device tensors that returns device tensors: nothing in it waits for the
device (no ``.item()``, ``.tolist()``, ``bool(tensor)`` or printing), so the host can queue the next
step while this one runs, and the whole step can later be compiled or captured in a CUDA graph.
The trainer reads its metrics a step late (:mod:`coscale.train.readout`).

Order of one step (DeepSeek-V3 report, sections 2.1.2 and 2.2): the loss (next-token + MTP + the
sequence-wise balance loss) on this rank's rows of the global batch, backward, gradients of the
global batch (``World.sync_gradients``), the clip with the whole model's norm (its factor applied inside
AdamW's update: ``optim.step_with_grad_factor``), AdamW, then the
auxiliary-loss-free bias update from the expert loads of the global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coscale.fp8 import invalidate_fp8_weight_caches
from coscale.model.moe import update_router_biases
from coscale.parallel.world import World
from coscale.train.balance import (
    ALIGNMENT_PREFIX,
    PER_LAYER_PREFIX,
    balance_metrics,
    counting_expert_loads,
    load_balance,
    moe_gates,
)
from coscale.train.optim import clip_factor, step_with_grad_factor

# The metrics a step returns (0-d device tensors; NaN where a model has no such loss, e.g. no MTP).
LOSS_NAMES = ("loss", "total_loss", "mtp_loss", "aux_loss", "grad_norm")
# An MoE model's step also returns its expert-load balance (coscale.train.balance.BALANCE_NAMES: MaxVio
# of the batch, worst layer and mean over layers, and ``maxvio/<layer>`` per MoE layer).


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """BF16 autocast for bf16 (any device) and fp8 (CUDA: the layers FP8 leaves out run in BF16)."""
    if precision == "bf16" or (precision == "fp8" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
               batch: tuple[torch.Tensor, torch.Tensor], *, gamma: float | torch.Tensor, grad_clip: float,
               autocast: Callable[[], contextlib.AbstractContextManager],
               loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step on the global ``batch`` (input ids, labels; the same on every rank).

    ``loss_fn`` is ``model.compute_loss`` or a compiled form of it. Returns :data:`LOSS_NAMES` (world
    means; the grad norm is already global) and, for an MoE model, the balance metrics of
    :func:`coscale.train.balance.load_balance` (of the global batch), all as 0-d tensors on the device.
    ``gamma`` may be a float or a 0-d device tensor (updated in place per step).
    """
    input_ids, labels = (world.shard(t).to(world.device, non_blocking=True) for t in batch)
    with autocast():
        out = (loss_fn or model.compute_loss)(input_ids, labels)
    out.loss.backward()
    world.sync_gradients(model)
    # The clip's factor goes into the optimizer's update, not a pass of its own over the gradients (optim.py)
    grad_norm = world.grad_norm(model) if grad_clip else None
    step_with_grad_factor(optimizer, None if grad_norm is None else clip_factor(grad_norm, grad_clip))
    invalidate_fp8_weight_caches(model)  # FP8 weight copies kept by modules are stale now (docs/fp8.md)
    optimizer.zero_grad(set_to_none=True)
    world.sum_router_loads(model)  # global loads: the logged statistics and every rank's bias update
    balance = load_balance(model)  # read before update_router_biases resets the counters
    update_router_biases(model, gamma=gamma)
    nan = torch.full((), float("nan"), device=out.loss.device)
    losses = torch.stack([_value(v, nan) for v in (out.main_loss, out.loss, out.mtp_loss, out.aux_loss, grad_norm)])
    metrics = dict(zip(LOSS_NAMES, world.mean(losses).unbind()))
    if balance is not None:
        metrics |= balance
    return metrics


def _value(t: torch.Tensor | None, missing: torch.Tensor) -> torch.Tensor:
    return missing if t is None else t.detach().float()


def metrics_record(values: dict[str, float]) -> dict[str, Any]:
    """The logged form of :func:`train_step`'s values: NaN (no such loss) is None; balance statistics only
    when a token was routed, max/min only when every expert got one; per-layer MaxVio as one mapping
    ``maxvio_layers`` {layer label: MaxVio}."""
    record: dict[str, Any] = {}
    for name in LOSS_NAMES:
        record[name] = _number(values[name])
    if values.get("moe_any_routed"):
        for name in ("maxvio", "maxvio_mean", "moe_load_max_over_mean"):
            if name in values:
                record[name] = _number(values[name])
        record["moe_load_max_over_min"] = values["moe_load_max_over_min"] if values["moe_all_experts_loaded"] \
            else None
        layers = per_layer_maxvio(values)
        if layers:
            record["maxvio_layers"] = layers
    alignment = {name[len(ALIGNMENT_PREFIX):]: _number(v) for name, v in values.items()
                 if name.startswith(ALIGNMENT_PREFIX)}
    if alignment:
        record["gate_alignment_layers"] = alignment
    return record


def per_layer_maxvio(values: dict[str, float]) -> dict[str, float | None]:
    """{layer label: MaxVio} from the ``maxvio/<layer>`` entries of a step's or an evaluation's values."""
    return {name[len(PER_LAYER_PREFIX):]: _number(v) for name, v in values.items() if name.startswith(PER_LAYER_PREFIX)}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass
class Evaluation:
    """The held-out evaluation: next-token loss and, for an MoE model, MaxVio_global (the loads of every
    held-out token, per MoE layer that the evaluation runs: the MTP modules do not run in evaluation)."""

    loss: float  # mean next-token loss of the main model, nats
    maxvio: float | None = None  # MaxVio_global of the worst layer
    maxvio_mean: float | None = None  # mean over layers
    maxvio_layers: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The fields of the ``"type": "eval"`` record of metrics.jsonl."""
        balance = {} if self.maxvio is None else {"val_maxvio": self.maxvio, "val_maxvio_mean": self.maxvio_mean,
                                                  "val_maxvio_layers": self.maxvio_layers}
        return {"val_loss": self.loss, **balance}


# Logits a held-out forward produces at once (256 MiB in FP32). At V3's vocabulary a 4 x 2,048 batch has
# 4 GiB of them, which a CUDA-graphed run (its pool still held) had no room for (proxy-v3, H200, run 23),
# nor for one row's 1 GiB (run 25): the output head runs over a few hundred tokens at a time.
EVAL_LOGITS_PER_CHUNK = 1 << 26


def logits_width(model: nn.Module) -> int:
    """The model's vocabulary (its output head's width); 1 when it has none that says so."""
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 1) or 1)


def _held_out_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                       autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """Summed next-token loss of rows ids [B, S]: the hidden states at once, the output head and the loss
    over at most EVAL_LOGITS_PER_CHUNK logits at a time (a model without a separate head: whole rows)."""
    width = logits_width(model)
    if not (hasattr(model, "hidden_states") and hasattr(model, "logits")):
        with autocast():
            logits = model(ids)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
    with autocast():
        h = model.hidden_states(ids)
    h, labels = h.flatten(0, 1), labels.flatten()
    tokens = max(1, EVAL_LOGITS_PER_CHUNK // width)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for h_part, lab in zip(h.split(tokens), labels.split(tokens)):
        with autocast():
            logits = model.logits(h_part)
        total += F.cross_entropy(logits.float(), lab, reduction="sum").double()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], world: World,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Evaluation:
    """Mean next-token loss (nats) of the main model over fixed held-out batches, and the MaxVio of the
    expert loads over all of them (every rank calls it and gets the same values; one host sync at the end)."""
    was_training = model.training
    model.eval()
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=world.device), 0.0
    with counting_expert_loads(model) as loads:
        for batch in batches:
            input_ids, labels, weight = world.eval_rows(*batch)
            before = loads.clone() if loads is not None and weight != 1 else None
            for ids, lab in zip(input_ids.split(1), labels.split(1)):
                loss_sum += weight * _held_out_loss_sum(model, ids.to(world.device), lab.to(world.device), autocast)
            count += weight * labels.numel()
            if before is not None:  # rows every rank evaluated: each counts 1 / world size of them
                loads.copy_(before + weight * (loads - before))
    model.train(was_training)
    sums = torch.stack([loss_sum, loss_sum.new_tensor(count)])
    if loads is None:
        total, count = world.mean(sums).tolist()
        return Evaluation(total / count)
    means = world.mean(torch.cat([sums, loads.double().flatten()]))
    balance = balance_metrics(means[2:].view(loads.shape), [label for label, _ in moe_gates(model)])
    names = ("maxvio", "maxvio_mean", *(n for n in balance if n.startswith(PER_LAYER_PREFIX)))
    read = torch.cat([means[:2], torch.stack([balance[n] for n in names]).double()]).tolist()  # the one sync
    values = dict(zip(("total", "count", *names), read))
    layers = {label: v for label, v in per_layer_maxvio(values).items() if v is not None}
    return Evaluation(values["total"] / values["count"], _number(values["maxvio"]), _number(values["maxvio_mean"]),
                      layers)
