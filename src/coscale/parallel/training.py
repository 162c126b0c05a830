"""EP x DP training on torch.distributed: what a training loop calls.

    model = DeepseekForCausalLM(cfg)                          # same seed on every rank
    model, ctx = setup_for_training(model, args)              # groups, config check, EP swap, sync
    for step ...:
        ids, labels = shard_batch(global_ids, ctx), shard_batch(global_labels, ctx)
        loss = model.compute_loss(ids, labels).loss
        loss.backward()
        sync_gradients(model, ctx)                            # before clipping and optimizer.step()
        clip_grad_norm_(model, max_norm, ctx)                 # the norm of the whole model
        optimizer.step(); optimizer.zero_grad()
        all_reduce_router_loads(model, ctx)                   # global expert loads: same bias update
        update_router_biases(model, gamma)                    #   on every rank
        log(ctx.all_reduce_mean(loss))                        # the global mean loss
    with gathered_experts(model):                             # checkpoints in the plain model's format
        model_state = model.state_dict()
    optim_state = full_optimizer_state_dict(optimizer, model) # expert moments gathered over EP

Gradient rule. Each of the W ranks holds 1/W of the global batch and backpropagates its local mean loss
L_r; the global loss is (1/W) sum_r L_r. A replicated (non-expert) parameter gets the mean of its W
local gradients: an all-reduce over the world, as DDP does. An expert parameter already receives,
through the combine's backward, the gradients of every token of its EP group; its replicas live on the
DP group, so its gradient is the DP-group sum divided by W. :func:`sync_gradients` does both with one
flattened all-reduce per kind (one bucket per dtype) after the backward pass, which also gives gradient
accumulation for free (call it once per optimizer step). FSDP2 or DDP wrappers need the trainer to
call the wrapper's ``forward``; coscale's trainer calls ``compute_loss``, so the explicit all-reduce is
the portable choice here.

Optimizer state across EP sizes. :func:`full_optimizer_state_dict` all-gathers, over the EP group, every
state tensor of an expert parameter that has the parameter's local shape (AdamW's two moments), so the
saved optimizer state has the plain model's shapes; :func:`load_optimizer_state_dict` keeps this rank's
rows of such full tensors. A training checkpoint written at one EP size (or by one process) therefore
resumes at any other, moments included.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from coscale.errors import CheckpointError, ConfigError
from coscale.parallel.expert_parallel import EXPERT_PARAMS, apply_expert_parallel, expert_parallel_modules
from coscale.parallel.groups import DEFAULT_TIMEOUT_S, ParallelContext, check_same_config, guarded, init_parallel


def is_expert_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_coscale_expert", False))


def _bucketed(op: str, tensors: list[torch.Tensor], ctx: ParallelContext, fn) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        guarded(op, lambda flat=flat: fn(flat), ctx.timeout_s)
        for t, new in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(new)


@torch.no_grad()
def broadcast_parameters(model: nn.Module, ctx: ParallelContext) -> None:
    """Make replicas identical: non-expert state from world rank 0, expert state from DP rank 0."""
    if ctx.world_size == 1:
        return
    shared = [t for t in list(model.parameters()) + list(model.buffers()) if not is_expert_param(t)]
    experts = [p for p in model.parameters() if is_expert_param(p)]
    _bucketed("broadcast(parameters)", shared, ctx,
              lambda f: dist.broadcast(f, src=0, group=ctx.world_group))
    if ctx.dp_size > 1 and experts:
        src = dist.get_global_rank(ctx.dp_group, 0)
        _bucketed("broadcast(expert parameters)", experts, ctx,
                  lambda f: dist.broadcast(f, src=src, group=ctx.dp_group))


@torch.no_grad()
def sync_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """Average gradients: non-expert over the world, expert params as DP-sum / world size."""
    if ctx.world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a parameter unused this step still takes part in the all-reduce
            p.grad = torch.zeros_like(p)
    shared = [p.grad for p in params if not is_expert_param(p)]
    experts = [p.grad for p in params if is_expert_param(p)]

    def mean_over(group):  # divide the flattened bucket once, not every gradient on its own
        return lambda flat: dist.all_reduce(flat.div_(ctx.world_size), group=group)

    _bucketed("all_reduce(gradients)", shared, ctx, mean_over(ctx.world_group))
    if ctx.dp_size > 1 and experts:
        _bucketed("all_reduce(expert gradients)", experts, ctx, mean_over(ctx.dp_group))
    elif experts:  # no replicas to sum over: only the 1 / world size
        torch._foreach_div_(experts, ctx.world_size)


@torch.no_grad()
def grad_norm(model: nn.Module, ctx: ParallelContext) -> torch.Tensor:
    """The whole (unsharded) model's gradient norm, a 0-d float32 device tensor; call after sync_gradients.

    The squared norm is the replicated parameters' (identical on every rank) plus the EP-group sum of
    the local experts'; every rank gets the same total (and so the same clipping factor).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else ctx.device

    def squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:  # torch's multi-tensor norm: one read, no copies
        if not grads:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm(grads).float().square()

    shared = squared_norm([p.grad for p in params if not is_expert_param(p)])
    experts = squared_norm([p.grad for p in params if is_expert_param(p)])
    if ctx.ep_size > 1:
        guarded("all_reduce(expert grad norm)", lambda: dist.all_reduce(experts, group=ctx.ep_group),
                ctx.timeout_s)
    return (shared + experts).sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole (unsharded) model (:func:`grad_norm`); call after
    sync_gradients. Returns the norm before clipping."""
    total = grad_norm(model, ctx)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
    return total


@torch.no_grad()
def all_reduce_router_loads(model: nn.Module, ctx: ParallelContext) -> None:
    """Sum every router's ``expert_load`` counter over the world (one flattened all-reduce).

    Call after the optimizer step and before ``update_router_biases(model, gamma)`` (without a
    process group: the loads are already global), so that every rank applies the same bias update and
    load statistics read in between are those of the global batch.
    """
    if ctx.world_size == 1:
        return
    loads = [b for name, b in model.named_buffers() if name.endswith("expert_load") and b.numel()]
    if loads:
        _bucketed("all_reduce(router loads)", loads, ctx, lambda f: dist.all_reduce(f, group=ctx.world_group))


def _expert_param_owners(model: nn.Module) -> dict[int, Any]:
    return {id(getattr(m, name)): m for m in expert_parallel_modules(model) for name in EXPERT_PARAMS}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order of the integer keys of ``optimizer.state_dict()["state"]``."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every expert parameter's per-element state gathered over the EP
    group (collective: every rank calls it). Without EP this is ``optimizer.state_dict()``."""
    state = optimizer.state_dict()
    owners = _expert_param_owners(model)
    if not owners:
        return state
    params = _optimizer_params(optimizer)
    out = {}
    for index in sorted(state["state"]):  # the same order on every rank
        entry = state["state"][index]
        p = params[index]
        owner = owners.get(id(p))
        if owner is not None:
            entry = {k: owner._gather_full(v.detach()) if torch.is_tensor(v) and v.shape == p.shape and v.dim()
                     else v for k, v in entry.items()}
        out[index] = entry
    return {"state": out, "param_groups": state["param_groups"]}


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any]) -> None:
    """Load a (full, plain-model) optimizer state: expert state tensors keep this rank's rows."""
    owners = _expert_param_owners(model)
    if owners:
        params = _optimizer_params(optimizer)
        local = {}
        for index, entry in state["state"].items():
            p = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
            owner = owners.get(id(p)) if p is not None else None
            if owner is not None:
                entry = dict(entry)
                for k, v in entry.items():
                    if not (torch.is_tensor(v) and v.dim() == p.dim() and v.shape[1:] == p.shape[1:]):
                        continue
                    if v.shape[0] == owner.n_experts:
                        entry[k] = v[owner.first_expert:owner.first_expert + owner.n_local]
                    elif v.shape[0] != owner.n_local:
                        raise CheckpointError(
                            f"optimizer state {k!r} of an expert parameter has {v.shape[0]} rows; expected "
                            f"{owner.n_experts} (full) or {owner.n_local} (this rank's slice)"
                        )
            local[index] = entry
        state = {"state": local, "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)


def shard_batch(batch: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Rank r's rows of a global batch [B, ...] (B divisible by the world size)."""
    if batch.shape[0] % ctx.world_size:
        raise ConfigError(f"global batch {batch.shape[0]} is not divisible by the world size {ctx.world_size}")
    n = batch.shape[0] // ctx.world_size
    return batch[ctx.rank * n:(ctx.rank + 1) * n]


def setup_for_training(model: nn.Module, args: Any = None) -> tuple[nn.Module, ParallelContext]:
    """Process groups from torchrun's environment, config check, EP swap, replica sync.

    ``args`` (an argparse namespace, a dict or None) may carry: ``ep_size`` (default: world size),
    ``gpus_per_node`` (virtual nodes; default: real hosts), ``dispatch_codec`` ("bf16"/"fp8"),
    ``combine_codec``, ``two_hop`` (node-limited two-hop route), ``dist_timeout`` (seconds), ``backend``.
    """
    def get(key: str, default: Any = None) -> Any:
        if args is None:
            return default
        value = args.get(key, default) if isinstance(args, dict) else getattr(args, key, default)
        return default if value is None else value

    ctx = init_parallel(
        ep_size=get("ep_size") or int(os.environ.get("WORLD_SIZE", "1")),
        gpus_per_node=get("gpus_per_node"),
        backend=get("backend"),
        timeout_s=float(get("dist_timeout", DEFAULT_TIMEOUT_S)),
    )
    config = getattr(model, "config", None)
    if config is not None:
        check_same_config(config, timeout_s=ctx.timeout_s)
        n_experts = getattr(config, "n_routed_experts", None)
        if n_experts:
            ctx.dims.check_divides_experts(n_experts)
    if ctx.ep_size > 1:  # slice first, so only this rank's experts reach the device
        apply_expert_parallel(
            model, ctx,
            dispatch_codec=get("dispatch_codec", "bf16"),
            combine_codec=get("combine_codec", "bf16"),
            two_hop=bool(get("two_hop", False)),
        )
    model.to(ctx.device)
    broadcast_parameters(model, ctx)
    return model, ctx
