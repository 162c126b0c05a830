"""Loading a model for inference: an HF-format checkpoint (FP8 weights kept in FP8) or a training run.

A checkpoint in DeepSeek-V3's FP8 layout stores Linear weights as float8_e4m3fn with one float32
`weight_scale_inv` per 128x128 block (coscale.checkpoint). coscale.checkpoint.from_pretrained
dequantizes them on load (what training wants); serving keeps them: every such Linear becomes an
FP8InferenceLinear and every layer of FP8 routed experts an FP8InferenceExperts holding the stacked
FP8 bytes and scales (coscale.infer.layers), so the GEMMs run in FP8 on the checkpoint's own numbers.
The rest (embeddings, norms, the router, the head, eh_proj) loads in `dtype` as usual.

The checkpoint is validated against the plain model first (coscale.checkpoint.plan_load: missing,
unexpected and mis-shaped tensors are reported before any data is read), then the model is built on
the meta device, its FP8 modules swapped, and everything is filled tensor by tensor.

A `coscale train` run directory (or one of its checkpoints) loads its latest training checkpoint into
the plain model (FP8 training keeps the parameter names of the plain model).
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from torch import nn

from coscale.errors import CheckpointError, CoscaleError
from coscale.infer.layers import BLOCK, FP8InferenceExperts, FP8InferenceLinear
from coscale.model.moe import GroupedExperts


def load_for_inference(path: str, dtype: torch.dtype, device):
    """An HF-format checkpoint directory (FP8 weights kept in FP8) or a `coscale train` run directory,
    as an eval-mode DeepseekForCausalLM on `device` in `dtype`. A model larger than the GPU's free memory
    is a CoscaleError that says so (for `coscale generate` / `serve`: one line, not a traceback)."""
    try:
        return _load(path, dtype, device)
    except torch.OutOfMemoryError as exc:
        from coscale.train.memory import GIB, device_total_bytes, oom_detail

        total = device_total_bytes(device)
        where = f"{device} ({total / GIB:.1f} GiB)" if total else str(device)
        raise CoscaleError(f"{path}: the model does not fit {where} ({oom_detail(exc)}). Use a GPU with more memory or "
                           "free this one, or an FP8 checkpoint (its block-scaled weights stay FP8: about half "
                           "the bytes of BF16)") from exc


def _load(path: str, dtype: torch.dtype, device):
    from coscale.checkpoint import CONFIG_FILE, SCALE_SUFFIX, checkpoint_weight_map, from_pretrained

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        if any(n.endswith(SCALE_SUFFIX) for n in checkpoint_weight_map(path)):
            return load_fp8(path, dtype, torch.device(device))
        return from_pretrained(path, dtype=dtype, device=device).eval()
    return _load_training_run(path, dtype, device)


def _load_training_run(path: str, dtype: torch.dtype, device):
    from coscale.config import ModelConfig
    from coscale.model.transformer import DeepseekForCausalLM
    from coscale.train import checkpointing

    meta, weights = checkpointing.load_model_state(checkpointing.resolve_checkpoint(path))
    model = DeepseekForCausalLM(ModelConfig.from_dict(meta["model_config"]))
    # FP8 training keeps the same parameter names, so its state loads into the plain model.
    model.load_state_dict(weights)
    return model.to(device=device, dtype=dtype).eval()


def _swap(model: nn.Module, module_name: str, device, dtype) -> nn.Module:
    """Replace the module that holds an FP8 weight by its FP8 serving version (once)."""
    module = model.get_submodule(module_name)
    if isinstance(module, (FP8InferenceLinear, FP8InferenceExperts)):
        return module
    if isinstance(module, nn.Linear):
        new = FP8InferenceLinear(module.in_features, module.out_features, module.bias is not None, device, dtype)
    elif isinstance(module, GroupedExperts):
        if module.hidden % BLOCK or module.intermediate % BLOCK:
            raise CheckpointError(f"{module_name}: FP8 experts need hidden and intermediate sizes that are multiples "
                                  f"of {BLOCK}, got {module.hidden} and {module.intermediate}")
        new = FP8InferenceExperts(module.n_experts, module.hidden, module.intermediate, device)
    else:
        raise CheckpointError(f"{module_name} ({type(module).__name__}) has an FP8 weight coscale cannot serve")
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


@torch.no_grad()
def load_fp8(path: str, dtype: torch.dtype, device: torch.device):
    from coscale.checkpoint import checkpoint_weight_map, load_checkpoint_config, plan_load, read_tensor_infos
    from coscale.model.state_dict import StateDictAdapter, is_mtp_layer
    from coscale.model.transformer import DeepseekForCausalLM

    cfg = load_checkpoint_config(path)
    weight_map = checkpoint_weight_map(path)
    infos = read_tensor_infos(weight_map)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    adapter = StateDictAdapter(model, cfg)
    if len(model.mtp) and not any(is_mtp_layer(name, cfg) for name in infos):
        adapter.drop_mtp()  # no MTP weights in the checkpoint: serve the main model (as from_pretrained does)
    plan = plan_load(infos, adapter)
    for item in plan:
        if item.scale_name is not None:
            _swap(model, item.target.rpartition(".")[0], device, dtype)
    adapter = StateDictAdapter(model, adapter.cfg)  # the swapped modules' tensors are real already
    for name, t in adapter.tensors.items():
        if t.device.type == "meta":
            adapter.materialize(name, torch.float32 if name.endswith("e_score_correction_bias") else dtype, device)
    handles = {}

    def read(name: str) -> torch.Tensor:
        file = weight_map[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_tensor(name)

    for item in plan:
        module_name, _, attr = item.target.rpartition(".")
        module = model.get_submodule(module_name)
        t = read(item.hf_name)
        if isinstance(module, FP8InferenceLinear) and item.scale_name is not None:
            module.load(t, read(item.scale_name))
        elif isinstance(module, FP8InferenceExperts) and item.scale_name is not None:
            getattr(module, attr)[item.expert].copy_(t)
            getattr(module, attr + "_scale_inv")[item.expert].copy_(read(item.scale_name))
        else:
            dest = getattr(module, attr)
            (dest if item.expert is None else dest[item.expert]).copy_(t)
    handles.clear()
    adapter.init_buffers(device)
    return model.eval()
