"""AdamW with FP32 master weights and moments stored in FP32 or BF16.

DeepSeek-V3 (report section 3.3.2) keeps the optimizer's first and second moments in BF16 while the
master weights and their gradients' accumulation stay in FP32: the moments only steer the step size,
and BF16's 8-bit exponent covers the squared-gradient range, so halving their memory costs no
measurable accuracy. Here the parameters themselves are the FP32 master weights (the model is built
in FP32 and runs its matmuls under BF16 autocast or FP8), the update is computed in FP32, and only
the stored moments are rounded to ``moments_dtype``.

With FP32 moments :func:`build_optimizer` returns ``torch.optim.AdamW``; :class:`AdamW` below computes
the same update (tests check that) and exists for the BF16 case.

Gradient clipping's factor is applied inside the update (:func:`step_with_grad_factor`): the clip's own
pass over the gradients (read and write every FP32 gradient: 8 bytes a parameter, a third of what the
update moves with BF16 moments) was 15 ms of proxy-v3's 186-197 ms step on an H100 (BENCHMARKS.md,
thirty-second session); the update reads each gradient anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from coscale.errors import ConfigError
from coscale.model.moe import Gate

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose moment buffers are kept in ``moments_dtype``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        moments_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                              f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype
        # A 0-d tensor that multiplies every gradient inside the update (step_with_grad_factor), or None
        self.grad_factor: torch.Tensor | None = None
        # The update of one parameter, in place. The trainer's compiled step replaces it with a
        # torch.compile'd copy: one fused kernel per parameter, each byte read and written once.
        self.update_fn = adamw_update_

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.dtype != torch.float32:
            raise ConfigError(f"AdamW keeps FP32 master weights; got a {p.dtype} parameter")
        state = self.state[p]
        if not state:
            # The step count is a device tensor, like torch's capturable AdamW: a step captured in a CUDA
            # graph must read it from memory, not bake in a Python number.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
        if not torch.is_tensor(state["step"]):  # a checkpoint written when the count was a Python int
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        lr = group["lr"]
        if not torch.is_tensor(lr):
            lr = torch.tensor(lr, dtype=torch.float32, device=p.device)
        beta1, beta2 = group["betas"]
        tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if all(t.is_contiguous() for t in tensors):  # one shape for every parameter: a compiled update_fn
            tensors = tuple(t.view(-1) for t in tensors)  # compiles once, not once per parameter shape
        self.update_fn(*tensors, state["step"], lr, beta1, beta2, group["eps"], group["weight_decay"],
                       self.grad_factor)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict casts floating state to the parameter's dtype (FP32); BF16 -> FP32
        # -> BF16 is exact, so casting back restores the saved moments bit for bit.
        for param, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moments_dtype)
            if torch.is_tensor(state.get("step")):  # on the parameter's device; never the saved tensor itself
                state["step"] = state["step"].to(param.device, torch.float32, copy=True)


def adamw_update_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                  weight_decay: float, grad_factor: torch.Tensor | None = None) -> None:
    """One AdamW step of parameter ``p`` (FP32) in place; the moments may be stored in BF16. ``step`` and
    ``lr`` are 0-d tensors (``step`` is incremented here); the gradient is taken times ``grad_factor`` (a 0-d
    tensor) where one is given. FP32 arithmetic; only the stored moments are rounded."""
    step += 1
    grad = grad.float()
    if grad_factor is not None:
        grad = grad * grad_factor
    m = exp_avg.float().lerp(grad, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * grad * grad
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (v / bias2).sqrt() + eps
    p.mul_(1 - lr * weight_decay)
    p.sub_(m / denom * (lr / bias1))


def _fused_torch_adam(optimizer: torch.optim.Optimizer) -> bool:
    return (isinstance(optimizer, torch.optim.Adam) and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in optimizer.param_groups))


def clip_factor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that clips gradients of norm ``total_norm`` to ``max_norm``, torch.nn.utils.clip_grad_norm_'s
    (max_norm / (norm + 1e-6), at most 1), as a 0-d device tensor (no host synchronisation)."""
    return (max_norm / (total_norm.float() + 1e-6)).clamp(max=1.0)


def step_with_grad_factor(optimizer: torch.optim.Optimizer, factor: torch.Tensor | None) -> None:
    """``optimizer.step()`` as if every gradient had been multiplied by ``factor`` (a 0-d device tensor, such
    as gradient clipping's; None: a plain step), without a pass of its own over the gradients where the
    optimizer can take the factor into its update: coscale's :class:`AdamW` multiplies each gradient as it
    reads it, and torch's fused Adam/AdamW divides it by ``grad_scale`` (the attribute torch.amp.GradScaler
    sets for these optimizers: 1 / factor here), which may leave the gradients unscaled or scaled in
    memory. Any other optimizer gets the gradients multiplied first. No host synchronisation either way."""
    if factor is None:
        optimizer.step()
    elif isinstance(optimizer, AdamW):
        optimizer.grad_factor = factor
        try:
            optimizer.step()
        finally:
            optimizer.grad_factor = None
    elif _fused_torch_adam(optimizer):
        optimizer.grad_scale = torch.reciprocal(factor.float())
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, factor.to(device))
        optimizer.step()


def param_groups(model: nn.Module, weight_decay: float, router_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on matrices (linear layers, embeddings, stacked experts); none on norms and biases.

    With ``router_lr_scale`` other than 1 the routers' weights (coscale.model.moe.Gate) form a group of
    their own whose ``lr_scale`` multiplies the learning rate (coscale.train.step_runner.set_learning_rate);
    at 1 they stay with the other matrices, so the groups are those of earlier checkpoints."""
    routers = set()
    if router_lr_scale != 1.0:
        routers = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters(recurse=False)}
    decay, no_decay, router = [], [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (router if id(p) in routers else decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if router:
        groups.append({"params": router, "weight_decay": weight_decay, "lr_scale": router_lr_scale})
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    moments_dtype: str = "fp32",
    router_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters with moments in ``moments_dtype`` ('fp32' or 'bf16'), the routers'
    learning rate ``router_lr_scale`` times the others' (:func:`param_groups`)."""
    if moments_dtype not in MOMENT_DTYPES:
        raise ConfigError(f"adam moments dtype must be one of {', '.join(MOMENT_DTYPES)}, got {moments_dtype!r}")
    groups = param_groups(model, weight_decay, router_lr_scale)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if moments_dtype == "fp32":
        # One fused kernel per step on CUDA (torch's default there is several foreach kernels).
        fused = all(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    return AdamW(groups, lr=lr, betas=betas, eps=eps, moments_dtype=MOMENT_DTYPES[moments_dtype])
