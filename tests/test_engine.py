"""Chapter 15's engine, in this process: the tokens of each request do not depend on
the traffic around it (other requests, chunked prompts, prefix caching, aborts), and
every block goes back to the pool whatever happens to a request."""

import copy
import random

import pytest

from llama2_edu.engine import Engine, SamplingParams, Status
from llama2_edu.program import load
from llama2_edu.tokenizer import FRENCH_PROMPT

MAX_SEQ_LEN = 256
STORY = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman"
    " who had a daughter named Mara. Every morning, before the sun rose over the"
    " hills, they walked down to the harbour together, mended the nets and talked"
    " about the weather, the fish and the strange ships that sometimes passed."
)
GREEDY = SamplingParams(max_tokens=12, temperature=0)
# small engines: prompts longer than 16 tokens are computed in several chunks
SMALL = dict(chunk_size=16, block_size=8)


@pytest.fixture(scope="module")
def loaded():
    """A freshly loaded model that no engine takes over: an engine wraps its model's
    attention, so each engine gets a deep copy of this one (a fresh load, faster)."""
    return load(max_batch_size=8, max_seq_len=MAX_SEQ_LEN)


def make_engine(loaded, **kw):
    return Engine(copy.deepcopy(loaded), **kw)


@pytest.fixture(scope="module")
def story(loaded):
    tokens = loaded.encode_prompt(STORY)
    assert len(tokens) >= 60
    return tokens


@pytest.fixture(scope="module")
def prompts(loaded, story):
    """8 prompts of 1 to ~50 tokens; most take several 16-token chunks, and the last
    two share a 40-token prefix (and their first chunks with the story's prefixes)."""
    out = [
        loaded.encode_prompt(FRENCH_PROMPT),
        loaded.encode_prompt("def fibonacci(n):\n    "),
        loaded.encode_prompt("Hello"),
        story[:16],
        story[:17],  # a chunk of 16, then a chunk of one token (batched with decodes)
        story[:33],
        story[:40] + loaded.encode_prompt(" The old man said"),
        story[:40] + loaded.encode_prompt(" Then one day, a storm"),
    ]
    assert sorted(len(p) for p in out)[0] == 1 and sum(len(p) > 16 for p in out) >= 5
    return out


@pytest.fixture(scope="module")
def alone(loaded):
    """`alone(prompt, params)`: the tokens a request gets on its own, in an engine
    without prefix caching that serves one request at a time."""
    engine = make_engine(loaded, prefix_caching=False, **SMALL)

    def run(prompt, params=GREEDY):
        (tokens,) = engine.generate([prompt], params)
        assert not engine.has_unfinished() and engine.blocks.num_used == 0
        return tokens

    return run


def assert_empty(engine):
    "No request left anywhere, every block back in the pool."
    blocks = engine.blocks
    assert not engine.has_unfinished() and engine.requests == {}
    assert engine.scheduler.running == [] and len(engine.scheduler.waiting) == 0
    assert blocks.num_used == 0 and len(blocks.free) == blocks.num_blocks
    assert blocks.ref_count == [0] * blocks.num_blocks


def run_to_end(engine, limit=10_000):
    for _ in range(limit):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError(f"the engine is still busy after {limit} steps")


def test_greedy_equals_chapter_9_when_one_chunk_holds_the_prompt(loaded, prompts):
    reference = load(max_batch_size=1, max_seq_len=MAX_SEQ_LEN)  # a model of its own
    engine = make_engine(loaded, chunk_size=64, block_size=16)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for prompt in prompts[:3] + prompts[-1:]:  # 1 to ~50 tokens: 1 to 4 blocks
        assert len(prompt) <= 64
        (expected,), _ = reference.generate(
            [prompt], 16, temperature=0, ignore_eos=True
        )
        assert engine.generate([prompt], params) == [expected]
    assert_empty(engine)


def test_tokens_do_not_depend_on_the_traffic(loaded, prompts, alone):
    expected = [alone(p) for p in prompts]
    engine = make_engine(loaded, **SMALL)
    assert engine.generate(prompts, GREEDY) == expected
    assert_empty(engine)
    # again in the same engine: now every full chunk of every prompt is cached
    before = engine.num_prompt_tokens
    assert engine.generate(prompts, GREEDY) == expected
    assert engine.num_prompt_tokens - before < sum(len(p) for p in prompts) - 64
    assert_empty(engine)


