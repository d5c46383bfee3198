"""Quantized weights (chapter 10): int8/int4 layers against a dequantized reference matmul, GGUF's Q4_0/Q4_1 blocks
mapped exactly onto the int4 layout, load()'s precision choices, and the fast path against the plain fp32 path."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize

from llama2_edu.program import Llama, load
from llama2_edu.model_file import embedded_model_path
from llama2_edu.levers import (Int4Linear, Int8Linear, dequantize_int4, gguf_int4, inner_k_tiles, load_plan,
                                 pack_int4_cuda, quantize_int4, quantize_int8, quantize_model)
from llama2_edu.tokenizer import tokenizer_from_gguf

TEXT = ("The history of the city goes back more than two thousand years. It was founded on the banks of a wide river, "
        "where traders from the north met farmers from the south. Over the centuries it grew into a busy port, then "
        "into the capital of a small kingdom, and finally into the large and crowded city that we know today. Its old "
        "streets are narrow and winding, and many of its houses were built of the grey stone that is still quarried "
        "in the hills nearby. Every summer, visitors come to see the cathedral, walk along the river and eat in the "
        "small restaurants of the market square.")


def assert_within_one_bf16_step(y, x, w):
    """y = x @ w.T from a bf16 kernel: rounding the weights (or a group's partial sum) and the output to bf16 costs
    at most one bf16 step, 2^-8, of the sum of the products' magnitudes; fp32 accumulation adds ~1e-7 a term.
    A bound from the format, not from one CPU's kernel: it holds on AVX2, AVX512-BF16 and AMX alike."""
    reference = x.float() @ w.T
    bound = 2**-8 * (x.float().abs() @ w.abs().T)
    assert ((y.float() - reference).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (192, 576)])
def test_int8_layer_is_a_matmul_with_the_dequantized_weights(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen) * 0.02
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()  # half a step at most
    layer = Int8Linear(q, scales)
    x = torch.randn(2, 3, shape[1], generator=gen).bfloat16()
    dequantized = q.float() * layer.scales.float()[:, None]
    for y in (layer(x), layer.forward_fused(x)):  # the CPU kernel and the GPU formula
        assert y.shape == (2, 3, shape[0]) and y.dtype == torch.bfloat16
        assert_within_one_bf16_step(y, x, dequantized)
    assert torch.equal(layer(x.float()), layer(x))  # an input in another dtype is cast first


@pytest.mark.parametrize("shape, groupsize", [((1536, 576), 32), ((576, 1536), 64), ((192, 576), 32)])
def test_int4_layer_is_a_matmul_with_the_dequantized_weights(shape, groupsize):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=gen) * 0.02
    q, scales, zeros = quantize_int4(w, groupsize)
    assert q.min() >= 0 and q.max() <= 15
    assert ((dequantize_int4(q, scales, zeros) - w).abs() <= scales.repeat_interleave(groupsize, 1) / 2 + 1e-6).all()
    layer = Int4Linear(q, scales, zeros, groupsize)
    sz = layer.scales_and_zeros.float()  # (n_groups, out_features, 2), rounded to bf16 as the kernel sees them
    x = torch.randn(5, shape[1], generator=gen).bfloat16()
    assert_within_one_bf16_step(layer(x), x, dequantize_int4(q, sz[..., 0].T, sz[..., 1].T))
    assert torch.equal(layer(x.float()), layer(x))  # an input in another dtype is cast first


