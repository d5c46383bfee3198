"""Speculative decoding (chapter 11): greedy speculation writes plain greedy's tokens, sampled speculation keeps the
target's distribution (a chi-square test against the exact distribution, seeded), for one prompt and for a batch of
prompts of different lengths, each row at its own position; the cache is rolled back up to its last position, a draft
with another vocabulary is refused in one clear error, and so are bad draft arguments, where the draft is made, and a
draft model whose cache holds fewer rows than the batch. A draft model's cost counts the bytes a step reads (a quantized
target still drafts), a draft trained for fewer positions drafts within them, and the draft length stops at its gain's
peak whatever n_draft is. No timing assertions (one subprocess has a timeout, against a scan that would not end)."""
import itertools
import math
import re
import subprocess
import sys

import pytest
import torch

from checkpoints import random_state_dict, tiny_args, train_tokenizer, write_gguf
from llama2_edu import speculative as S
from llama2_edu.generation import Llama as PlainLlama
from llama2_edu.model import Transformer
from llama2_edu.model_file import InputError, InputTypeError
from llama2_edu.tokenizer import FRENCH_PROMPT, SentencePieceTokenizer, tokenizer_from_gguf

PROMPTS = [
    FRENCH_PROMPT,
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n    ",
    "Rewrite the sentence with 'cat' instead of 'dog': The dog sat on the mat, and the dog was happy.\n",
    "Once upon a time",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "<table><tr><td>a</td><td>b</td></tr><tr><td>",
    "Alice: Hi Bob!\nBob: Hi Alice!\nAlice: How are you?\nBob:",
]
FALSE_ALARM = 1e-6  # the chi-square test's significance level: it fails a correct sampler once in a million


@pytest.fixture(scope="module")
def fp32(embedded_model, embedded_reader):
    return S.Llama(embedded_model, tokenizer_from_gguf(embedded_reader))


@pytest.mark.slow  # 8 prompts x 48 tokens, three ways: left out of `make test-fast`
def test_greedy_speculation_is_plain_greedy_fp32(fp32):
    for prompt in PROMPTS:
        ids = fp32.encode_prompt(prompt)
        plain, _ = fp32.generate([ids], 48, temperature=0)
        for draft in (S.PromptLookup(8), S.PromptLookup(4, adaptive=False)):
            spec, _ = fp32.generate([ids], 48, temperature=0, speculate=draft)
            assert spec == plain, (prompt, draft.stats)
    assert draft.stats["accepted"] > 0


def test_greedy_with_a_draft_model_is_plain_greedy(fp32):
    # the target as its own draft (every guess right) and a fixed length: each step verifies 3 tokens
    draft = S.DraftModel(PlainLlama(fp32.model, fp32.tokenizer), 3, adaptive=False)
    ids = fp32.encode_prompt(PROMPTS[1])
    plain, _ = fp32.generate([ids], 24, temperature=0)
    spec, _ = fp32.generate([ids], 24, temperature=0, speculate=draft)
    assert spec == plain and draft.stats["accepted"] > 0


BATCH = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # 43, 5 and 24 tokens: each row moves at its own position


def test_a_batch_speculates_each_row_as_plain_greedy(fp32):
    "generate(..., speculate=) through the package's Llama: each row of a batch is that prompt's plain greedy alone."
    import llama2_edu
    llama = llama2_edu.Llama(fp32.model, fp32.tokenizer)
    ids = [llama.encode_prompt(p) for p in BATCH]
    assert len({len(i) for i in ids}) == 3
    alone = [llama.generate([i], 24, temperature=0)[0][0] for i in ids]
    drafts = (S.PromptLookup(8), S.PromptLookup(4, adaptive=False),
              S.DraftModel(PlainLlama(fp32.model, fp32.tokenizer), 3, adaptive=False))  # the target: every guess right
    for draft in drafts:
        spec, _ = llama.generate(ids, 24, temperature=0, speculate=draft)
        assert spec == alone, type(draft).__name__
        assert draft.stats["accepted"] > 0
    # rows accept different numbers of tokens per pass: the batch took fewer passes than its longest row's tokens
    assert draft.stats["steps"] < 24 - 1
    texts = llama.text_completion(BATCH, temperature=0, max_gen_len=24, speculate="lookup")
    assert [t["generation"] for t in texts] == [fp32.tokenizer.decode_after(i, a) for i, a in zip(ids, alone)]


