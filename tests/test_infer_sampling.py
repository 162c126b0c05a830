"""Sampling (temperature, top-k, top-p, seeds, logprobs) and speculative sampling's accept/reject rule,
checked against plain references and statistically."""

import math

import pytest
import torch

from coscale.errors import ConfigError
from coscale.infer.sampling import SamplingParams, sample, sample_from_probs, sampling_probs, token_logprobs
from coscale.infer.speculative import one_hot_drafts, verify


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, float64, written out: temperature, then keep the top_k, then the smallest top_p set."""
    x = logits.double()
    if p.greedy:
        return torch.nn.functional.one_hot(x.argmax(), x.numel()).double()
    x = x / p.temperature
    order = x.argsort(descending=True).tolist()
    keep = order[: p.top_k] if p.top_k else order
    probs = torch.softmax(x[keep], dim=0)
    total, kept = 0.0, []
    for token, prob in zip(keep, probs.tolist()):
        if total >= p.top_p:
            break
        kept.append(token)
        total += prob
    out = torch.zeros_like(x)
    out[kept] = torch.softmax(x[kept], dim=0)
    return out


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3),
          SamplingParams(temperature=2.0, top_p=0.7), SamplingParams(temperature=0.8, top_k=5, top_p=0.5),
          SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)]


def test_sampling_probs_match_the_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(PARAMS), 11, generator=g) * 3
    logits[2, 4] = logits[2, 7]  # a tie inside the distribution
    probs = sampling_probs(logits, PARAMS)
    for row, p in enumerate(PARAMS):
        torch.testing.assert_close(probs[row].double(), reference_probs(logits[row], p), rtol=1e-5, atol=1e-6)


def test_samples_follow_the_distribution():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 40000
    tokens = sample_from_probs(probs.expand(n, -1), [None] * n, g)
    freq = torch.bincount(tokens, minlength=5).double() / n
    sigma = (probs * (1 - probs) / n).sqrt().double()
    assert (freq - probs.double()).abs().le(5 * sigma + 1e-12).all(), freq
    assert freq[4] == 0  # a zero-probability token is never drawn


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.0)] * 3

    def run(other_seed):
        gens = [torch.Generator().manual_seed(7), None, torch.Generator().manual_seed(other_seed)]
        return [sample(logits, params, gens, torch.Generator().manual_seed(other_seed)).tolist() for _ in range(5)]

    a, b = run(1), run(2)
    assert [row[0] for row in a] == [row[0] for row in b]  # the seeded row repeats
    assert [row[2] for row in a] != [row[2] for row in b]  # (5 draws from 30 tokens)


def test_greedy_rows_are_argmax_and_logprobs_are_raw():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    tokens = sample(logits, params, [None] * 4, torch.Generator().manual_seed(0))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    chosen, top = token_logprobs(logits, tokens, 3)
    logp = torch.log_softmax(logits, dim=-1)
    for row in range(4):
        assert chosen[row] == pytest.approx(logp[row, tokens[row]].item(), abs=1e-6)
        assert [t for t, _ in top[row]] == logp[row].topk(3).indices.tolist()
    assert token_logprobs(logits, tokens, 0)[1] == [[], [], [], []]


def test_vanishing_temperature_and_top_p_sample_the_most_likely_token():
    """Valid but extreme values never give NaN probabilities (whose argmax is token 0): a temperature too small
    for float32 (logits / 1e-45 overflows) samples greedily, and a top_p below float32's range (rounding to 0)
    still keeps the most likely token."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(9)) * 4
    logits[:, 0] = -10.0  # token 0 is the least likely: a NaN fallback to it would show
    params = [SamplingParams(temperature=1e-45), SamplingParams(temperature=1e-6),
              SamplingParams(temperature=1.0, top_p=1e-46), SamplingParams(temperature=0.7, top_p=1e-40, top_k=3)]
    assert all(p.greedy for p in params[:2]) and not SamplingParams(temperature=1e-4).greedy
    probs = sampling_probs(logits, params)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
    for seed in range(3):
        tokens = sample(logits, params, [None] * 4, torch.Generator().manual_seed(seed))
        assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_preserves_the_target_distribution(k):
    """Drafts drawn from q and verified against p: the first emitted token is distributed as p_0, and
    after an accepted first draft the second as p_1 (the rule of arXiv 2211.17192)."""
    g = torch.Generator().manual_seed(4)
    V, n = 5, 60000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, dim=-1)
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], dim=1)
    accepted, nxt = verify(p.expand(n, -1, -1), drafts, q.expand(n, -1, -1), [None] * n, g)
    assert ((accepted >= 0) & (accepted <= k)).all()
    emitted = torch.where(accepted >= 1, drafts[:, 0], nxt)

    def close(tokens, target):
        freq = torch.bincount(tokens, minlength=V).double() / tokens.numel()
        sigma = (target * (1 - target) / tokens.numel()).sqrt().double()
        return (freq - target.double()).abs().le(5 * sigma + 1e-12).all()

    assert close(emitted, p[0])
    if k > 1:
        second = torch.where(accepted >= 2, drafts[:, 1], nxt)[accepted >= 1]
        assert close(second, p[1])
    # the acceptance rate is sum_x min(p, q) per position
    assert (accepted >= 1).double().mean().item() == pytest.approx(torch.minimum(p[0], q[0]).sum().item(), abs=0.01)


def test_greedy_verification_is_exact():
    V = 7
    target = torch.tensor([[1, 4, 2], [1, 5, 2], [3, 3, 3]])  # the argmax at each of k + 1 = 3 rows
    drafts = torch.tensor([[1, 4], [1, 4], [0, 3]])
    p = torch.nn.functional.one_hot(target, V).float()
    accepted, nxt = verify(p, drafts, one_hot_drafts(drafts, V), [None] * 3, torch.Generator().manual_seed(0))
    assert accepted.tolist() == [2, 1, 0]
    assert nxt.tolist() == [2, 5, 3]


@pytest.mark.parametrize("field,value,msg", [
    ("max_tokens", 0, "max_tokens"), ("max_tokens", True, "max_tokens"), ("temperature", math.nan, "temperature"),
    ("temperature", -0.1, "temperature"), ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("seed", 1.5, "seed"),
    ("stop_token_ids", (1, "x"), "stop_token_ids"), ("logprobs", -1, "logprobs"),
])
def test_params_validation(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        SamplingParams(**{field: value}).validate()
    SamplingParams().validate()
