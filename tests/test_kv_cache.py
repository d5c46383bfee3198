"The KV cache (chapter 6): cached decoding must give the logits of one full forward pass; what does not fit is refused."
import pytest
import torch

from llama2_edu.kv_cache import KVCache, kv_cache_bytes
from llama2_edu.model_file import ModelArgs


@pytest.fixture(scope="module")
def tokens(embedded_model):
    torch.manual_seed(0)
    return torch.randint(0, embedded_model.vocab_size, (2, 40))  # a batch of 2: each row must use its own cache


def test_one_token_at_a_time_equals_full_forward(embedded_model, tokens):
    full = embedded_model(tokens, 0)
    steps = [embedded_model(tokens[:, :5], 0)]
    steps += [embedded_model(tokens[:, pos : pos + 1], pos) for pos in range(5, tokens.shape[1])]
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_full_forward(embedded_model, tokens):
    full = embedded_model(tokens, 0)
    chunks = [embedded_model(tokens[:, pos : pos + 16], pos) for pos in range(0, tokens.shape[1], 16)]  # 16, 16, 8
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4


def test_a_new_prompt_overwrites_the_cache(embedded_model, tokens):
    "Start again at position 0 with other tokens: nothing of the previous sequence may leak in."
    expected = embedded_model(tokens[1:, :12], 0)
    embedded_model(tokens[:1, :30], 0)
    steps = [embedded_model(tokens[1:, :6], 0)] + [embedded_model(tokens[1:, p : p + 1], p) for p in range(6, 12)]
    assert (torch.cat(steps, dim=1) - expected).abs().max().item() <= 1e-4


def test_rows_at_their_own_positions_get_their_own_logits(embedded_model, tokens):
    """start_pos as a tensor, one first position per row: three rows with 5, 17 and 11 tokens of history (the
    shorter ones written right-padded, as a serving engine fills a batch) each take 3 new tokens at their own
    positions in one pass, and get the logits that each row gets alone, in one full pass."""
    lengths, new = [5, 17, 11], 3
    rows = [torch.randint(0, embedded_model.vocab_size, (n + new,), generator=torch.Generator().manual_seed(n))
            for n in lengths]
    history = torch.zeros(3, max(lengths), dtype=torch.long)  # right-padded: the padding is overwritten or unseen
    for b, (row, n) in enumerate(zip(rows, lengths)):
        history[b, :n] = row[:n]
    embedded_model(history, torch.zeros(3, dtype=torch.long))
    step = torch.stack([row[n:] for row, n in zip(rows, lengths)])  # (3, new)
    together = embedded_model(step, torch.tensor(lengths))
    for b, (row, n) in enumerate(zip(rows, lengths)):
        alone = embedded_model(row[None], 0)[0, n:]
        assert (together[b] - alone).abs().max().item() <= 1e-4, b
    end = embedded_model.params.max_seq_len
    with pytest.raises(ValueError, match=f"Positions {end - 2}..{end} do not fit"):  # the furthest row's
        embedded_model(step, torch.tensor([0, end - 2, 0]))


def test_batch_larger_than_max_batch_size_is_refused(embedded_model):
    n = embedded_model.params.max_batch_size + 1
    with pytest.raises(ValueError, match=f"batch of {n} sequences.*max_batch_size=4.*larger max_batch_size"):
        embedded_model(torch.zeros(n, 3, dtype=torch.long), 0)


@pytest.mark.parametrize("start_pos,seqlen", [(510, 3), (0, 513), (2000, 1)])  # past max_seq_len, and past the rotations
def test_positions_past_max_seq_len_are_refused(embedded_model, start_pos, seqlen):
    with pytest.raises(ValueError, match=f"Positions {start_pos}..{start_pos + seqlen - 1}.*max_seq_len=512.*larger max_seq_len"):
        embedded_model(torch.zeros(1, seqlen, dtype=torch.long), start_pos)


def test_kv_cache_refuses_what_does_not_fit():
    cache = KVCache(max_batch_size=2, max_seq_len=8, n_kv_heads=3, head_dim=4)
    with pytest.raises(ValueError, match="batch of 3 sequences.*max_batch_size=2"):
        cache.update(0, torch.zeros(3, 1, 3, 4), torch.zeros(3, 1, 3, 4))
    with pytest.raises(ValueError, match=r"Positions 6..9.*max_seq_len=8"):
        cache.update(6, torch.zeros(1, 4, 3, 4), torch.zeros(1, 4, 3, 4))


def test_kv_cache_stores_and_returns_everything_so_far():
    torch.manual_seed(0)
    cache = KVCache(max_batch_size=2, max_seq_len=8, n_kv_heads=3, head_dim=4)
    k1, v1, k2, v2 = torch.randn(4, 2, 3, 3, 4).to(torch.bfloat16)
    cache.update(0, k1, v1)
    keys, values = cache.update(3, k2[:, :1], v2[:, :1])
    assert keys.shape == (2, 4, 3, 4) and keys.dtype == torch.bfloat16  # follows the dtype of what it stores
    assert torch.equal(keys, torch.cat([k1, k2[:, :1]], dim=1)) and torch.equal(values, torch.cat([v1, v2[:, :1]], dim=1))
    assert cache.cache_k.shape == (2, 8, 3, 4)


def test_kv_cache_bytes_counts_the_allocated_tensors(embedded_model):
    embedded_model(torch.zeros(1, 2, dtype=torch.long), 0)  # make sure the caches exist
    caches = [layer.attention.cache for layer in embedded_model.layers]
    allocated = sum(c.cache_k.nbytes + c.cache_v.nbytes for c in caches)
    assert allocated == kv_cache_bytes(embedded_model.params, bytes_per_value=caches[0].cache_k.element_size())


def test_kv_cache_bytes_of_llama2():
    GiB = 2**30
    assert kv_cache_bytes(ModelArgs(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096, max_batch_size=1)) == 2 * GiB
    assert kv_cache_bytes(ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, max_seq_len=4096,
                                    max_batch_size=1)) == 1.25 * GiB
