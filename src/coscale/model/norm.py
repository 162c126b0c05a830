"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32 (norms stay high precision)."""

import torch
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs; float32/float64 inputs keep their precision."""
    return x.float() if x.element_size() < 4 else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = upcast(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(x.dtype) * x).to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def apply_keeping_float32(module: nn.Module, fn, names: tuple[str, ...]) -> None:
    """After `module._apply(fn)` (e.g. `.to(torch.bfloat16)`), restore float32 for the named buffers,
    moved to their new device. Used for the RoPE frequencies and the router's correction bias, which
    DeepSeek keeps in float32 whatever the weights' dtype."""
    saved = {n: getattr(module, n) for n in names}
    nn.Module._apply(module, fn)
    for n, old in saved.items():
        new = getattr(module, n)
        if new is None or old is None:
            continue
        if old.device.type == "meta" or new.device.type == "meta":
            setattr(module, n, new.float())
        else:
            setattr(module, n, old.to(device=new.device, dtype=torch.float32))
