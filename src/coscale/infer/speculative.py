"""MTP speculative decoding in the batch: draft with the checkpoint's MTP modules, verify in one step.

DeepSeek-V3 (report sections 2.2 and 5.4.3) trains D sequential MTP modules; module j (1-based) turns
the previous depth's hidden state at position i and the embedding of token i + j into a prediction of
token i + j + 1. At inference they draft: after the main model has produced token m + 1 from position
m, module 1 at position m drafts token m + 2, module 2 (fed that draft) token m + 3, and so on, D drafts.
The next step feeds [token m + 1, drafts] to the main model as one uniform multi-token decode (S = 1 + D
query tokens per sequence, causal among them) and verifies (`verify`):

- speculative sampling (Leviathan et al., arXiv 2211.17192): draft x_i drawn from q_i is accepted with
  probability min(1, p_i(x_i) / q_i(x_i)) where p_i is the main model's distribution at that position; at
  the first rejection the token is drawn from the residual norm(max(p_i - q_i, 0)); if all D pass, a
  bonus token is drawn from p_D. The output has exactly the main model's distribution (p and q are both
  after temperature, top-k and top-p).
- greedy requests have one-hot p and q, so the same rule accepts exactly when the draft equals the
  argmax and otherwise emits the argmax: the output equals plain greedy decoding.

The MTP modules have their own cache layers (L .. L + D - 1), written at the positions each step
processes. Module 1's entries only ever see real tokens, so its drafts equal a full MTP forward over the
sequence. A deeper module's entry at the newest positions was fed drafts (the real tokens are not known
yet) and is not rewritten later: that can only cost acceptance, never correctness.
"""

from __future__ import annotations

import torch

from coscale.infer.batch import Batch
from coscale.infer.sampling import SamplingParams, random_rows, sample_from_probs, sampling_probs
from coscale.infer.transfer import to_device


def verify(target_probs: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor,
           generators: list[torch.Generator | None], default: torch.Generator | None = None):
    """Speculative sampling for B sequences with k drafts each (module docstring).

    target_probs [B, k + 1, V] (the main model at the last token and each draft), drafts [B, k] int64,
    draft_probs [B, k, V]. Returns (accepted [B] int64, next_token [B] int64): the first `accepted`
    drafts stand and next_token follows them (the residual sample, or the bonus token)."""
    B, k = drafts.shape
    p_d = target_probs[:, :k].gather(2, drafts[..., None])[..., 0]
    q_d = draft_probs.gather(2, drafts[..., None])[..., 0]
    u = random_rows((B, k), drafts.device, generators, default, kind="uniform")
    ok = u * q_d < p_d  # u < p / q without dividing by a zero q
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=drafts.device)
    residual = target_probs[rows, accepted].clone()  # the bonus distribution p_k where all passed
    rejected = accepted < k
    q_at = draft_probs[rows, accepted.clamp(max=k - 1)]
    residual = torch.where(rejected[:, None], (residual - q_at).clamp_min(0), residual)
    empty = residual.sum(dim=1, keepdim=True) <= 0  # p == q numerically: fall back to p
    residual = torch.where(empty, target_probs[rows, accepted], residual)
    return accepted, sample_from_probs(residual / residual.sum(dim=1, keepdim=True), generators, default)


def one_hot_drafts(drafts: torch.Tensor, vocab: int) -> torch.Tensor:
    """The draft distribution of greedy drafting: [B, k, V] one-hot."""
    return torch.zeros(*drafts.shape, vocab, device=drafts.device).scatter_(2, drafts[..., None], 1.0)


def mtp_next_ids(batch: Batch, extended: list[list[int]], depth: int) -> torch.Tensor:
    """Inputs of MTP module `depth` (0-based) for every row of the batch: the row at position i takes
    token i + depth + 1 of its request's extended sequence (tokens, then the drafts made so far), of
    which `extended` holds the part from position start + 1 of the step on; 0 where that is not known
    yet (rows past the last real position: their outputs are never used)."""
    ids = []
    for rows, ext in zip(batch.rows, extended):
        for j in range(depth, depth + len(rows)):
            ids.append(ext[j] if j < len(ext) else 0)
    return to_device(ids, torch.long, batch.input_ids.device)


def draft_logits(model, depth: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [R, V] of MTP module `depth` (0-based) from its hidden states h [R, H] at sequence
    `positions` [R]: the predictions for the tokens at positions + depth + 2."""
    return model.logits(h, model.mtp[depth].norm)


@torch.no_grad()
def draft(model, batch: Batch, h: torch.Tensor, extended: list[list[int]], draft_rows: list[int | None],
          params: list[SamplingParams], generators: list, default: torch.Generator | None, mtp_forward=None):
    """Run the D MTP modules over the whole batch (filling their cache layers) and draw D drafts for
    every request with a draft row (the row of its last real position).

    h (N, H): the main model's hidden states; extended: per scheduled request, its tokens from position
    start + 1 of this step on, ending with its last token where it drafts (drafts are appended in
    place). Returns, per scheduled request, (drafts, draft_probs [D, V] or
    None for greedy) or None where draft_rows is None. mtp_forward(depth, h_prev, next_ids): the MTP
    module's forward over the batch (default: the model's, eager; the engine passes its CUDA graphs')."""
    picks = [i for i, r in enumerate(draft_rows) if r is not None]
    sel = to_device([draft_rows[i] for i in picks], torch.long, h.device)  # no wait for the device (transfer.py)
    sel_params = [params[i] for i in picks]
    sel_gens = [generators[i] for i in picks]
    drafts = [[] for _ in picks]
    probs = [[] for _ in picks]
    h_prev = h
    for depth in range(len(model.mtp)):
        next_ids = mtp_next_ids(batch, extended, depth)
        if mtp_forward is None:
            h_prev = model.mtp_hidden_states_paged(depth, h_prev, next_ids, batch.positions, batch.meta)
        else:
            h_prev = mtp_forward(depth, h_prev, next_ids)
        if not picks:
            continue
        logits = draft_logits(model, depth, h_prev.index_select(0, sel), batch.positions.index_select(0, sel))
        if all(p.greedy for p in sel_params):
            tokens, dist = logits.argmax(dim=-1), None
        else:
            dist = sampling_probs(logits, sel_params)
            tokens = sample_from_probs(dist, sel_gens, default)
        for j, (i, t) in enumerate(zip(picks, tokens.tolist())):
            extended[i].append(t)
            drafts[j].append(t)
            if dist is not None:
                probs[j].append(dist[j])
    out: list = [None] * len(draft_rows)
    for j, i in enumerate(picks):
        out[i] = (drafts[j], torch.stack(probs[j]) if probs[j] and not sel_params[j].greedy else None)
    return out