def test_text_completion_chat_and_stream_take_speculate(fp32):
    kw = dict(temperature=0, max_gen_len=24)
    plain = fp32.text_completion(PROMPTS[:3], logprobs=True, **kw)
    spec = fp32.text_completion(PROMPTS[:3], logprobs=True, speculate="lookup", **kw)
    assert [p["generation"] for p in plain] == [s["generation"] for s in spec]
    for p, s in zip(plain, spec):  # the verifying pass's logits: other shapes, the same values to rounding
        assert max(abs(a - b) for a, b in zip(p["logprobs"], s["logprobs"])) < 1e-3
    dialog = [{"role": "user", "content": "Repeat after me: the cat sat on the mat."}]
    assert (fp32.chat_completion([dialog], speculate="lookup", **kw)[0]["generation"]
            == fp32.chat_completion([dialog], **kw)[0]["generation"])
    pieces = list(fp32.stream(PROMPTS[0], speculate="lookup", **kw))
    assert "".join(pieces) == plain[0]["generation"]
    assert fp32._speculate is None  # the default stays off after a call


@pytest.mark.slow
def test_default_path_greedy_speculation_is_plain_greedy():
    import llama2_edu
    base = llama2_edu.load(device="cpu")  # the file's own precision: int4 layers, an int8 head
    llama = S.Llama(base.model, base.tokenizer)
    for prompt in PROMPTS:
        ids = llama.encode_prompt(prompt)
        plain, _ = llama.generate([ids], 40, temperature=0)
        spec, _ = llama.generate([ids], 40, temperature=0, speculate=S.PromptLookup(8))
        if spec != plain:
            # allowed only at a near-tie: the 4-bit path's logits come out in bf16 steps, and a verifying pass
            # (other kernel shapes) may round one step otherwise; two bf16 units in the last place, at most
            i = next(i for i, (a, b) in enumerate(zip(spec[0], plain[0])) if a != b)
            x = torch.tensor([ids + plain[0][:i]])
            top2 = base.model.forward(x, 0, last_only=True)[0, -1].topk(2).values
            assert top2[0] - top2[1] <= 2 * 2 ** -7 * abs(top2[0]), (prompt, i, top2)


# --- tiny random models ---------------------------------------------------------------------------------------

def tiny_llama(tokenizer_path, seed=0, noise=0.0, vocab_size=None, base=None, **sizes):
    args = tiny_args(vocab_size or 384, **sizes)  # 64 positions, 2 layers unless `sizes` say otherwise
    state = random_state_dict(args, seed) if base is None else base
    if noise:
        g = torch.Generator().manual_seed(seed + 1)
        state = {k: w + noise * w.std() * torch.randn(w.shape, generator=g) for k, w in state.items()}
    model = Transformer(args)
    model.load_state_dict(state)
    return S.Llama(model.eval(), SentencePieceTokenizer(tokenizer_path)), state


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer(d / "a.model"), train_tokenizer(d / "b.model", vocab_size=320)


def test_rollback_at_the_end_of_the_cache(tokenizers):
    # three rows of different lengths decode up to max_seq_len, each at its own position: the padding of shorter
    # guesses and the rejected positions are overwritten before any query reads them
    target, state = tiny_llama(tokenizers[0], max_batch_size=3)
    draft, _ = tiny_llama(tokenizers[0], noise=0.3, base=state, max_batch_size=3)
    text = target.tokenizer.encode("the cat sat on the mat, " * 4, bos=True, eos=False)
    prompts = [text[:40], text[:29], text[:47]]
    plain = [target.generate([p], None, temperature=0, ignore_eos=True)[0][0] for p in prompts]
    assert all(len(p) + len(out) == 64 for p, out in zip(prompts, plain))  # up to max_seq_len
    for speculate in (S.PromptLookup(8, adaptive=False), S.DraftModel(draft, 5, adaptive=False)):
        spec, _ = target.generate(prompts, None, temperature=0, ignore_eos=True, speculate=speculate)
        assert spec == plain
        assert speculate.stats["drafted"] > speculate.stats["accepted"]  # some positions were rolled back


def test_vocabulary_mismatch_is_one_clear_error(tokenizers):
    target, _ = tiny_llama(tokenizers[0])
    other, _ = tiny_llama(tokenizers[1], vocab_size=320)
    with pytest.raises(S.VocabularyMismatch, match=r"320 tokens and the target's 384"):
        target.generate([[1, 5, 6]], 4, temperature=0, speculate=other)


