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
