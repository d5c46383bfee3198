"Rotary position embeddings (chapter 4) against transformers' LlamaRotaryEmbedding and apply_rotary_pos_emb."
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llama2_edu.rope import apply_rotary_emb, permute_from_hf, permute_to_hf, precompute_freqs_cis


def _hf_cos_sin(head_dim, n_heads, theta, positions):
    config = LlamaConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])  # (1, seqlen, head_dim) each


def _vectors_to_hf(t):
    "Meta-layout q/k (bsz, seqlen, n_heads, head_dim) -> HF layout (bsz, n_heads, seqlen, head_dim), dims permuted."
    bsz, seqlen, n_heads, head_dim = t.shape
    rows = t.reshape(bsz * seqlen, n_heads * head_dim).T              # each q/k dimension is a "row"
    return permute_to_hf(rows, n_heads).T.reshape(bsz, seqlen, n_heads, head_dim).transpose(1, 2)


@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads,theta,start_pos",
                         [(64, 9, 3, 1e5, 0), (128, 4, 4, 1e4, 37), (16, 8, 2, 500000.0, 1000)])
def test_apply_rotary_emb_equals_transformers(head_dim, n_heads, n_kv_heads, theta, start_pos):
    torch.manual_seed(0)
    bsz, seqlen = 2, 7
    xq, xk = torch.randn(bsz, seqlen, n_heads, head_dim), torch.randn(bsz, seqlen, n_kv_heads, head_dim)
    freqs_cis = precompute_freqs_cis(head_dim, 2048, theta)
    q, k = apply_rotary_emb(xq, xk, freqs_cis[start_pos : start_pos + seqlen])
    cos, sin = _hf_cos_sin(head_dim, n_heads, theta, torch.arange(start_pos, start_pos + seqlen))
    hq, hk = apply_rotary_pos_emb(_vectors_to_hf(xq), _vectors_to_hf(xk), cos, sin)
    torch.testing.assert_close(_vectors_to_hf(q), hq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_vectors_to_hf(k), hk, atol=1e-5, rtol=1e-5)


def test_weight_permutation_gives_identical_attention_scores():
    torch.manual_seed(0)
    dim, n_heads, head_dim, seqlen = 96, 3, 32, 9
    wq, wk, x = torch.randn(n_heads * head_dim, dim), torch.randn(n_heads * head_dim, dim), torch.randn(1, seqlen, dim)
    q = (x @ wq.T).view(1, seqlen, n_heads, head_dim)
    k = (x @ wk.T).view(1, seqlen, n_heads, head_dim)
    q, k = apply_rotary_emb(q, k, precompute_freqs_cis(head_dim, seqlen, 1e4))
    meta_scores = torch.einsum("bmhd,bnhd->bhmn", q, k)
    cos, sin = _hf_cos_sin(head_dim, n_heads, 1e4, torch.arange(seqlen))
    hq = (x @ permute_to_hf(wq, n_heads).T).view(1, seqlen, n_heads, head_dim).transpose(1, 2)
    hk = (x @ permute_to_hf(wk, n_heads).T).view(1, seqlen, n_heads, head_dim).transpose(1, 2)
    hq, hk = apply_rotary_pos_emb(hq, hk, cos, sin)
    torch.testing.assert_close(meta_scores, hq @ hk.transpose(-1, -2), atol=1e-3, rtol=1e-4)


def test_precompute_freqs_cis_equals_transformers_cos_sin():
    for head_dim, theta in [(64, 1e5), (128, 1e4)]:
        end = 4096
        freqs_cis = precompute_freqs_cis(head_dim, end, theta)
        assert freqs_cis.shape == (end, head_dim // 2) and freqs_cis.dtype == torch.complex64
        cos, sin = _hf_cos_sin(head_dim, 2, theta, torch.arange(end))
        half = head_dim // 2
        torch.testing.assert_close(cos[0, :, :half], cos[0, :, half:])  # HF writes each angle twice
        torch.testing.assert_close(freqs_cis.real, cos[0, :, :half], atol=1e-5, rtol=0)
        torch.testing.assert_close(freqs_cis.imag, sin[0, :, :half], atol=1e-5, rtol=0)
        theta_i = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / head_dim)
        torch.testing.assert_close(torch.angle(freqs_cis[1]).double(), theta_i, atol=1e-6, rtol=1e-6)


def test_score_depends_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 64
    freqs_cis = precompute_freqs_cis(head_dim, 4096, 1e4)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    qr, kr = apply_rotary_emb(q.expand(1, 4096, 1, head_dim), k.expand(1, 4096, 1, head_dim), freqs_cis)
    qr, kr = qr[0, :, 0], kr[0, :, 0]  # q and k rotated at every position, (4096, head_dim)
    for offset in [0, 1, 5, 100, 1000]:
        m = torch.tensor([0, 3, 250, 2000, 4095 - offset])
        scores = (qr[m] * kr[m + offset]).sum(-1)
        torch.testing.assert_close(scores, scores[:1].expand(len(m)), atol=2e-3, rtol=1e-4)
    assert not math.isclose((qr[0] @ kr[5]).item(), (qr[0] @ kr[6]).item(), abs_tol=1e-2)


def test_rotation_of_one_pair_is_the_rotation_matrix():
    freqs_cis = precompute_freqs_cis(2, 10, 10000.0)
    x = torch.tensor([0.3, -1.2]).expand(1, 10, 1, 2)
    out, _ = apply_rotary_emb(x, x, freqs_cis)
    for m in range(10):
        c, s = math.cos(m), math.sin(m)
        expected = torch.tensor([[c, -s], [s, c]]) @ torch.tensor([0.3, -1.2])
        torch.testing.assert_close(out[0, m, 0], expected, atol=1e-5, rtol=1e-5)


def test_permutations_are_inverse_row_permutations():
    torch.manual_seed(0)
    for n_heads, head_dim in [(1, 8), (9, 64), (3, 64)]:
        w = torch.randn(n_heads * head_dim, 5)
        assert torch.equal(permute_from_hf(permute_to_hf(w, n_heads), n_heads), w)
        assert torch.equal(permute_to_hf(permute_from_hf(w, n_heads), n_heads), w)
        idx = permute_to_hf(torch.arange(n_heads * head_dim, dtype=torch.float64)[:, None], n_heads).flatten().long()
        assert sorted(idx.tolist()) == list(range(n_heads * head_dim))  # a permutation of rows
    idx = permute_to_hf(torch.arange(8.0)[:, None], 1).flatten().long().tolist()
    assert idx == [0, 2, 4, 6, 1, 3, 5, 7]  # Meta's pair (2i, 2i+1) -> HF's (i, i + d/2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_fp32_and_cast_back(dtype):
    torch.manual_seed(0)
    xq, xk = torch.randn(1, 5, 4, 32), torch.randn(1, 5, 2, 32)
    freqs_cis = precompute_freqs_cis(32, 5, 1e4)
    xq, xk = xq.to(dtype), xk.to(dtype)
    q32, k32 = apply_rotary_emb(xq.float(), xk.float(), freqs_cis)  # the same inputs, in fp32
    q, k = apply_rotary_emb(xq, xk, freqs_cis)
    assert q.dtype == k.dtype == dtype
    assert torch.equal(q, q32.to(dtype)) and torch.equal(k, k32.to(dtype))  # computed in fp32, cast back
