"""The kernels of one decoder layer for one micro-batch on one GPU, as timed ops (``costs``) in stages
(``overlap``): what the serving model (and the training model's forward) runs.

Shapes follow the model (:class:`ModelView`). MLA runs in two forms, as DeepSeek's inference and vLLM /
SGLang do: prefill decompresses K and V (``kv_b`` up-projection, MHA over ``qk_head_dim`` / ``v_head_dim``),
decode absorbs ``W_UK`` and ``W_UV`` into batched per-head GEMMs (BF16) and attends over the 576-wide
latent (FlashMLA). Dense GQA / MHA models project Q, K, V in one GEMM. GEMMs run in FP8 (DeepSeek's
inference), the output head in BF16.

Elementwise kernels are counted by the bytes they move per token (reads + writes):
input RMSNorm with the residual add and the FP8 quantization of its output (7 x hidden); the q/kv latent
norms (4 x (q_lora + kv_lora)); RoPE on the queries (4 x heads x rope); the FP8 quantization before the
output projection (3 x heads x v_dim); in prefill the assembly of per-head keys from the decompressed
and the shared RoPE parts (4 x heads x qk_dim); the post-attention norm (7 x hidden); router top-k; SwiGLU with the
FP8 quantization of its output (5 x k x intermediate per routed copy); and in prefill the permutation of
dispatched FP8 rows into the grouped layout (2 x k x hidden). Each kernel takes at least the kernel floor.

Traffic of one dispatch (FP8: 1 byte per number plus one FP32 scale per 128) and one combine (BF16), per
GPU: in decode (low-latency kernels) every routed copy travels over the NICs, in prefill (bulk kernels,
node-limited routing) a token crosses InfiniBand once per remote node it uses and is forwarded over NVLink
to the GPUs of that node (the paper's section 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from coscale.analysis import costs
from coscale.analysis.costs import OpTime, elementwise, gemm
from coscale.analysis.models import ModelView
from coscale.analysis.overlap import Stage
from coscale.hardware import HardwareSpec


@dataclass(frozen=True)
class Batch:
    """One micro-batch on one GPU (after the attention TP split)."""

    tokens: float  # tokens through the layer on this GPU (requests x queries in decode)
    requests: float  # sequences (decode) or prompts (prefill) in the micro-batch
    queries: float  # new tokens per request: 1 + MTP drafts in decode, the prompt in prefill
    context: int  # decode: cached tokens per request; prefill: the prompt length
    decode: bool


@dataclass(frozen=True)
class Parallel:
    ep: int
    tp: int
    redundant_experts: int
    dispatch_bytes: float = 1  # FP8 (plus a 4-byte scale per 128 numbers)
    combine_bytes: float = 2  # BF16
    kv_bytes: float = 2  # BF16 cache
    gemm_dtype: str = "fp8"  # the projections' and experts' GEMMs (the output head stays BF16)

    def local_experts(self, v: ModelView) -> int:
        return -(-(v.n_routed_experts + self.redundant_experts) // self.ep)


def attention_ops(v: ModelView, hw: HardwareSpec, b: Batch, par: Parallel) -> list[OpTime]:
    eff, T, h, dt = hw.achieved, b.tokens, v.heads / par.tp, par.gemm_dtype
    ops = [elementwise(eff, "input norm + quant", T * 7 * v.hidden_size)]
    if v.attention == "MLA":
        latent = v.kv_lora_rank + v.qk_rope_head_dim
        q_in = v.q_lora_rank or v.hidden_size
        nope = v.qk_head_dim - v.qk_rope_head_dim
        if v.q_lora_rank:
            ops.append(gemm(eff, "q_a + kv_a", T, v.q_lora_rank + latent, v.hidden_size, dtype=dt))
            ops.append(elementwise(eff, "latent norms + quant", T * 4 * (v.q_lora_rank + v.kv_lora_rank)))
        else:
            ops.append(gemm(eff, "kv_a", T, latent, v.hidden_size, dtype=dt))
        ops.append(gemm(eff, "q_b" if v.q_lora_rank else "q", T, int(h * v.qk_head_dim), q_in, dtype=dt))
        ops.append(elementwise(eff, "RoPE", T * 4 * h * v.qk_rope_head_dim))
        if b.decode:
            ops.append(gemm(eff, "absorb W_UK (bf16)", T, v.kv_lora_rank, nope, groups=int(h), dtype="bf16"))
            ops.append(costs.attention_decode(eff, "attention", b.requests, b.queries, h, b.context,
                                              latent, v.kv_lora_rank, latent * par.kv_bytes))
            ops.append(gemm(eff, "absorb W_UV (bf16)", T, v.v_head_dim, v.kv_lora_rank, groups=int(h), dtype="bf16"))
        else:
            ops.append(gemm(eff, "kv_b", T, int(h * (nope + v.v_head_dim)), v.kv_lora_rank, dtype=dt))
            ops.append(elementwise(eff, "assemble K (nope + rope)", T * 4 * h * v.qk_head_dim))
            ops.append(costs.attention_prefill(eff, "attention", b.requests, b.context, h, v.qk_head_dim,
                                               v.v_head_dim))
    else:
        kv_h = max(v.kv_heads / par.tp, 1)
        ops.append(gemm(eff, "qkv", T, int((h + 2 * kv_h) * v.qk_head_dim), v.hidden_size, dtype=dt))
        ops.append(elementwise(eff, "RoPE", T * 4 * (h + kv_h) * v.qk_head_dim))
        if b.decode:
            ops.append(costs.attention_decode(eff, "attention", b.requests, b.queries, h, b.context, v.qk_head_dim,
                                              v.v_head_dim, 2 * kv_h * v.qk_head_dim * par.kv_bytes))
        else:
            ops.append(costs.attention_prefill(eff, "attention", b.requests, b.context, h, v.qk_head_dim,
                                               v.v_head_dim))
    ops.append(elementwise(eff, "quant before o_proj", T * 3 * h * v.v_head_dim))
    ops.append(gemm(eff, "o_proj", T, v.hidden_size, int(h * v.v_head_dim), dtype=dt))
    if par.tp > 1:  # row-parallel output projection: an all-reduce inside the TP group, over NVLink
        nbytes = T * v.hidden_size * 2 * 2 * (par.tp - 1) / par.tp
        ops.append(costs.all_to_all(eff, "TP all-reduce", 0.0, nbytes))
    return ops


def ffn_ops(v: ModelView, hw: HardwareSpec, tokens: float, width: int, name: str, kind: str = "dense",
            rows_per_token: int = 1, groups: int = 1, dtype: str = "fp8") -> list[OpTime]:
    """A SwiGLU FFN (or ``groups`` experts sharing ``tokens x rows_per_token`` rows)."""
    eff, rows = hw.achieved, tokens * rows_per_token
    return [gemm(eff, f"{name} gate+up", rows, 2 * width, v.hidden_size, groups=groups, kind=kind, dtype=dtype),
            elementwise(eff, f"{name} SwiGLU + quant", rows * 5 * width),
            gemm(eff, f"{name} down", rows, v.hidden_size, width, groups=groups, kind=kind, dtype=dtype)]


def experts_touched(v: ModelView, par: Parallel, tokens: float) -> float:
    """Expected local experts that receive at least one row (only their weights are read): each of the
    ``tokens x ep`` tokens of the EP group picks ``k`` of the ``E`` experts uniformly (balanced routing),
    so a given expert is missed with probability ``(1 - k/E)^(tokens x ep)``. A decode step of one request
    on one GPU reads k experts' weights, not all of them."""
    e, k = v.n_routed_experts, v.experts_per_token
    return par.local_experts(v) * (1 - (1 - k / e) ** (tokens * par.ep))