def test_tokens_do_not_depend_on_random_traffic_and_aborts(loaded, prompts, alone):
    "The 8 prompts arrive one by one among random requests, some of them aborted."
    expected = [alone(p) for p in prompts]
    rng = random.Random(0)
    engine = make_engine(loaded, fixed_shape=True, **SMALL)  # padded decode batches
    mine, others, shared = [], [], 0
    pending = list(prompts)
    while pending or engine.has_unfinished():
        if pending and rng.random() < 0.3:
            first_of_pair = len(mine) == 7 and mine[6].num_computed < 16
            if not first_of_pair:  # the pair's second waits for its first chunk
                mine.append(engine.add_request(pending.pop(0), GREEDY))
        busy = pending or any(r.status != Status.FINISHED for r in mine)
        if busy and rng.random() < 0.4:
            prompt = [
                rng.randrange(engine.tokenizer.n_words)
                for _ in range(rng.randint(1, 30))
            ]
            params = SamplingParams(
                max_tokens=rng.randint(1, 12),
                temperature=1.0,
                seed=rng.randrange(1000),
                ignore_eos=True,
            )
            others.append(engine.add_request(prompt, params))
        if others and rng.random() < 0.2:
            engine.abort(rng.choice(others).id)  # some of them finished already
        engine.step()
        shared = max(shared, max(engine.blocks.ref_count))
    assert [r.output_tokens for r in mine] == expected
    assert mine[7].num_cached >= 16 and shared >= 2  # the pair shared its prefix
    assert any(r.finish_reason == "abort" for r in others) and len(others) >= 10
    assert_empty(engine)


def test_prefix_caching_skips_the_shared_prefix(loaded, story, alone):
    engine = make_engine(loaded, **SMALL)
    first, second = story[:48] + story[50:55], story[:48] + story[60:70]
    before = engine.num_prompt_tokens
    assert engine.generate([first], GREEDY) == [alone(first)]
    assert engine.num_prompt_tokens - before == len(first)  # nothing cached yet
    before = engine.num_prompt_tokens
    (request,) = [engine.add_request(second, GREEDY)]
    run_to_end(engine)
    assert request.num_cached == 48  # three whole chunks of 16
    assert engine.num_prompt_tokens - before == len(second) - 48
    assert request.output_tokens == alone(second)
    # the same prompt again: all but its last (partial) chunk is cached
    before = engine.num_prompt_tokens
    assert engine.generate([second], GREEDY) == [alone(second)]
    assert engine.num_prompt_tokens - before == len(second) - 48
    assert_empty(engine)


def test_without_prefix_caching_every_prompt_token_is_computed(loaded, story):
    engine = make_engine(loaded, prefix_caching=False, **SMALL)
    for _ in range(2):
        before = engine.num_prompt_tokens
        engine.generate([story[:50]], GREEDY)
        assert engine.num_prompt_tokens - before == 50
    assert engine.blocks.cached == {}


def test_abort_in_every_state(loaded, story, alone):
    engine = make_engine(loaded, max_num_seqs=2, max_num_batched_tokens=64, **SMALL)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    long = engine.add_request(story[:50], params)  # four chunks of 16
    short = engine.add_request(story[60:62], params)
    queued = engine.add_request(story[:5], params)  # no seat: max_num_seqs=2
    engine.step()
    assert long.status == Status.RUNNING and 0 < long.num_computed < 50
    assert short.status == Status.RUNNING and queued.status == Status.WAITING
    used = engine.blocks.num_used
    assert used == len(long.block_table) + len(short.block_table) > 0

    engine.abort(queued.id)  # queued
    assert queued.status == Status.FINISHED and queued.finish_reason == "abort"
    assert queued not in engine.scheduler.waiting and engine.blocks.num_used == used
    engine.abort(long.id)  # mid-prefill
    assert long.finish_reason == "abort" and long.block_table == []
    assert engine.blocks.num_used == len(short.block_table)
    while len(short.output_tokens) < 3:
        engine.step()
    assert short.status == Status.RUNNING
    engine.abort(short.id)  # mid-decode
    assert short.finish_reason == "abort" and len(short.output_tokens) == 3
    assert_empty(engine)

    engine.abort(short.id)  # aborted already, unknown, finished: nothing happens
    engine.abort("no such request")
    done = engine.add_request(story[60:65], params)
    run_to_end(engine)
    engine.abort(done.id)
    assert done.finish_reason == "length" and len(done.output_tokens) == 8
    assert_empty(engine)
    # the blocks given back (some of them cached) serve the next requests right
    assert engine.generate([story[:50]], GREEDY) == [alone(story[:50])]


def test_random_aborts_give_every_block_back(loaded, story, alone):
    rng = random.Random(1)
    engine = make_engine(loaded, max_num_seqs=4, num_blocks=40, **SMALL)
    ids = []
    for i in range(30):
        start = rng.choice([0, 0, 8, 20])  # shared prefixes: cached blocks too
        prompt = story[start : start + rng.randint(1, 40)]
        params = SamplingParams(max_tokens=rng.randint(1, 16), temperature=1.0, seed=i)
        ids.append(engine.add_request(prompt, params, request_id=f"r{i}").id)
    aborted, steps = set(), 0
    while engine.has_unfinished():
        if rng.random() < 0.4:
            victim = rng.choice(ids + ["unknown"])
            if victim in engine.requests:
                aborted.add(engine.requests[victim].status)
            engine.abort(victim)
        engine.step()
        steps += 1
        assert steps < 2000
        assert engine.blocks.num_used <= engine.blocks.num_blocks
    assert aborted == {Status.WAITING, Status.RUNNING}
    assert_empty(engine)
    for prompt in (story[:33], story[:8] + story[20:30]):
        assert engine.generate([prompt], GREEDY) == [alone(prompt)]
    assert_empty(engine)