def test_cuda_int4_packing_and_tiling():
    q = torch.randint(0, 16, (8, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    packed = pack_int4_cuda(q)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal((packed >> 4).int(), q[:, ::2]) and torch.equal((packed & 0xF).int(), q[:, 1::2])
    assert [inner_k_tiles(k) for k in (4096, 576, 1536, 11008, 96)] == [8, 4, 8, 8, 2]
    with pytest.raises(ValueError, match="multiple of 32"):
        inner_k_tiles(40)


@pytest.mark.parametrize("kind", [GGML.Q4_0, GGML.Q4_1])
def test_gguf_q4_blocks_map_exactly_onto_int4_groups(kind):
    w = np.random.default_rng(3).standard_normal((16, 96)).astype(np.float32)
    t = SimpleNamespace(name="w", tensor_type=kind, data=quantize(w, kind))
    q, scales, zeros = gguf_int4(t)
    assert q.shape == (16, 96) and scales.shape == zeros.shape == (16, 3)
    assert torch.equal(dequantize_int4(q, scales, zeros), torch.from_numpy(dequantize(t.data, kind)))
    if kind == GGML.Q4_0:
        assert not zeros.any()


def test_embedded_file_q4_1_weights_kept_bit_for_bit(embedded_reader):
    from llama2_edu.model_file import gguf_tensor
    q4 = [t for t in embedded_reader.tensors if t.tensor_type == GGML.Q4_1]
    assert len(q4) == 210
    for t in q4[:: 30]:
        assert torch.equal(dequantize_int4(*gguf_int4(t)), gguf_tensor(t)), t.name
    with pytest.raises(ValueError, match="not Q4_0 or Q4_1"):
        gguf_int4(next(t for t in embedded_reader.tensors if t.tensor_type == GGML.Q8_0))


def test_load_plan(tmp_path):
    gguf = embedded_model_path()
    mode, dtype, reader = load_plan(None, "auto", "cpu", None)
    assert (mode, dtype) == ("gguf", torch.bfloat16) and reader is not None
    assert load_plan(gguf, "auto", "cpu", torch.float32) == (None, torch.float32, None)  # explicit dtype: plain
    assert load_plan(gguf, None, "cpu", None) == (None, None, None)                      # loader's default (fp32)
    assert load_plan(gguf, "int8", "cpu", None)[:2] == ("int8", torch.bfloat16)
    (tmp_path / "params.json").write_text("{}")
    assert load_plan(tmp_path, "auto", "cpu", None) == (None, torch.float32, None)  # Meta weights: default_dtype
    assert load_plan(tmp_path, "int4", "cpu", None) == ("int4", torch.bfloat16, None)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_plan(tmp_path, "gguf", "cpu", None)
    with pytest.raises(ValueError, match="quantize='int3' is not supported"):
        load_plan(gguf, "int3", "cpu", None)


def test_load_and_build_share_one_dtype_rule(tmp_path):
    "load() and Meta's Llama.build (chapter 9's, in one process) pick the same dtype for Meta weights: chapter 8's."
    from checkpoints import random_state_dict, tiny_args, train_tokenizer, write_meta
    from llama2_edu.checkpoint import default_dtype
    from llama2_edu.generation import Llama as Chapter9Llama
    ckpt = write_meta(tmp_path / "meta", random_state_dict(tiny_args()), dtype=torch.bfloat16)
    tok = train_tokenizer(tmp_path / "tok")
    dtypes = {f.__qualname__: f(ckpt, tokenizer_path=tok, device="cpu").model.tok_embeddings.weight.dtype
              for f in (load, Chapter9Llama.build)}
    assert set(dtypes.values()) == {default_dtype("cpu")}, dtypes


@pytest.fixture(scope="module")
def fast():
    "The default load(): the embedded file at its own precision (int4 blocks, int8 head, bf16 activations)."
    return load(device="cpu", max_seq_len=512, max_batch_size=4)


def test_default_load_keeps_the_file_precision(fast):
    layers = fast.model.layers
    assert all(isinstance(getattr(b.attention, n), Int4Linear) for b in layers for n in ("wq", "wk", "wv", "wo"))
    assert all(isinstance(getattr(b.feed_forward, n), Int4Linear) for b in layers for n in ("w1", "w2", "w3"))
    assert layers[0].attention.cache.dtype == torch.float32  # keys and values in fp32 on the CPU
    assert isinstance(fast.model.output, Int8Linear)              # the tied head, from the Q8_0 embedding
    assert fast.model.tok_embeddings.weight.dtype == torch.bfloat16


def test_fast_path_agrees_with_the_fp32_path(fast, embedded_model):
    tokens = torch.tensor([fast.encode_prompt(TEXT)])
    reference = torch.log_softmax(embedded_model.forward(tokens, 0)[0], -1)  # (seqlen, vocab) fp32
    ours = torch.log_softmax(fast.model.forward(tokens, 0)[0], -1)
    agreement = (reference.argmax(-1) == ours.argmax(-1)).float().mean().item()
    kl = (reference.exp() * (reference - ours)).sum(-1).mean().item()
    print(f"top-1 agreement {agreement:.3f}, KL(fp32 || fast) {kl:.4f} nats over {tokens.shape[1]} positions")
    assert agreement >= 0.95 and kl < 0.05


def test_generation_on_the_fast_path(fast):
    # prompts of one length decode without a padding mask: a batch equals its prompts one by one
    same = ["The capital of France is", "The capital of Spain is", "The capital of Italy is"]
    assert len({len(fast.encode_prompt(p)) for p in same}) == 1
    batched = fast.text_completion(same, temperature=0, max_gen_len=8)
    for p, r in zip(same, batched):
        assert r["generation"] == fast.text_completion([p], temperature=0, max_gen_len=8)[0]["generation"]
        assert "".join(fast.stream(p, temperature=0, max_gen_len=8)) == r["generation"]
    # a ragged batch decodes through the mask, which bf16 rounds otherwise than the maskless single prompt's:
    # each prompt's prefill is its own, so its first token is exactly that of the prompt alone
    ragged = [fast.encode_prompt(p) for p in ("Hi", "def fibonacci(n):\n    ", same[0])]
    tokens, _ = fast.generate(ragged, max_gen_len=4, temperature=0, ignore_eos=True)
    assert [t[0] for t in tokens] == [fast.generate([r], max_gen_len=1, temperature=0)[0][0][0] for r in ragged]
    assert all(len(t) == 4 for t in tokens)


def test_fused_projections_keep_the_file_blocks_and_the_logits(fast):
    from llama2_edu.levers import FusedAttention, FusedFeedForward
    model = load(device="cpu", max_seq_len=512, max_batch_size=4, fuse=True).model
    block, args = model.layers[0], fast.args
    assert isinstance(block.attention, FusedAttention) and isinstance(block.feed_forward, FusedFeedForward)
    assert isinstance(block.attention.wqkv, Int4Linear) and isinstance(block.feed_forward.w13, Int4Linear)
    assert block.attention.wqkv.out_features == (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    tokens = torch.tensor([fast.encode_prompt(TEXT)[:40]])
    # every scheme quantizes row by row, and the int4 kernel computes each output row alike: the same logits
    assert torch.equal(model.forward(tokens, 0), fast.model.forward(tokens, 0))
    step = tokens[:, -1:]
    assert torch.equal(model.forward(step, 40), fast.model.forward(step, 40))


def test_quantize_model_refuses_bad_modes(embedded_reader):
    with pytest.raises(ValueError, match="quantize='fp8' is not supported"):
        quantize_model(torch.nn.Module(), "fp8")
    with pytest.raises(ValueError, match="pass the file's reader"):
        quantize_model(torch.nn.Module(), "gguf")


def test_a_hub_repository_holding_a_gguf_runs_at_the_files_precision(tmp_path, monkeypatch):
    "load() resolves a hub id once, so the downloaded folder's .gguf keeps its own precision, as a local file does."
    from llama2_edu import support  # checkpoint_path's module (the appendix)
    snapshot = tmp_path / "snapshot"  # what the hub's cache holds: a folder with the file (a link to a blob)
    snapshot.mkdir()
    (snapshot / embedded_model_path().name).symlink_to(embedded_model_path())
    monkeypatch.setattr(support, "download_from_hub", lambda repo_id: snapshot)
    model = load("someone/SmolLM2-135M-Instruct-GGUF", device="cpu", max_seq_len=64, max_batch_size=1).model
    assert isinstance(model.layers[0].attention.wq, Int4Linear) and isinstance(model.output, Int8Linear)
