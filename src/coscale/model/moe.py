"""DeepSeekMoE: fine-grained routed experts + shared experts (DeepSeek-V3 report section 2.1.2).

Shape legend: T tokens, H hidden, E routed experts, K experts per token, G groups, I intermediate.

Gate (for token u_t, centroid e_i = row i of the gate weight):
    s_i   = sigmoid(u_t . e_i)   (V3)   or   softmax_i(u_t . e_i)   (V2)
    choice scores  s_i + b_i     (b = e_score_correction_bias; used only to *select* experts)
    group-limited: experts split into G groups; keep the `topk_group` best groups, ranked by the sum of
    each group's top-2 choice scores (V3, `noaux_tc`) or its maximum score (V2,
    `group_limited_greedy`); `greedy` ignores groups.
    pick the top-K experts by choice score among the kept groups
    weights  g_i = s_i (without the bias), normalised over the K picks when norm_topk_prob,
             then multiplied by routed_scaling_factor (V2 files: only when not normalised).
Output: h = sum_shared FFN(u) + sum_{i in topK} g_i FFN_i(u). Dropless: every token reaches all K picks.

Balancing: auxiliary-loss-free bias updates after each optimizer step
(b_i += gamma * sign(mean load - load_i), `update_router_biases`) plus the optional sequence-wise
balance loss  L_bal = alpha * sum_i f_i P_i  with  f_i = E / (K S) * #{t : i in topK(t)},
P_i = mean_t s'_{i,t},  s' = s / sum_j s_j, per sequence and averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coscale.config import ModelConfig
from coscale.kernels import side_stream
from coscale.kernels.backend import to_autocast_dtype
from coscale.kernels.moe_decode import moe_decode, moe_decode_rows
from coscale.kernels.router import fused_router_pays, gate_scores, route, route_torch
from coscale.model.fused_weights import StackedWeights
from coscale.model.norm import apply_keeping_float32


class MLP(StackedWeights, nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def stacked_layers(self) -> tuple[nn.Module, ...]:
        """Gate and up, stacked by `stack_weights()` into one GEMM at inference."""
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked_weight is not None and not torch.is_grad_enabled():  # [gate; up] in one GEMM
            return self.down_proj(side_stream.stacked_swiglu_hidden(x, self.stacked_weight))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExpertsPrecision:
    """The switches the experts modules (GroupedExperts, SharedExperts) share: `precision` ("bf16" or "fp8",
    checked) and `fp8_weight_cache` (True -> an FP8WeightCache the module owns, False/None -> None, or a
    cache). A mixin placed before nn.Module in the bases."""

    PRECISIONS = ("bf16", "fp8")

    def __setattr__(self, name, value):
        if name == "precision" and value not in self.PRECISIONS:
            raise ValueError(f"{type(self).__name__}.precision must be one of {self.PRECISIONS}, got {value!r}")
        if name == "fp8_weight_cache":
            from coscale.kernels.fp8_weight_cache import as_weight_cache

            value = as_weight_cache(value)
        super().__setattr__(name, value)


class SharedExperts(ExpertsPrecision, MLP):
    """The shared experts of a MoE layer: every token's SwiGLU MLP, n_shared experts side by side (one MLP
    n_shared times as wide; the parameters keep MLP's names, so checkpoints load unchanged).

    `precision` "fp8" (set by coscale.fp8.convert_to_fp8 with the routed experts' size rule: `hidden` and
    `intermediate`) runs it through the routed experts' FP8 kernels as one expert that every token picks
    (coscale.kernels.fp8_moe.fp8_swiglu_mlp: each quantization fused into the kernel that produces its
    input, where three FP8Linears would quantize x, the SwiGLU output and every gradient in passes of their
    own); `fp8_weight_cache` as GroupedExperts'. "bf16" is MLP's forward."""

    FP8_LABEL = "shared experts"  # in the run header's FP8 line (coscale.fp8.describe_fp8_layers)

    def __init__(self, hidden: int, intermediate: int):
        super().__init__(hidden, intermediate)
        self.hidden, self.intermediate = hidden, intermediate
        self.precision = "bf16"
        self.fp8_weight_cache = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision != "fp8":
            return super().forward(x)
        # the autocast dtype applied outside run_kernels (the part a compiled FP8 step leaves eager), as
        # GroupedExperts does: Inductor fuses the cast into x's producer
        return self.run_kernels(to_autocast_dtype(x))

    def run_kernels(self, x: torch.Tensor) -> torch.Tensor:
        from coscale.kernels.fp8_moe import fp8_swiglu_mlp
        from coscale.kernels.fp8_weight_cache import usable_now

        out = fp8_swiglu_mlp(x.reshape(-1, x.shape[-1]), self.gate_proj.weight, self.up_proj.weight,
                             self.down_proj.weight, weight_cache=usable_now(self.fp8_weight_cache))
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, intermediate={self.intermediate}, precision={self.precision}"


class Gate(nn.Module):
    """The router. Kept in float32 (DeepSeek-V3 keeps gating in high precision)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or 1
        self.topk_method = cfg.topk_method
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        # DeepSeek-V2's published code scales only un-normalised weights; V3's scales always. The two
        # agree on every published config (V2 and V2-Lite do not normalise).
        self.scale_normalised = cfg.model_type != "deepseek_v2"
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert since the last bias update (not saved in checkpoints).
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)
        # How alike the last training batch's gate inputs point (`input_alignment`): a diagnostic.
        self.register_buffer("input_alignment", torch.zeros(()), persistent=False)
        self.backend = "auto"

    BACKENDS = ("auto", "triton", "torch")

    def __setattr__(self, name, value):
        if name == "backend" and value not in self.BACKENDS:
            raise ValueError(f"Gate.backend must be one of {self.BACKENDS}, got {value!r}")
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        apply_keeping_float32(self, fn, ("e_score_correction_bias", "expert_load", "input_alignment"))
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinity scores s [T, E] in float32 (float64 for float64 inputs)."""
        return gate_scores(x, self.weight, self.scoring_func == "sigmoid")

    def _group_limit(self) -> tuple[int, int, str]:
        """(groups, kept groups, how groups rank): `greedy` ignores groups, V3's `noaux_tc` ranks them by
        their two best scores, V2's `group_limited_greedy` by the best."""
        if self.topk_method == "greedy":
            return 1, 1, "max"
        return self.n_group, self.topk_group, "top2_sum" if self.topk_method == "noaux_tc" else "max"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [T, H] -> (topk_idx [T, K] int64, topk_weight [T, K] float32, scores [T, E] or None).

        Without gradients and outside training, on CUDA where they pay (`fused_router_pays`: decode batches
        of routers up to V2-Lite's size) or with ``backend`` "triton", coscale.kernels.router's two fused
        kernels run; they do not return the scores (None: only the training-time balance loss reads them).
        """
        normalised = self.norm_topk_prob and self.top_k > 1
        scale = self.routed_scaling_factor if (self.scale_normalised or not normalised) else None
        n_group, topk_group, rank_by = self._group_limit()
        if self._fused(x):
            idx, weights = route(
                x, self.weight, self.e_score_correction_bias, top_k=self.top_k, n_group=n_group,
                topk_group=topk_group, rank_by=rank_by, scoring=self.scoring_func, normalize=normalised,
                scale=scale, backend="auto" if self.backend == "auto" else "triton",
            )
            return idx, weights, None
        topk_idx, weights, scores = route_torch(
            x, self.weight, self.e_score_correction_bias, self.top_k, n_group, topk_group, rank_by == "top2_sum",
            self.scoring_func == "sigmoid", normalised, scale,
        )
        if self.training:
            with torch.no_grad():  # a scatter-add, not bincount: bincount sizes its output on the host
                flat = topk_idx.flatten()
                self.expert_load.scatter_add_(0, flat, torch.ones_like(flat, dtype=self.expert_load.dtype))
                self.input_alignment.copy_(input_alignment(x))
        return topk_idx, weights, scores

    def _fused(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or self.training or torch.is_grad_enabled():
            return False
        return self.backend == "triton" or (x.is_cuda and fused_router_pays(x.shape[0], *self.weight.shape))


def input_alignment(x: torch.Tensor) -> torch.Tensor:
    """|mean over tokens of x_t / |x_t| |^2 for gate inputs x [T, H], in float32: about 1/T for tokens in
    unrelated directions, 1 when every token points the same way. Then the router gives every token the same
    scores, and its bias, which shifts all tokens' scores alike, can only move the whole batch from some
    experts to others (docs/training.md, "When balancing cannot work")."""
    x = x.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return unit.mean(0).pow(2).sum()


def experts_forward_loop(x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
    """Reference routed-expert computation, one expert at a time (the test oracle).

    x [T, H], topk_idx [T, K], topk_weight [T, K]; w_gate, w_up [E, I, H]; w_down [E, H, I].
    Returns sum_k topk_weight[t, k] * FFN_{topk_idx[t, k]}(x_t) as [T, H] in x's dtype.
    """
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # never accumulate in half precision
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    # unbind once: indexing w[e] per expert would make autograd build a full-size zero gradient per expert
    gates, ups, downs = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
    for e in range(w_gate.shape[0]):
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token]
        y = (F.silu(h @ gates[e].t()) * (h @ ups[e].t())) @ downs[e].t()
        out = out.index_add(0, token, y.to(acc_dtype) * topk_weight[token, slot].unsqueeze(-1).to(acc_dtype))
    return out.to(x.dtype)


class GroupedExperts(ExpertsPrecision, nn.Module):
    """All routed experts of one layer as stacked weights (one tensor per projection).

    `impl`: "loop" (the reference above), "grouped" (permutation + grouped GEMMs from
    coscale.kernels.moe) or "auto" (grouped on CUDA, loop elsewhere). `precision`: "bf16" or "fp8"
    (FP8 always takes the grouped path). `fp8_weight_cache`: None (off) or the module's own
    coscale.kernels.fp8_weight_cache.FP8WeightCache (assign True to make one), which keeps the FP8
    copies of the expert weights between calls (inference, gradient-accumulation micro-batches; 1-2
    bytes per expert parameter) until whoever steps the optimizer calls
    coscale.fp8.invalidate_fp8_weight_caches(model) (docs/fp8.md). This is the model's single
    dispatch point into kernels.
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        self.w_gate = nn.Parameter(torch.empty(n_experts, intermediate, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, intermediate, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        self.impl = "auto"
        self.precision = "bf16"
        self.fp8_weight_cache = False
        self.decode_backend = "auto"

    IMPLS = ("auto", "loop", "grouped")
    DECODE_BACKENDS = ("auto", "triton", "torch")

    def __setattr__(self, name, value):
        if name == "impl" and value not in self.IMPLS:
            raise ValueError(f"GroupedExperts.impl must be one of {self.IMPLS}, got {value!r}")
        if name == "decode_backend" and value not in self.DECODE_BACKENDS:
            raise ValueError(f"GroupedExperts.decode_backend must be one of {self.DECODE_BACKENDS}, got {value!r}")
        super().__setattr__(name, value)  # precision and fp8_weight_cache: ExpertsPrecision

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        # Autocast does not reach the grouped GEMMs (custom ops), so apply its dtype here: without this a
        # BF16-autocast run would compute every expert in FP32 (its residual stream is FP32). The cast
        # stays outside run_kernels, the part a compiled FP8 step leaves eager, so that Inductor fuses it
        # into the producer of x (coscale.train.step_runner.keep_fp8_layers_eager).
        return self.run_kernels(to_autocast_dtype(x), topk_idx, topk_weight)

    def run_kernels(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        rows = self._decode_rows(x)
        if rows is not None:
            return moe_decode(x, topk_idx, topk_weight, self.w_gate, self.w_up, self.w_down,
                              backend="auto" if self.decode_backend == "auto" else "triton", rows=rows)
        use_grouped = self.precision == "fp8" or self.impl == "grouped" or (
            self.impl == "auto" and x.is_cuda
        )
        if not use_grouped:
            return experts_forward_loop(x, topk_idx, topk_weight, self.w_gate, self.w_up, self.w_down)
        from coscale.kernels.fp8_weight_cache import usable_now
        from coscale.kernels.moe import grouped_experts_forward

        return grouped_experts_forward(
            x, topk_idx, topk_weight, self.w_gate, self.w_up, self.w_down, precision=self.precision,
            fp8_weight_cache=usable_now(self.fp8_weight_cache),
        )

    def _decode_rows(self, x: torch.Tensor) -> str | None:
        """The row layout coscale.kernels.moe_decode runs with, or None for the general path. The kernels
        run with no gradients, not training, on 16-bit weights of x's dtype (otherwise the general path, even
        with `decode_backend` "triton"): with "triton" at every batch size ("picks" beyond the measured
        range), with "auto" on CUDA for a decode batch (`moe_decode_rows`)."""
        if (self.decode_backend == "torch" or self.training or torch.is_grad_enabled() or self.precision != "bf16"
                or self.w_gate.dtype != x.dtype or x.dtype not in (torch.bfloat16, torch.float16)):
            return None
        rows = moe_decode_rows(x.shape[0])
        if self.decode_backend == "triton":
            return rows or "picks"
        return rows if x.is_cuda else None

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, intermediate={self.intermediate}"


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i (without alpha), averaged over the batch's sequences.

    scores [B*S, E] (unnormalised affinities), topk_idx [B*S, K].
    """
    E = scores.shape[-1]
    s = scores.view(batch, -1, E)
    S = s.shape[1]
    s_norm = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    P = s_norm.mean(dim=1)  # (B, E)
    counts = torch.zeros(batch, E, device=scores.device, dtype=torch.float32)
    counts.scatter_add_(1, topk_idx.view(batch, -1), torch.ones(batch, S * top_k, device=scores.device))
    f = counts * E / (top_k * S)
    return (f * P).sum(dim=-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = (
            SharedExperts(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        )
        self.aux_loss: torch.Tensor | None = None  # set by forward in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        x_flat = x.reshape(B * S, H)
        beside = self._shared_on_side_stream(x_flat)
        if beside:  # queued on a second stream now, to run beside the router and the routed experts
            y_shared = side_stream.side_stream_swiglu(x_flat, self.shared_experts.stacked_weight,
                                                      self.shared_experts.down_proj.weight)
        topk_idx, topk_weight, scores = self.gate(x_flat)
        y = self.experts(x_flat, topk_idx, topk_weight)
        if beside:
            y = side_stream.join_side_stream_add(y, y_shared, x_flat)
        elif self.shared_experts is not None:
            y = y + self.shared_experts(x_flat)
        self.aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self.aux_loss_alpha * sequence_balance_loss(scores, topk_idx, B, self.top_k)
        return y.view(B, S, H)

    def _shared_on_side_stream(self, x_flat: torch.Tensor) -> bool:
        """Whether this call runs the shared experts on a side stream (coscale.kernels.side_stream): a CUDA decode
        batch of at most SHARED_STREAM_MAX_TOKENS tokens, without gradients, with BF16 shared experts whose gate
        and up are stacked for inference (use_decode_kernels)."""
        shared = self.shared_experts
        return (shared is not None and x_flat.is_cuda and side_stream.takes_side_stream(x_flat.shape[0])
                and not torch.is_grad_enabled() and shared.precision == "bf16" and shared.stacked_weight is not None
                and shared.stacked_weight.dtype == shared.down_proj.weight.dtype == x_flat.dtype
                and getattr(shared.down_proj, "bias", None) is None)


@torch.no_grad()
def update_router_biases(model: nn.Module, gamma: float | torch.Tensor) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i) for every router.

    Loads are the tokens counted since the last call; they are reset afterwards. With several
    data-parallel ranks, sum them first (coscale.parallel.all_reduce_router_loads) so that every rank
    applies the same update. No tokens counted means mean = load = 0 and no change, without a host sync.
    ``gamma`` is a number or a 0-d tensor (a schedule kept on the device and updated in place between
    steps, so that a captured step reads the current value; a tensor is never compared on the host).
    """
    for module in model.modules():
        if not isinstance(module, Gate):
            continue
        load = module.expert_load
        bias = module.e_score_correction_bias
        if bias is not None and (torch.is_tensor(gamma) or gamma > 0):
            step = torch.sign(load.mean() - load)
            bias.add_(step * gamma.to(bias) if torch.is_tensor(gamma) else step * gamma)
        load.zero_()