def test_requests_wait_in_order_for_their_whole_reservation(loaded, story, alone):
    engine = make_engine(
        loaded, max_num_seqs=4, num_blocks=8, chunk_size=16, block_size=16
    )
    assert engine.context == 8 * 16
    sizes = [(8, 56), (8, 40), (8, 40), (5, 3)]  # blocks of 16: 4, 3, 3 and 1
    requests = [
        engine.add_request(
            story[i * 10 : i * 10 + n],
            SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
        )
        for i, (n, m) in enumerate(sizes)
    ]
    a, b, c, d = requests
    started = {}
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        for r in requests:
            if r.status != Status.WAITING:
                started.setdefault(r.id, step)
        if step == 1:  # 7 blocks lent, 1 free: c waits, and d, which fits, behind it
            assert a.status == b.status == Status.RUNNING
            assert c.status == d.status == Status.WAITING
            assert engine.blocks.num_used == 7
        assert engine.blocks.num_used <= 8
    assert started[c.id] > 1 and started[c.id] <= started[d.id]
    assert [r.finish_reason for r in requests] == ["length"] * 4
    for r, (n, m) in zip(requests, sizes):
        assert r.output_tokens == alone(r.tokens[:n], r.params)
    assert_empty(engine)


def test_a_request_that_can_never_fit_is_refused_and_changes_nothing(loaded, story):
    engine = make_engine(loaded, num_blocks=8, block_size=16, chunk_size=16)
    waiting = engine.add_request(story[:4], SamplingParams(max_tokens=4))
    for prompt, max_tokens in ((story[:8], 121), (story[:8], 0), ([], 4)):
        with pytest.raises(ValueError):
            engine.add_request(prompt, SamplingParams(max_tokens=max_tokens))
        assert list(engine.scheduler.waiting) == [waiting]
        assert engine.requests == {waiting.id: waiting}
        assert engine.blocks.num_used == 0
    fits = engine.add_request(
        story[:8], SamplingParams(max_tokens=120, ignore_eos=True)
    )
    assert fits.id == waiting.id + 1  # the refused ones took no id
    run_to_end(engine)
    assert len(fits.output_tokens) == 120 and fits.finish_reason == "length"
    assert_empty(engine)
    # the model's own context bounds it too: 256 positions, not 32 blocks of 16
    engine = make_engine(loaded, num_blocks=32, block_size=16)
    assert engine.context == MAX_SEQ_LEN
    with pytest.raises(ValueError):
        engine.add_request(story[:8], SamplingParams(max_tokens=MAX_SEQ_LEN - 7))


def test_a_seed_gives_the_same_tokens_alone_and_under_load(loaded, prompts, alone):
    params = [
        SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
        for s in (7, 7, 8)
    ]
    prompt = prompts[0]
    seven = alone(prompt, params[0])
    assert alone(prompt, params[1]) == seven
    assert alone(prompt, params[2]) != seven  # another seed, other tokens
    engine = make_engine(loaded, **SMALL)
    load_ = [
        engine.add_request(p, SamplingParams(max_tokens=10, temperature=1.0))
        for p in prompts[1:5]
    ]  # unseeded: they draw from torch's generator
    mine = [engine.add_request(prompt, p) for p in params]
    load_ += [
        engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.7, seed=1))
        for p in prompts[5:]
    ]
    run_to_end(engine)
    assert [r.output_tokens for r in mine] == [seven, seven, alone(prompt, params[2])]
    assert all(r.finish_reason in ("stop", "length") for r in load_)
    assert_empty(engine)


def test_stop_reasons(loaded, alone):
    eos = loaded.tokenizer.eos_id
    hi = loaded.encode_dialog([{"role": "user", "content": "Hi!"}])
    engine = make_engine(loaded, **SMALL)
    stop = engine.add_request(hi, SamplingParams(max_tokens=24, temperature=0))
    on = engine.add_request(
        hi, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    )
    short = engine.add_request(hi, SamplingParams(max_tokens=3, temperature=0))
    run_to_end(engine)
    assert stop.finish_reason == "stop" and stop.output_tokens[-1] == eos
    assert len(stop.output_tokens) < 24 and eos not in stop.output_tokens[:-1]
    assert on.finish_reason == "length" and len(on.output_tokens) == 24
    assert on.output_tokens[: len(stop.output_tokens)] == stop.output_tokens
    assert short.finish_reason == "length"
    assert short.output_tokens == stop.output_tokens[:3]
    assert engine.num_generation_tokens == len(stop.output_tokens) + 24 + 3
    assert_empty(engine)


def test_a_token_budget_below_the_chunk_size_still_serves_prompts(loaded, story):
    """A step computes a prompt chunk of up to chunk_size tokens: a budget of fewer
    tokens must either be refused when the engine is built or still let a long prompt
    through, never leave it waiting for ever (and every request behind it)."""
    try:
        engine = make_engine(loaded, max_num_batched_tokens=8, **SMALL)
    except ValueError:
        return  # refused up front: nothing can hang
    request = engine.add_request(story[:20], SamplingParams(max_tokens=2))
    run_to_end(engine, limit=200)
    assert request.finish_reason in ("stop", "length")
