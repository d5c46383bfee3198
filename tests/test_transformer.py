"The transformer (chapter 7) against transformers' LlamaForCausalLM, Meta's sizes and parameter counts, and bf16."
import pytest
import torch

from llama2_edu.model import FeedForward, Transformer, ffn_hidden_dim
from llama2_edu.model_file import LLAMA2_ARGS, ModelArgs, args_from_gguf, gguf_state_dict
from llama2_edu.rope import permute_to_hf
from llama2_edu.tokenizer import FRENCH_PROMPT, tokenizer_from_gguf

PROMPTS = [
    FRENCH_PROMPT,
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village,",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_transformers(embedded_model, hf_embedded, prompt):
    hf_model, hf_tokenizer = hf_embedded
    tokens = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
    ours = embedded_model(tokens, 0)
    with torch.inference_mode():
        theirs = hf_model(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-3
    assert int(ours[0, -1].argmax()) == int(theirs[0, -1].argmax())


def test_greedy_next_token_after_cheese_matches_transformers(embedded_model, hf_embedded):
    hf_model, hf_tokenizer = hf_embedded
    tokens = torch.tensor([hf_tokenizer(PROMPTS[0])["input_ids"]])
    with torch.inference_mode():
        expected = hf_model.generate(tokens, max_new_tokens=1, do_sample=False)[0, -1]
    assert int(embedded_model(tokens, 0)[0, -1].argmax()) == int(expected)


def test_untied_gqa_model_equals_transformers():
    "A small random model with its own output matrix (as Llama 2 has), GQA and a batch of 2, against LlamaForCausalLM."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_hidden_dim=96,
                     max_seq_len=32, max_batch_size=2)
    ours = Transformer(args).eval()
    for p in ours.parameters():  # RMSNorm gains start at 1: randomise everything
        torch.nn.init.normal_(p, std=0.2)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=args.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
                         tie_word_embeddings=False, max_position_embeddings=32)
    theirs = LlamaForCausalLM(config).eval()
    sd = ours.state_dict()
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    for i in range(2):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf |= {q + "input_layernorm.weight": sd[p + "attention_norm.weight"],
               q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"],
               q + "self_attn.q_proj.weight": permute_to_hf(sd[p + "attention.wq.weight"], 4),
               q + "self_attn.k_proj.weight": permute_to_hf(sd[p + "attention.wk.weight"], 2),
               q + "self_attn.v_proj.weight": sd[p + "attention.wv.weight"],
               q + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
               q + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
               q + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
               q + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"]}
    theirs.load_state_dict(hf)
    tokens = torch.randint(0, 100, (2, 11))
    with torch.inference_mode():
        expected = theirs(tokens).logits
    torch.testing.assert_close(ours(tokens, 0), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,expected", [("7B", 6_738_415_616), ("13B", 13_015_864_320), ("70B", 68_976_648_192)])
def test_llama2_parameter_counts_on_meta_device(name, expected):
    with torch.device("meta"):
        model = Transformer(LLAMA2_ARGS[name])
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name,expected", [("7B", 11008), ("13B", 13824), ("70B", 28672)])
def test_ffn_hidden_dim_follows_meta(name, expected):
    assert ffn_hidden_dim(LLAMA2_ARGS[name]) == expected


def test_explicit_ffn_hidden_dim_wins(embedded_reader):
    assert ffn_hidden_dim(args_from_gguf(embedded_reader)) == 1536


def test_feed_forward_equals_transformers_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    ours = FeedForward(32, 80)
    theirs = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu"))
    theirs.load_state_dict({"gate_proj.weight": ours.w1.weight, "up_proj.weight": ours.w3.weight,
                            "down_proj.weight": ours.w2.weight})
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_tied_model_has_no_output_matrix(embedded_model):
    assert embedded_model.output is None and "output.weight" not in embedded_model.state_dict()


def test_runs_in_bf16_on_cpu(embedded_reader, embedded_model):
    """bf16 weights: fp32 logits, a bf16 cache, and (as chapter 7 checks) a KL divergence from fp32 below the
    bound that one bf16 step (2^-8) per block allows, with the same greedy token where the favourite is clear.
    Kernel-independent: it holds whichever bf16 path the CPU takes (AVX2, AVX512-BF16, AMX)."""
    tokenizer = tokenizer_from_gguf(embedded_reader)
    model = Transformer(args_from_gguf(embedded_reader, max_seq_len=64, max_batch_size=1))
    model.load_state_dict(dict(gguf_state_dict(embedded_reader)))
    model.eval().to(torch.bfloat16)
    n_clear = 0
    for prompt in PROMPTS:
        tokens = torch.tensor([tokenizer.encode(prompt, bos=tokenizer.add_bos, eos=False)])
        logits, reference = model(tokens, 0)[0, -1], embedded_model(tokens, 0)[0, -1]
        assert logits.dtype == torch.float32  # logits come back in fp32 whatever the weights' dtype
        sigma = model.n_layers * 2**-8 * reference.std()
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                        reduction="sum")
        assert kl < sigma**2 / 2, (prompt, kl.item())
        top2 = reference.softmax(-1).topk(2).values
        if top2[0] > 2 * top2[1]:
            assert int(logits.argmax()) == int(reference.argmax()), prompt
            n_clear += 1
    assert n_clear >= 1
    assert model.layers[0].attention.cache.cache_k.dtype == torch.bfloat16
    step = model(tokens[:, :1], tokens.shape[1])  # and decoding with the bf16 cache works
    assert torch.isfinite(step).all()
