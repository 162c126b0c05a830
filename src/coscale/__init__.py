"""coscale: DeepSeek-V3's hardware-aware training and inference system, usable on one GPU or a cluster.

Table of contents:
- ``coscale.config``       ModelConfig (HF config.json keys), presets, validation
- ``coscale.hf_config``    how each HF config.json key that is not a field is read (or refused)
- ``coscale.param_count``  total / activated parameter counts by arithmetic
- ``coscale.model``        MLA, DeepSeekMoE, MTP in plain PyTorch
- ``coscale.model.state_dict``  HF tensor names <-> model names (the state-dict adapter)
- ``coscale.checkpoint``   HF-layout safetensors load/save (``from_pretrained``, ``save_pretrained``)
- ``coscale.kernels``      Triton kernels beside their PyTorch references
- ``coscale.fp8``          FP8 training recipe (1x128 / 128x128 scaling)
- ``coscale.parallel``     expert parallelism on torch.distributed
- ``coscale.train``        the training loop behind ``coscale train``
- ``coscale.analysis``     co-design analysis (pure Python)
"""

from coscale.config import ModelConfig, get_preset, load_config

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None):
    """Load an HF-format DeepSeek checkpoint directory as a coscale model (see coscale.checkpoint)."""
    from coscale.checkpoint import from_pretrained as _from_pretrained

    return _from_pretrained(path, dtype=dtype, device=device)


def save_pretrained(model, path, *, max_shard_size="2GB", fp8=False, overwrite=False):
    """Write `model` as an HF-format checkpoint directory (see coscale.checkpoint.save_pretrained)."""
    from coscale.checkpoint import save_pretrained as _save_pretrained

    _save_pretrained(model, path, max_shard_size=max_shard_size, fp8=fp8, overwrite=overwrite)


__all__ = ["ModelConfig", "get_preset", "load_config", "from_pretrained", "save_pretrained", "__version__"]