def test_a_quantized_target_still_drafts(tokenizers):
    # chapter 10's Int8Linear and Int4Linear keep their weights in buffers: a cost from parameter counts saw an int8
    # target as its norms and embedding, four times smaller than this draft, which then never drafted
    from llama2_edu.levers import quantize_model
    target, _ = tiny_llama(tokenizers[0], n_layers=8)
    quantize_model(target.model, "int8")  # int8 weights, bf16 activations, as llama2_edu.load(quantize="int8")
    small, _ = tiny_llama(tokenizers[0], n_layers=1)
    small.model.to(torch.bfloat16)
    draft = S.DraftModel(small, 4)
    prompt = target.tokenizer.encode("the cat sat on the mat, the cat", bos=True, eos=False)
    target.generate([prompt], 8, temperature=0, speculate=draft)
    assert draft.cost < 0.5 and draft.stats["drafted"] > 0
    fp32, _ = tiny_llama(tokenizers[0], n_layers=8)  # the bytes a step reads, in their own dtypes: about a quarter
    assert S.step_bytes(target.model) < S.step_bytes(fp32.model) / 3


def test_a_draft_trained_for_fewer_positions_drafts_within_them(tokenizers, tmp_path):
    # the command line loads the draft with the target's context (512 by default): a draft trained for fewer
    # positions was refused, quoting a max_seq_len the user never gave; now it drafts within its own context
    from llama2_edu.checkpoint import load_checkpoint
    target, state = tiny_llama(tokenizers[0])  # 64 positions
    path = write_gguf(tmp_path / "draft.gguf", state, tiny_args(max_seq_len=32), tokenizers[0])
    draft = S.parse_speculate(str(path), 4, device="cpu", dtype=torch.float32, max_seq_len=64)
    assert draft.model.params.max_seq_len == 32
    text = target.tokenizer.encode("the cat sat on the mat, " * 2, bos=True, eos=False)
    # and for a batch, whose rows leave the draft's context at different steps (its own 32 positions, 2 rows)
    rows = PlainLlama(*load_checkpoint(str(path), device="cpu", dtype=torch.float32, max_batch_size=2))
    for prompts, draft in (([text], draft), ([text, text[:9]], S.DraftModel(rows, 4))):
        draft.adaptive = False  # as large as the target, it would not pay: draft 4 tokens at every step all the same
        plain = [target.generate([p], None, temperature=0, ignore_eos=True)[0][0] for p in prompts]
        spec, _ = target.generate(prompts, None, temperature=0, ignore_eos=True, speculate=draft)
        assert len(text) + len(plain[0]) == 64 and spec == plain  # beyond 32 positions, the target decodes alone
        assert draft.stats["accepted"] > 0  # the draft is the target's weights: right while it drafts


@pytest.mark.parametrize("make, error, needle", [
    (lambda llama: S.PromptLookup(-1), InputError, "n_draft=-1 is invalid"),
    (lambda llama: S.PromptLookup(2.5), InputError, "n_draft=2.5 is invalid"),
    (lambda llama: S.PromptLookup(8, cost=-1.0), InputError, "cost=-1.0 is invalid"),
    (lambda llama: S.PromptLookup(8, cost=float("nan")), InputError, "cost=nan is invalid"),
    (lambda llama: S.PromptLookup(8, max_ngram=2, min_ngram=3), InputError, "max_ngram=2 is less"),
    (lambda llama: S.PromptLookup(8, min_ngram=0), InputError, "min_ngram=0 is invalid"),
    (lambda llama: S.DraftModel(llama, -2), InputError, "n_draft=-2 is invalid"),
    (lambda llama: S.DraftModel(llama, 4, cost=0), InputError, "cost=0 is invalid"),
    (lambda llama: S.DraftModel(llama.model), InputTypeError, "not a Transformer"),
])
def test_draft_arguments_are_checked_where_the_draft_is_made(tokenizers, make, error, needle):
    # they failed deep inside decoding (ValueError, TypeError, ZeroDivisionError), or never drafted
    llama, _ = tiny_llama(tokenizers[0])
    with pytest.raises(error, match=re.escape(needle)) as e:
        make(llama)
    assert "\n" not in str(e.value)


