"""Loading a checkpoint for inference (FP8 weights kept in FP8)."""

from __future__ import annotations

import torch


def load_for_inference(path: str, dtype: torch.dtype, device: torch.device):
    from coscale.infer.commands import load_model

    return load_model(path, dtype, device).eval()