def collectives(v: ModelView, hw: HardwareSpec, tokens: float, par: Parallel,
                decode: bool) -> tuple[OpTime | None, OpTime | None]:
    """(dispatch, combine) of ``tokens`` on one GPU; (None, None) without expert parallelism (ep 1: every
    expert is local, nothing crosses a link and no collective is launched)."""
    if par.ep == 1:
        return None, None
    eff, k, domain = hw.achieved, v.experts_per_token, hw.scale_up_domain
    per_number = {"dispatch": par.dispatch_bytes + (4 / 128 if par.dispatch_bytes < 2 else 0),
                  "combine": par.combine_bytes}
    if par.ep <= domain:  # one scale-up domain: every copy over NVLink
        out_copies, up_copies = 0.0, k * (par.ep - 1) / par.ep
    elif decode:  # low-latency kernels: each routed copy straight to its GPU over the NICs
        out_copies, up_copies = float(k), 0.0
    else:  # bulk kernels: once per remote node, then NVLink forwarding inside the node
        nodes = -(-par.ep // domain)
        nodes_hit = costs.expected_domains_hit(v.n_routed_experts, k, nodes, v.n_group, v.topk_group)
        gpus_hit = costs.expected_domains_hit(v.n_routed_experts, k, par.ep, v.n_group, v.topk_group)
        out_copies = nodes_hit * (nodes - 1) / nodes
        up_copies = gpus_hit * (domain - 1) / domain
    ops = []
    for what in ("dispatch", "combine"):
        per_copy = tokens * v.hidden_size * per_number[what]
        ops.append(costs.all_to_all(eff, what, out_copies * per_copy, up_copies * per_copy,
                                    low_latency=decode and par.ep > domain))
    return ops[0], ops[1]


def layer_stages(v: ModelView, hw: HardwareSpec, b: Batch, par: Parallel, moe: bool,
                 compute_slowdown: float = 1.0) -> tuple[Stage, ...]:
    """The stages of one layer: attention (+ router) -> dispatch; shared expert (does not wait);
    routed experts -> combine. A dense layer is attention then its FFN, with no collective."""
    eff = hw.achieved
    attention = attention_ops(v, hw, b, par)
    tokens = b.tokens / par.tp  # after the TP group's reduce-scatter each GPU carries its share
    if not moe:
        return (Stage(tuple(attention)),
                Stage(tuple([elementwise(eff, "post-attention norm + quant", tokens * 7 * v.hidden_size)]
                            + ffn_ops(v, hw, tokens, v.dense_intermediate, "dense FFN", dtype=par.gemm_dtype))))
    k = v.experts_per_token
    router = [elementwise(eff, "post-attention norm + quant", tokens * 7 * v.hidden_size),
              gemm(eff, "router (bf16)", tokens, v.n_routed_experts, v.hidden_size, dtype="bf16"),
              elementwise(eff, "top-k", tokens * v.n_routed_experts * 8)]
    experts = []
    if not b.decode:
        experts.append(elementwise(eff, "permute to grouped layout", tokens * k * v.hidden_size * 2))
    experts += ffn_ops(v, hw, tokens, v.moe_intermediate, "experts", "masked" if b.decode else "grouped",
                       rows_per_token=k, groups=experts_touched(v, par, tokens), dtype=par.gemm_dtype)
    shared = ffn_ops(v, hw, tokens, v.shared_intermediate, "shared expert", dtype=par.gemm_dtype) \
        if v.shared_experts else []
    dispatch, combine = collectives(v, hw, tokens, par, b.decode)
    slow = [op.scaled(compute_slowdown) for op in attention + router], \
        [op.scaled(compute_slowdown) for op in shared], [op.scaled(compute_slowdown) for op in experts]
    return (Stage(tuple(slow[0]), dispatch), Stage(tuple(slow[1]), waits=False), Stage(tuple(slow[2]), combine))


def head_ops(v: ModelView, hw: HardwareSpec, tokens: float, tp: int, name: str = "output head") -> list[OpTime]:
    eff = hw.achieved
    return [elementwise(eff, f"{name} norm", tokens * 4 * v.hidden_size),
            gemm(eff, f"{name} (bf16)", tokens, int(v.vocab_size / tp), v.hidden_size, dtype="bf16")]


def mtp_entry_ops(v: ModelView, hw: HardwareSpec, tokens: float) -> list[OpTime]:
    """An MTP module's own projection: two norms and ``eh_proj`` (2 x hidden -> hidden)."""
    eff = hw.achieved
    return [elementwise(eff, "MTP norms", tokens * 8 * v.hidden_size),
            gemm(eff, "MTP eh_proj", tokens, v.hidden_size, 2 * v.hidden_size)]
