"""The DeepSeek-V3 model family in plain PyTorch: read mla.py, moe.py and transformer.py top to bottom."""

from coscale.model.mla import MLA, LatentKVCache
from coscale.model.moe import Gate, GroupedExperts, MoE, experts_forward_loop, update_router_biases
from coscale.model.transformer import DeepseekForCausalLM, LossOutput

__all__ = [
    "MLA", "LatentKVCache", "Gate", "GroupedExperts", "MoE", "experts_forward_loop",
    "update_router_biases", "DeepseekForCausalLM", "LossOutput",
]
