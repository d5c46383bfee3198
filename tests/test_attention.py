"Attention (chapter 5) against attention written out with explicit loops, and against transformers' LlamaAttention."
import math

import pytest
import torch

from llama2_edu.attention import Attention, attention, attention_weights, causal_mask
from llama2_edu.model_file import ModelArgs
from llama2_edu.rope import permute_to_hf, precompute_freqs_cis


def reference_attention(xq, keys, values, start_pos):
    "One query head at a time, the KV head it shares picked by integer division, future keys left out by slicing."
    bsz, n_heads, seqlen, head_dim = xq.shape
    n_kv_heads = keys.shape[1]
    out = torch.empty_like(xq)
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)
        for i in range(seqlen):
            visible = start_pos + i + 1                                  # keys 0 .. start_pos + i
            scores = torch.einsum("bd,bjd->bj", xq[:, h, i], keys[:, kv, :visible]) / math.sqrt(head_dim)  # (bsz, visible)
            out[:, h, i] = torch.einsum("bj,bjd->bd", scores.softmax(-1), values[:, kv, :visible])
    return out


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (9, 3), (8, 1)])  # MHA, GQA, MQA
def test_prefill_and_decoding_step_match_reference(n_heads, n_kv_heads):
    torch.manual_seed(0)
    bsz, seqlen, head_dim = 2, 6, 16
    xq = torch.randn(bsz, n_heads, seqlen, head_dim)
    keys, values = torch.randn(2, bsz, n_kv_heads, seqlen, head_dim)
    expected = reference_attention(xq, keys, values, start_pos=0)
    torch.testing.assert_close(attention(xq, keys, values), expected, atol=1e-5, rtol=1e-5)
    # a decoding step: the last query alone against every key, no mask
    torch.testing.assert_close(attention(xq[:, :, -1:], keys, values), expected[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_explicit_start_pos_mask_matches_reference():
    torch.manual_seed(1)
    bsz, n_heads, n_kv_heads, head_dim, start_pos, seqlen = 2, 6, 2, 8, 5, 3
    xq = torch.randn(bsz, n_heads, seqlen, head_dim)
    keys, values = torch.randn(2, bsz, n_kv_heads, start_pos + seqlen, head_dim)
    out = attention(xq, keys, values, mask=causal_mask(seqlen, start_pos))
    torch.testing.assert_close(out, reference_attention(xq, keys, values, start_pos), atol=1e-5, rtol=1e-5)


def test_causal_mask():
    mask = causal_mask(3, start_pos=2)
    assert mask.shape == (3, 5) and mask.dtype == torch.bool
    for i in range(3):
        for j in range(5):
            assert mask[i, j] == (j <= 2 + i)


def test_chunk_after_prefix_without_mask_is_refused():
    xq, keys = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 7, 4)
    with pytest.raises(ValueError, match=r"3 queries against 7 keys need an explicit mask.*causal_mask\(3, start_pos=4\)"):
        attention(xq, keys, keys)


def ours_and_transformers(n_heads, n_kv_heads):
    """Our Attention and transformers' LlamaAttention with the same weights (wq/wk rows permuted to HF's), a
    prefill input x of 7 positions, and each side's rotations and causal mask."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    torch.manual_seed(0)
    args = ModelArgs(dim=96, n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=1e4)
    ours = Attention(args).eval()
    config = LlamaConfig(hidden_size=96, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4}, attn_implementation="eager")
    theirs = LlamaAttention(config, layer_idx=0).eval()
    theirs.load_state_dict({"q_proj.weight": permute_to_hf(ours.wq.weight, n_heads),
                            "k_proj.weight": permute_to_hf(ours.wk.weight, n_kv_heads),
                            "v_proj.weight": ours.wv.weight, "o_proj.weight": ours.wo.weight})
    x = torch.randn(2, 7, 96)
    freqs_cis = precompute_freqs_cis(args.head_dim, 16, 1e4)[:7]
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(7)[None])
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]       # HF's eager path takes an additive mask
    return ours, theirs, x, freqs_cis, dict(position_embeddings=(cos, sin), attention_mask=mask)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2)])
def test_attention_module_equals_transformers(n_heads, n_kv_heads):
    "Our Attention (Meta layout, RoPE on adjacent pairs) vs LlamaAttention with the rows of wq/wk permuted to HF's."
    ours, theirs, x, freqs_cis, hf_inputs = ours_and_transformers(n_heads, n_kv_heads)
    with torch.no_grad():
        expected, _ = theirs(x, **hf_inputs)
        torch.testing.assert_close(ours(x, 0, freqs_cis), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2)])
def test_attention_weights_equal_transformers(n_heads, n_kv_heads):
    "attention_weights (chapter 5) vs the weights LlamaAttention's eager path returns, wq/wk rows permuted to HF's."
    ours, theirs, x, freqs_cis, hf_inputs = ours_and_transformers(n_heads, n_kv_heads)
    with torch.no_grad():
        _, expected = theirs(x, **hf_inputs)
    weights = attention_weights(ours, x, freqs_cis)                     # (bsz, n_heads, seqlen, seqlen)
    assert weights.shape == (2, n_heads, 7, 7)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, n_heads, 7))
