"RMSNorm (chapter 3) against torch.nn.RMSNorm, LayerNorm and transformers' LlamaRMSNorm."
import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llama2_edu.model_file import gguf_state_dict
from llama2_edu.norm import RMSNorm
from llama2_edu.tokenizer import FRENCH_PROMPT

PROMPT = FRENCH_PROMPT  # the book's prompt (chapter 1)


def _pair(dim, eps, ref_cls):
    ours, ref = RMSNorm(dim, eps=eps), ref_cls(dim, eps=eps)
    with torch.no_grad():
        ours.weight.uniform_(-1.5, 1.5)
        ref.weight.copy_(ours.weight)
    return ours, ref


@pytest.mark.parametrize("shape,eps", [((3, 7, 64), 1e-5), ((1, 576), 1e-6), ((2, 2, 2, 16), 1e-2)])
def test_equals_torch_rmsnorm(shape, eps):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3
    ours, ref = _pair(shape[-1], eps, nn.RMSNorm)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_equals_hf_rmsnorm_in_half_precision_with_large_activations():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    x[..., 3] = 1000.0  # x**2 overflows float16: fp32 math must avoid it
    ours, ref = _pair(64, 1e-5, LlamaRMSNorm)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        out = ours.to(dtype)(xh)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out, ref.to(dtype)(xh))
        naive = xh * torch.rsqrt(xh.pow(2).mean(-1, keepdim=True) + 1e-5)
        if dtype == torch.float16:
            assert (naive == 0).all()  # the failure the fp32 cast prevents


def test_is_layernorm_without_mean_and_bias():
    torch.manual_seed(0)
    x = torch.randn(4, 32) + 2.0
    centred = x - x.mean(-1, keepdim=True)
    ours, ln = RMSNorm(32, eps=1e-5), nn.LayerNorm(32, eps=1e-5, bias=False)
    torch.testing.assert_close(ours(centred), ln(centred), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(x), ln(x), atol=1e-2)


def test_first_layer_attention_norm_equals_transformers(embedded_reader, hf_embedded):
    hf_model, hf_tokenizer = hf_embedded
    weights = dict(gguf_state_dict(embedded_reader))
    tokens = torch.tensor([hf_tokenizer.encode(PROMPT, add_special_tokens=False)])
    h = nn.functional.embedding(tokens, weights["tok_embeddings.weight"])  # (1, seqlen, dim)
    norm = RMSNorm(h.shape[-1], eps=hf_model.config.rms_norm_eps)
    norm.load_state_dict({"weight": weights["layers.0.attention_norm.weight"]})
    with torch.no_grad():
        hf_h = hf_model.model.embed_tokens(tokens)
        torch.testing.assert_close(h, hf_h, atol=0, rtol=0)
        torch.testing.assert_close(norm(h), hf_model.model.layers[0].input_layernorm(hf_h), atol=1e-6, rtol=1e-5)
