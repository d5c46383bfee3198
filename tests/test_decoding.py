"""The decoding levers of chapter 10 that change no number: the KV cache in attention's layout (HeadsFirstKVCache)
against Meta's, and the compiled decoding step (compile_decoding) against the eager one."""
import pytest
import torch
from torch._dynamo.utils import counters

from llama2_edu.generation import decode_one_token
from llama2_edu.program import Llama, load
from llama2_edu.kv_cache import KVCache
from llama2_edu.levers import HeadsFirstKVCache, compile_decoding, use_heads_first_cache
from llama2_edu.model import Transformer
from llama2_edu.model_file import InputError

from checkpoints import random_state_dict, tiny_args


class Digits:
    "The smallest tokenizer `generate` needs: an EOS id and a check of the ids."
    bos_id, eos_id = 1, 2

    def check_ids(self, ids):
        return list(ids)


def tiny(seed=0):
    "The tests' tiny random Llama (tests/checkpoints.py), with room for three prompts of up to 48 positions."
    args = tiny_args(max_seq_len=48, max_batch_size=3)
    model = Transformer(args).eval()
    model.load_state_dict(random_state_dict(args, seed))
    return model


PROMPTS = [[5, 17, 42, 8, 9, 61, 3], [11, 12], [70, 71, 72, 73]]


def logits_of_steps(model, tokens, prompt_len, step=None):
    """The prefill's logits, then one decoding step per remaining token (teacher forcing, through `step`, the
    loop's step function, or the model's forward): (seqlen, vocab)."""
    step = step or (lambda model, x, pos: model.forward(x, pos)[:, -1])
    out = [model.forward(tokens[:, :prompt_len], 0)[0]]
    out += [step(model, tokens[:, i:i + 1], i) for i in range(prompt_len, tokens.shape[1])]
    return torch.cat(out)


def test_heads_first_cache_is_laid_out_heads_first_behind_metas_view():
    cache = HeadsFirstKVCache(2, 10, 3, 4)
    k = torch.randn(2, 6, 3, 4)
    keys, _ = cache.update(0, k, k)
    assert cache.cache_k.shape == (2, 10, 3, 4)  # what chapter 6's methods index
    assert cache.cache_k.transpose(1, 2).is_contiguous()  # what attention reads: (bsz, n_kv_heads, seqlen, dim)
    assert torch.equal(keys, k)
    keys, _ = cache.update(torch.tensor([6, 2]), k[:, :1], k[:, :1])  # a position per row
    assert torch.equal(cache.cache_k[0, 6], k[0, 0]) and torch.equal(cache.cache_k[1, 2], k[1, 0])
    assert keys.shape == (2, 7, 3, 4)


def test_heads_first_cache_gives_the_same_logits_and_tokens_as_metas():
    meta, ours = tiny(), use_heads_first_cache(tiny())
    assert isinstance(meta.layers[0].attention.cache, KVCache)
    assert all(isinstance(layer.attention.cache, HeadsFirstKVCache) for layer in ours.layers)
    tokens = torch.tensor([PROMPTS[0] + [30, 31, 32]])
    assert torch.equal(logits_of_steps(meta, tokens, 7), logits_of_steps(ours, tokens, 7))
    a, b = Llama(meta, Digits()), Llama(ours, Digits())
    assert a.generate(PROMPTS, 6, temperature=0) == b.generate(PROMPTS, 6, temperature=0)


def test_compiled_decoding_equals_eager():
    """The loop's step compiled (compile_decoding) gives the eager step's logits and tokens, the model's own
    forward untouched; a ragged batch (a position per row) and a prefill still run."""
    eager = Llama(use_heads_first_cache(tiny()), Digits())
    compiled = compile_decoding(Llama(use_heads_first_cache(tiny()), Digits()))
    assert "forward" not in vars(compiled.model) and compiled.decode_one_token is not decode_one_token
    tokens = torch.tensor([PROMPTS[0] + [30, 31, 32, 33]])
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # as generate calls it
        got = logits_of_steps(compiled.model, tokens, 7, step=compiled.decode_one_token)
        want = logits_of_steps(eager.model, tokens, 7)
    assert counters["stats"]["unique_graphs"] > graphs  # the steps ran through a compiled graph
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert compiled.generate(PROMPTS, 6, temperature=0) == eager.generate(PROMPTS, 6, temperature=0)
    with pytest.raises(ValueError, match="do not fit a KV cache of max_seq_len=48"):  # its checks still run
        compiled.decode_one_token(compiled.model, tokens[:, :1], 48)


def test_compile_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="compile=True is not combined with tensor parallelism"):
        load(device="cpu", compile=True)


def test_load_gives_every_model_the_heads_first_cache():
    llama = load(device="cpu", dtype=torch.float32, max_seq_len=64)
    assert all(isinstance(layer.attention.cache, HeadsFirstKVCache) for layer in llama.model.layers)


def test_fuse_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="fuse=True is not combined with tensor parallelism"):
        load(device="cpu", fuse=True)
