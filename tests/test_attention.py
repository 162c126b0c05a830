"""Prefill attention with unequal q/k and v dims: the Triton kernel (interpreted) and the SDPA fallback
against the PyTorch reference, over packed sequences with cached context."""

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels.attention import attention_ref, attention_sdpa, flash_attention


def packed(q_lens, k_lens, H, D, Dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), H, D, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), H, D, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), H, Dv, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


# q_len <= k_len: a prefill chunk is the last q_len positions of its sequence's k_len
SHAPES = [([5, 17, 1], [5, 40, 9]), ([33], [33]), ([3, 20], [70, 20])]


@pytest.mark.parametrize("q_lens,k_lens", SHAPES)
@pytest.mark.parametrize("D,Dv", [(48, 32), (192, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_matches_reference(q_lens, k_lens, D, Dv, causal):
    q, k, v, cu_q, cu_k = packed(q_lens, k_lens, 2, D, Dv)
    out = flash_attention(q, k, v, cu_q, cu_k, max(q_lens), D**-0.5, causal, backend="triton")
    ref = attention_ref(q, k, v, cu_q, cu_k, D**-0.5, causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lens,k_lens", SHAPES)
def test_sdpa_fallback_matches_reference(q_lens, k_lens):
    q, k, v, cu_q, cu_k = packed(q_lens, k_lens, 3, 40, 24, seed=1, dtype=torch.float64)
    out = flash_attention(q, k, v, cu_q, cu_k, max(q_lens), 0.2)  # CPU float64: the SDPA path
    torch.testing.assert_close(out, attention_ref(q, k, v, cu_q, cu_k, 0.2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention_sdpa(q, k, v, cu_q, cu_k, 0.2, False),
                               attention_ref(q, k, v, cu_q, cu_k, 0.2, False), rtol=1e-12, atol=1e-12)


def test_strided_views_and_bf16():
    """k and v as views of one decompressed projection (as MLA's prefill passes them), bf16 inputs."""
    q, k, v, cu_q, cu_k = packed([6, 12], [30, 12], 2, 48, 32, seed=2, dtype=torch.bfloat16)
    kv = torch.cat([k, v], dim=-1)
    k_view, v_view = kv.split([48, 32], dim=-1)
    out = flash_attention(q, k_view, v_view, cu_q, cu_k, 12, 0.15, backend="triton")
    ref = attention_ref(q.float(), k.float(), v.float(), cu_q, cu_k, 0.15)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_causal_structure_and_edge_values():
    """The first query of a sequence without cached context sees only itself: its output is its v."""
    q, k, v, cu_q, cu_k = packed([8], [8], 1, 32, 16, seed=3)
    q.mul_(1e3)  # saturated scores stay finite
    out = flash_attention(q, k, v, cu_q, cu_k, 8, 1.0, backend="triton")
    torch.testing.assert_close(out[0], v[0], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_ref(q, k, v, cu_q, cu_k, 1.0), rtol=1e-4, atol=1e-4)


def test_errors():
    q, k, v, cu_q, cu_k = packed([4], [4], 2, 32, 16)
    with pytest.raises(CoscaleError, match="q/k must share"):
        flash_attention(q, k[..., :16], v, cu_q, cu_k, 4, 1.0)
    with pytest.raises(CoscaleError, match="cu_seqlens"):
        flash_attention(q, k, v, cu_q, cu_k[:1], 4, 1.0)
    with pytest.raises(CoscaleError, match="at least 16"):
        flash_attention(q[..., :8], k[..., :8], v, cu_q, cu_k, 4, 1.0, backend="triton")
