"""The DeepSeek-V3 decoder: embedding, L blocks (MLA + dense FFN or DeepSeekMoE), norm, head, MTP.

Multi-Token Prediction (report section 2.2): D sequential modules; module k combines the previous
depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = W_eh [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)],   h^k = Block_k(h'),
    logits^k = Head(RMSNorm_k(h^k))  predicting t_{i+k+1},
with the embedding and output head shared with the main model, and loss
L = L_main + lambda / D * sum_k L_MTP^k. h^0 is the main model's last hidden state before its final
norm. At inference the MTP modules are skipped (or used as draft heads for speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coscale.config import ModelConfig
from coscale.model.mla import MLA, LatentKVCache, PagedAttentionMetadata
from coscale.model.moe import MLP, MoE
from coscale.model.norm import RMSNorm, upcast
from coscale.model.rope import RotaryEmbedding

IGNORE_INDEX = -100


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labels that are not ignored; 0 when all are (F.cross_entropy's
    mean would be 0/0 = NaN there, and testing for that case first would wait for the device)."""
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, start_pos: int = 0, cache: LatentKVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, x, cos, sin, meta: PagedAttentionMetadata):
        """x (1, N, H): a flat batch of tokens over the paged cache (MLA.forward_paged)."""
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        # MTP blocks use the last decoder layer's FFN kind (MoE in DeepSeek-V3).
        self.block = Block(cfg, layer_idx, moe=cfg.is_moe_layer(cfg.num_hidden_layers - 1))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, h_prev, emb_next, cos, sin, start_pos: int = 0, cache=None):
        """h_prev, emb_next: (B, S, H) -> h^k (B, S, H), before this module's output norm."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, start_pos, cache)

    def forward_paged(self, h_prev, emb_next, cos, sin, meta: PagedAttentionMetadata):
        """The same over a flat batch (1, N, H) with the paged cache (cache layer L + k)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block.forward_paged(h, cos, sin, meta)


class DecoderStack(nn.Module):
    """HF's `model.*`: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(cfg)
        self.init_weights()

    # ---- initialisation -----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for weights, ones for norms, zeros for biases and router biases."""
        std = self.config.initializer_range
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.device.type == "meta":
                    continue
                if isinstance(module, RMSNorm):
                    p.fill_(1.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute buffers that checkpoints do not hold; needed after `to_empty`."""
        if self.rotary.inv_freq.device.type != "meta":
            self.rotary.init_buffers()
        for module in self.modules():
            if hasattr(module, "expert_load") and module.expert_load.device.type != "meta":
                module.expert_load.zero_()
                module.input_alignment.zero_()

    # ---- forward ---------------------------------------------------------------------
    def hidden_states(self, input_ids, start_pos: int = 0, cache: LatentKVCache | None = None):
        """Last hidden state before the final norm, (B, S, H)."""
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq], got shape {tuple(input_ids.shape)}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(start_pos, input_ids.shape[1])
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos, cache)
        return x

    def hidden_states_paged(self, input_ids: torch.Tensor, positions: torch.Tensor,
                            meta: PagedAttentionMetadata) -> torch.Tensor:
        """Serving forward: input_ids [N] and positions [N] of a flat batch of many sequences (decode
        tokens first, then prefill chunks; see PagedAttentionMetadata), reading and writing the paged
        latent cache. Returns the last hidden states before the final norm, (N, H)."""
        x = self.model.embed_tokens(input_ids).unsqueeze(0)
        cos, sin = self.rotary.at(positions)
        for layer in self.model.layers:
            x = layer.forward_paged(x, cos, sin, meta)
        return x[0]

    def mtp_hidden_states_paged(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor,
                                positions: torch.Tensor, meta: PagedAttentionMetadata) -> torch.Tensor:
        """MTP module `depth` (0-based) over a flat batch: h_prev (N, H) the previous depth's hidden
        states at `positions`, next_ids [N] the tokens `depth + 1` positions later; returns (N, H)
        before the module's norm (its logits: self.logits(h, self.mtp[depth].norm))."""
        emb = self.model.embed_tokens(next_ids).unsqueeze(0)
        cos, sin = self.rotary.at(positions)
        return self.mtp[depth].forward_paged(h_prev.unsqueeze(0), emb, cos, sin, meta)[0]

    def logits(self, h: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """Output head over hidden states: lm_head(norm(h)), with the main model's final norm by default
        (MTP modules pass their own); at least float32."""
        return upcast(self.lm_head((norm or self.model.norm)(h)))

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0,
                cache: LatentKVCache | None = None) -> torch.Tensor:
        """Main-model logits [B, S, V] (float32). With a cache, decodes at start_pos (absorbed MLA)."""
        return self.logits(self.hidden_states(input_ids, start_pos, cache))

    def mtp_logits(self, h_main: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every MTP depth k: position i predicts token i + k + 1 (last k positions invalid)."""
        cos, sin = self.rotary(0, input_ids.shape[1])
        emb = self.model.embed_tokens(input_ids)
        h, out = h_main, []
        for k, module in enumerate(self.mtp, start=1):
            emb_next = torch.roll(emb, shifts=-k, dims=1)  # position i sees token i + k
            h = module(h, emb_next, cos, sin)
            out.append(self.logits(h, module.norm))
        return out

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Next-token cross-entropy (labels[i] is the target of position i; -100 ignored), plus the
        MTP loss (weight mtp_loss_weight / D) and the sequence-wise balance loss of every MoE layer."""
        h = self.hidden_states(input_ids)
        logits = self.logits(h)
        main = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss, mtp_loss = main, None
        if len(self.mtp) and self.training:
            losses = []
            for k, mtp_logit in enumerate(self.mtp_logits(h, input_ids), start=1):
                if k >= labels.shape[1]:
                    break  # sequence too short for this depth: no position has a target
                shifted = torch.full_like(labels, IGNORE_INDEX)
                shifted[:, :-k] = labels[:, k:]
                losses.append(_mean_cross_entropy(mtp_logit, shifted))
            if losses:
                mtp_loss = torch.stack(losses).mean()
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        aux = []
        for m in self.modules():
            if isinstance(m, MoE) and m.aux_loss is not None:
                aux.append(m.aux_loss)
                m.aux_loss = None  # held past this call it would keep the step's autograd graph alive
        aux_loss = torch.stack(aux).sum() if aux else None
        if aux_loss is not None:
            loss = loss + aux_loss
        return LossOutput(loss=loss, main_loss=main.detach(), mtp_loss=mtp_loss, aux_loss=aux_loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