def test_the_draft_length_walks_up_to_the_peak_of_the_gain():
    # the choice of a scan of every length up to n_draft, which took 25 s per step for --n-draft 10000000
    for cost, accepted in itertools.product((0.01, 0.09, 0.5, 2.0), range(21)):
        lengths = S.DraftLength(64, cost)
        lengths.accepted, lengths.tried = accepted / 2, 10.0
        a = min(lengths.rate, 0.999)
        assert lengths() == max(range(65), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + cost * k))
    code = "from llama2_edu.speculative import DraftLength; print(DraftLength(10**12, 0.09)())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == [str(S.DraftLength(8, 0.09)())], run.stderr


def test_a_draft_model_smaller_than_the_batch_is_refused_in_one_line(tokenizers):
    target, state = tiny_llama(tokenizers[0], max_batch_size=3)
    draft, _ = tiny_llama(tokenizers[0], base=state)  # caches for 2 rows
    with pytest.raises(S.InputError, match=r"holds 2 sequence.*has 3.*max_batch_size=3") as e:
        target.generate([[1, 5, 6], [1, 7], [1, 8, 9, 10]], 4, temperature=0, speculate=draft)
    assert "\n" not in str(e.value)


# --- sampling keeps the target's distribution ----------------------------------------------------------------

def exact_distribution(model, prompt, n, temperature, top_k):
    "{first n sampled tokens: probability}, by enumeration, from full forward passes (no cache, no speculation)."
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, p in out.items():
            logits = model.forward(torch.tensor([prompt + list(seq)]), 0)[0, -1] / temperature
            kth = logits.topk(top_k).values[-1]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[seq + (t,)] = p * probs[t].item()
        out = nxt
    return out


def chi_square_p(counts, exact, n_samples):
    assert set(counts) <= set(exact), "a sample the target cannot produce"
    return S.chi_square_pvalue(counts, exact, n_samples)


@pytest.mark.parametrize("kind", ["lookup", "draft model"])
def test_sampled_speculation_keeps_the_target_distribution(tokenizers, kind):
    # a batch of three prompts of different lengths: each row's three tokens against its own exact distribution
    target, state = tiny_llama(tokenizers[0], max_batch_size=3)
    text = target.tokenizer.encode("the cat sat on the mat, the cat sat on the", bos=True, eos=False)
    prompts = [text, text[:5], text[:8]]
    n_tokens, temperature, top_k, n_samples = 3, 1.0, 4, 2000
    exact = [exact_distribution(target.model, p, n_tokens, temperature, top_k) for p in prompts]
    if kind == "lookup":
        draft = S.PromptLookup(4, adaptive=False)
    else:
        noisy = tiny_llama(tokenizers[0], noise=0.5, base=state, max_batch_size=3)[0]
        draft = S.DraftModel(noisy, 3, adaptive=False)
    kw = dict(temperature=temperature, top_p=1.0, top_k=top_k, ignore_eos=True)
    g = 0
    spec = [{} for _ in prompts]
    for i in range(n_samples):
        out, _ = target.generate(prompts, n_tokens, seed=i, speculate=draft, **kw)
        for counts, row in zip(spec, out):
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        g += draft.stats["drafted"] - draft.stats["accepted"]
    assert g > 100  # many drafts were rejected: the rule was exercised
    for counts, row_exact in zip(spec, exact):
        assert chi_square_p(counts, row_exact, n_samples) > FALSE_ALARM
    # plain sampling, for comparison, on the first prompt alone
    plain = {}
    for i in range(n_samples):
        out, _ = target.generate(prompts[:1], n_tokens, seed=i, **kw)
        plain[tuple(out[0])] = plain.get(tuple(out[0]), 0) + 1
    assert chi_square_p(plain, exact[0], n_samples) > FALSE_ALARM


def test_parse_speculate(tokenizers, tmp_path):
    d = S.parse_speculate("lookup", 6)
    assert isinstance(d, S.PromptLookup) and d.n_draft == 6
    with pytest.raises(S.InputError, match="n_draft"):
        S.parse_speculate("lookup", 0)


def test_adaptive_length_stops_drafting_when_nothing_is_accepted():
    lengths = S.DraftLength(8, cost=0.09)
    assert lengths() > 0
    for _ in range(20):
        lengths.record(lengths(), 0)
    assert lengths() == 0
    for _ in range(20):
        k = lengths()
        lengths.record(k, k)
    assert lengths() == 8
