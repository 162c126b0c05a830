"""Which layers run in FP8: the per-layer policy of ``convert_to_fp8`` (torchao's ``auto_filter_small_kn``
idea, with thresholds from coscale's own measurements).

An FP8 GEMM is faster than BF16 only when it is large enough to repay its quantization passes (one read
and an FP8 write of each operand, in each direction) and, when launches are issued from Python, their
host time. On the H100 (BENCHMARKS.md, 8192 tokens, forward+backward of one layer):

| layer (K -> N) | FP8Linear / nn.Linear |
|---|---|
| o_proj 16384 -> 7168, dense MLP 7168 <-> 18432, 7168 -> 4096 | 1.25-1.46x |
| q_b_proj 1536 -> 24576 | 1.13x |
| expert_down 2048 -> 7168 | 0.57-0.93x (1.14x at 16384 tokens) |
| q_a_proj 7168 -> 1536 | 0.65x (1.05x at 16384 tokens) |
| kv_a_proj 7168 -> 576 | 0.20-0.36x |
| hidden 1024 (the ``small`` preset) | 0.5x for the whole model |

``AUTO`` therefore runs a linear layer in FP8 when both its in- and out-features are at least 4096 (every
layer measured there paid, none below it paid reliably), and the routed experts (and by the same rule the
shared experts, which run through the routed experts' kernels) when the hidden size is at least 4096 and
the expert width at least 1024 (DeepSeek-V3's 7168 / 2048: forward and dgrad grouped
FP8 GEMMs 1.3-1.5x BF16 on the H100; their weight gradients 0.9-1.1x at 256 rows per expert, more with
more rows per expert). Everything else stays in BF16, so a model too small for FP8 anywhere (``small``:
hidden 1024, experts 256 wide) trains at BF16's speed with ``--precision fp8``. ``ALL`` converts every
eligible layer (what the FP8 accuracy study and the tests want: FP8's numerics everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

from coscale.errors import CoscaleError

__all__ = ["FP8Policy", "AUTO", "ALL", "POLICIES", "as_policy", "converts_any_layer"]


@dataclass(frozen=True)
class FP8Policy:
    """Minimum sizes for FP8: a linear layer needs ``min_features`` in and out; the routed experts need
    a hidden size of ``min_expert_hidden`` and an expert width of ``min_expert_intermediate``."""

    name: str
    min_features: int = 0
    min_expert_hidden: int = 0
    min_expert_intermediate: int = 0

    def linear(self, in_features: int, out_features: int) -> bool:
        return min(in_features, out_features) >= self.min_features

    def experts(self, hidden: int, intermediate: int) -> bool:
        """Routed experts, and the shared experts (intermediate: their width together), run in FP8."""
        return hidden >= self.min_expert_hidden and intermediate >= self.min_expert_intermediate

    def rule(self) -> str:
        """The policy in words, for the run header."""
        if self.name == "all":
            return "every linear layer and the experts, whatever their size"
        return (f"linear layers with in and out features >= {self.min_features}; routed and shared experts with "
                f"hidden >= {self.min_expert_hidden} and width >= {self.min_expert_intermediate} (docs/fp8.md)")


AUTO = FP8Policy("auto", min_features=4096, min_expert_hidden=4096, min_expert_intermediate=1024)
ALL = FP8Policy("all")
POLICIES = {"auto": AUTO, "all": ALL}


def as_policy(policy: FP8Policy | str) -> FP8Policy:
    """A policy object from a policy or its name ("auto", "all")."""
    if isinstance(policy, FP8Policy):
        return policy
    if policy not in POLICIES:
        raise CoscaleError(f"FP8 layer policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    return POLICIES[policy]


def converts_any_layer(model_cfg, policy: FP8Policy | str) -> bool:
    """Whether ``convert_to_fp8(model, policy)`` turns any layer of a model with config ``model_cfg``
    (a ModelConfig) to FP8, from the layer shapes alone (no model is built)."""
    policy = as_policy(policy)
    c = model_cfg
    h, n = c.hidden_size, c.num_attention_heads
    q_out = n * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    shapes = [(h, c.kv_lora_rank + c.qk_rope_head_dim), (c.kv_lora_rank, n * (c.qk_nope_head_dim + c.v_head_dim)),
              (n * c.v_head_dim, h)]
    shapes += [(h, c.q_lora_rank), (c.q_lora_rank, q_out)] if c.q_lora_rank else [(h, q_out)]
    if c.first_k_dense_replace > 0 or not c.is_moe:
        shapes.append((h, c.intermediate_size))
    if c.num_nextn_predict_layers:
        shapes.append((2 * h, h))
    experts = c.is_moe and policy.experts(h, c.moe_intermediate_size)
    shared = c.is_moe and bool(c.n_shared_experts) and policy.experts(h, c.moe_intermediate_size * c.n_shared_experts)
    return experts or shared or any(policy.linear(k, m) for k, m in shapes)
