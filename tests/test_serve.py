"""Chapter 16's server, run as a user runs it: `python -m llama2_edu serve` in a
process of its own, spoken to with OpenAI's own client and with plain HTTP (httpx)."""

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from llama2_edu.tokenizer import FRENCH_PROMPT

pytestmark = pytest.mark.slow  # starts servers in subprocesses

KEY = "sk-llama2-edu-test"
NAME = "SmolLM2-135M-Instruct.Q4_1"  # the default id: the embedded GGUF file's stem
FRANCE = [504, 3575, 282, 4649, 314]  # "The capital of France is", in SmolLM2's ids
PROMPTS = [
    FRENCH_PROMPT,
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "1, 2, 3, 4,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman"
    " who had a daughter named Mara. Every morning, before the sun rose over the"
    " hills, they walked down to the harbour together and mended the nets.",
    "Hello",
    "Water boils at",
    "The best way to learn programming is",
]
GREEDY = dict(temperature=0, max_tokens=16, extra_body={"ignore_eos": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args, **kw):
    env = {**os.environ, "TQDM_DISABLE": "1"}  # one torch thread: tests/notebook_env.py
    return subprocess.Popen(
        [sys.executable, "-m", "llama2_edu", "serve", *args], env=env, text=True, **kw
    )


class Server:
    "A server process on a free port; `health` holds each /health answer until 200."

    def __init__(self, log_dir, *args):
        # --port 0: the server binds a free port itself and prints it, so that two
        # servers started at once (pytest workers, a notebook) never race for one
        self.log_path = log_dir / f"server-{id(self)}.log"
        self.log = open(self.log_path, "w")
        self.process = serve(
            "--port", "0", *args, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = None
        self.health = []

    def wait(self, timeout=180):
        "Poll /health from the start (every 20 ms) until the model is loaded."
        deadline = time.monotonic() + timeout
        while self.url is None and time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            found = re.search(r"listening at (http://\S+)", self.output())
            self.url = found and found.group(1)
            time.sleep(0.01)
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                r = httpx.get(self.url + "/health", timeout=10)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.02)
                continue
            self.health.append((r.status_code, r.json()))
            if r.status_code == 200:
                return self
            time.sleep(0.02)
        raise AssertionError(f"no 200 from /health in {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text()  # its own file offset: the server's stays

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {
            k: float(v) for k, v in re.findall(r"^(llama2_edu_\w+) (\S+)$", text, re.M)
        }

    def assert_idle(self, within=2.0):
        "No request running or waiting, no block lent, within `within` seconds."
        idle = dict(
            llama2_edu_requests_running=0,
            llama2_edu_requests_waiting=0,
            llama2_edu_kv_blocks_used=0,
        )
        deadline = time.monotonic() + within
        while True:
            now = {k: v for k, v in self.metrics().items() if k in idle}
            if now == idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert now == idle

    def wait_for(self, running, waiting, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            now = m["llama2_edu_requests_running"], m["llama2_edu_requests_waiting"]
            if now == (running, waiting):
                return
            time.sleep(0.02)
        raise AssertionError(f"not {running} running, {waiting} waiting: {m}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started together: the main one (a key, prompts in chunks of 32),
    and a small one that serves one request at a time and queues two."""
    logs = tmp_path_factory.mktemp("serve")
    main = Server(logs, "--api-key", KEY, "--max-seq-len", "512", "--chunk-size", "32")
    tiny = "--max-num-seqs 1 --max-queue 2 --max-seq-len 256 --served-model-name tiny"
    small = Server(logs, *tiny.split())
    try:
        yield main.wait(), small.wait()
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def http(server):
    "httpx with the key, for what OpenAI's client cannot send or does not show."
    with httpx.Client(
        base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
    ) as c:
        yield c


def complete(client, prompt, **kw):
    return client.completions.create(model=NAME, prompt=prompt, **{**GREEDY, **kw})


def assert_serves(client):
    "A normal request gets a normal answer."
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens


def test_health_is_503_while_loading_then_200(server):
    assert server.health[0] == (503, {"status": "loading"})
    assert server.health[-1] == (200, {"status": "ok"})
    assert {code for code, _ in server.health} == {503, 200}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key


def test_models_lists_the_served_id(server, servers, client):
    (card,) = client.models.list().data
    assert card.id == NAME and card.object == "model"
    tiny = openai.OpenAI(base_url=servers[1].url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in tiny.models.list().data] == ["tiny"]  # --served-model-name
    r = tiny.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert r.model == "tiny"
    with pytest.raises(openai.NotFoundError):
        tiny.completions.create(model=NAME, prompt="Hello", max_tokens=2)


def test_completion(client):
    r = complete(client, "The capital of France is")
    (choice,) = r.choices
    assert (
        r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    )
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(FRANCE), 16)
    assert r.usage.total_tokens == len(FRANCE) + 16
    # the same prompt as token ids: the same answer
    ids = complete(client, FRANCE)
    assert ids.choices[0].text == choice.text and ids.usage == r.usage
    short = complete(client, FRANCE, max_tokens=3)
    assert choice.text.startswith(short.choices[0].text)
    assert short.usage.completion_tokens == 3


def test_completion_stream(client, http):
    whole = complete(client, FRENCH_PROMPT)
    chunks = list(
        complete(
            client, FRENCH_PROMPT, stream=True, stream_options={"include_usage": True}
        )
    )
    *pieces, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert all(len(c.choices) == 1 and c.usage is None for c in pieces)
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in pieces][-2:] == [None, "length"]
    assert len({c.id for c in chunks}) == 1
    # without include_usage, no usage chunk; on the wire, SSE ending in [DONE]
    body = dict(
        model=NAME,
        prompt=FRENCH_PROMPT,
        max_tokens=16,
        temperature=0,
        ignore_eos=True,
        stream=True,
    )
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(line.startswith("data: ") for line in lines)
    assert all(len(e["choices"]) == 1 for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == whole.choices[0].text


def test_chat(client, http):
    messages = [{"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0
    )
    (choice,) = r.choices
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "stop"  # its end-of-turn token, before 24 tokens
    assert "<|im_end|>" not in choice.message.content
    assert r.usage.completion_tokens < 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *pieces, usage = chunks
    assert usage.choices == [] and usage.usage == r.usage
    assert pieces[0].choices[0].delta.role == "assistant"
    assert pieces[0].object == "chat.completion.chunk"
    assert pieces[-1].choices[0].finish_reason == "stop"
    assert {c.choices[0].finish_reason for c in pieces[:-1]} == {None}
    text = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert text == choice.message.content
    # ended by length: the last chunk says so
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=3, temperature=0, stream=True
    )
    assert [c.choices[0].finish_reason for c in r][-1] == "length"
    body = dict(model=NAME, messages=messages, max_tokens=4, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


def test_errors_are_openai_errors(client, http, server):
    def check(e, status, param, code=None, words=""):
        assert e.status_code == status and e.body["param"] == param
        assert e.body["code"] == code and e.code == code
        assert words in e.body["message"] and e.body["type"]
        assert_serves(client)  # the server goes on serving

    for body in (b'{"prompt": "Hi", ', b"[1, 2]", b"\xff"):
        r = http.post(
            "/v1/completions",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        error = r.json()["error"]
        assert r.status_code == 400 and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert_serves(client)

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=openai.omit, max_tokens=4)
    check(e.value, 400, "prompt", words="prompt")
    for prompt in ("", [], ["a", "b"], [49152], [1, True]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt=prompt, max_tokens=4)
        check(e.value, 400, "prompt")
    for messages in (openai.omit, []):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=messages)
        check(e.value, 400, "messages", words="messages")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", max_tokens=0)
    check(e.value, 400, "max_tokens", words="max_tokens")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=[1] * 505, max_tokens=8)
    check(e.value, 400, "prompt", "context_length_exceeded", "512")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME,
            max_tokens=8,
            messages=[{"role": "user", "content": "word " * 600}],
        )
    check(e.value, 400, "messages", "context_length_exceeded", "512")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", max_tokens=4, n=2)
    check(e.value, 400, "n")

    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=NAME, prompt="Hi", max_tokens=4)
    check(e.value, 401, None, "invalid_api_key")
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=4)
    check(e.value, 404, "model", "model_not_found", "gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="gpt-4", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    check(e.value, 404, "model", "model_not_found", "gpt-4")
    server.assert_idle()


def test_a_full_queue_answers_429(servers):
    "One request at a time and two waiting: a burst of 8 gets some 429s."
    small = servers[1]
    tiny = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0)
    start = threading.Barrier(8)

    def ask(i):
        start.wait()
        try:
            return tiny.completions.create(
                model="tiny",
                prompt=PROMPTS[i],
                max_tokens=48,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        except openai.RateLimitError as e:
            return e

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
    served = [a for a in answers if not isinstance(a, openai.RateLimitError)]
    assert refused and len(served) >= 2
    for e in refused:
        assert e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1
        assert e.body["type"] == "rate_limit_error" and e.body["message"]
    for r in served:
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 48
    small.assert_idle()
    assert tiny.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices


def test_stop_strings(client):
    full = complete(client, "1, 2, 3, 4,").choices[0].text
    assert ", 7" in full  # " 5, 6, 7, ...": "," and " 7" come as separate tokens
    r = complete(client, "1, 2, 3, 4,", stop=["never", ", 7"])
    text = r.choices[0].text
    assert text == full[: full.index(", 7")] and r.choices[0].finish_reason == "stop"
    stream = list(complete(client, "1, 2, 3, 4,", stop=["never", ", 7"], stream=True))
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == text and not any(", 7" in p for p in pieces)
    assert stream[-1].choices[0].finish_reason == "stop"
    # a stop string that begins but never completes: its start comes out at the end
    r = complete(client, "1, 2, 3, 4,", stop=", 77", max_tokens=8)
    assert r.choices[0].finish_reason == "length"
    assert (
        r.choices[0].text
        == complete(client, "1, 2, 3, 4,", max_tokens=8).choices[0].text
    )
    # chat too
    messages = [{"role": "user", "content": "Hi!"}]
    answer = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0
    )
    words = answer.choices[0].message.content.split()
    stop = " " + words[2]
    cut = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=24, temperature=0, stop=stop
    )
    content = answer.choices[0].message.content
    assert cut.choices[0].message.content == content[: content.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_utf8_is_never_cut_in_a_stream(client):
    "A smiley takes three tokens: the stream holds back the first two of each."
    messages = [{"role": "user", "content": "Give me a smiley emoji."}]
    kw = dict(model=NAME, messages=messages, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    assert not text.isascii() and "\ufffd" not in text
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [
        c.choices[0].delta.content for c in chunks[:-1] if c.choices[0].delta.content
    ]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) < chunks[-1].usage.completion_tokens == 12  # some held back
    # completions: French with accents, and a prompt that ends in a smiley (its
    # last token, the text is read after, holds only the end of a character)
    for prompt in ("Les fruits préférés de Zoé sont", "I feel so happy today 😀😀"):
        whole = complete(client, prompt, max_tokens=12).choices[0].text
        stream = complete(client, prompt, max_tokens=12, stream=True)
        pieces = [c.choices[0].text for c in stream]
        assert "".join(pieces) == whole and not any("\ufffd" in p for p in pieces)
        assert not whole.isascii()


def test_metrics_count_what_was_served(server, client):
    before = server.metrics()
    complete(client, FRANCE, max_tokens=5)  # shorter than a block: nothing cached
    after = server.metrics()
    grew = {k: after[k] - before[k] for k in before}
    assert grew["llama2_edu_prompt_tokens_total"] == len(FRANCE)
    assert grew["llama2_edu_generation_tokens_total"] == 5
    assert grew["llama2_edu_time_to_first_token_seconds_count"] == 1
    assert after["llama2_edu_kv_blocks_total"] == 8 * 512 / 16  # 8 full contexts
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE llama2_edu_time_to_first_token_seconds histogram" in text
    buckets = [
        float(v)
        for v in re.findall(
            r'^llama2_edu_time_to_first_token_seconds_bucket{le="[^"]+"} (\S+)$',
            text,
            re.M,
        )
    ]
    assert (
        buckets == sorted(buckets)
        and buckets[-1] == after["llama2_edu_time_to_first_token_seconds_count"]
    )
    server.assert_idle()


def test_concurrent_requests_get_what_they_get_alone(client):
    alone = [complete(client, p).choices[0].text for p in PROMPTS]
    start = threading.Barrier(len(PROMPTS))

    def ask(prompt):
        start.wait()
        return complete(client, prompt).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert together == alone


def open_streams(server, n, max_tokens=400):
    "n streaming completions, each on a connection of its own, open once answered."
    streams = []
    for i in range(n):
        c = httpx.Client(
            base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
        )
        body = dict(
            model=NAME,
            prompt=PROMPTS[i % len(PROMPTS)],
            stream=True,
            max_tokens=max_tokens,
            temperature=0,
            ignore_eos=True,
        )
        r = c.send(c.build_request("POST", "/v1/completions", json=body), stream=True)
        assert r.status_code == 200
        streams.append((c, r, r.iter_lines()))
    return streams


def close(stream):
    c, r, _ = stream
    r.close()
    c.close()


def test_health_stays_fast_under_load(server):
    streams = open_streams(server, 8)
    try:
        server.wait_for(running=8, waiting=0)
        for _ in range(5):
            start = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - start < 1.0  # the event loop is never blocked
            time.sleep(0.1)
        assert server.metrics()["llama2_edu_requests_running"] == 8
    finally:
        for stream in streams:
            close(stream)
    server.assert_idle()


def give_up(server, prompt="Hello", after=0.3):
    "A plain request whose client gives up after `after` seconds."
    body = dict(model=NAME, prompt=prompt, max_tokens=400, ignore_eos=True)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server.url + "/v1/completions",
            json=body,
            timeout=after,
            headers={"Authorization": f"Bearer {KEY}"},
        )


def test_disconnects_free_everything(server, client):
    "Clients that go away while their request runs, before its first token, or queued."
    give_up(server)  # it was running alone
    server.assert_idle()
    rng = random.Random(0)
    streams = open_streams(server, 10)  # 8 run, 2 wait for a seat
    try:
        server.wait_for(running=8, waiting=2)
        give_up(server)  # it was waiting
        for i in rng.sample(range(10), 10):
            if i < 8:  # the running ones read a few events first
                _, _, lines = streams[i]
                for _ in range(rng.randint(1, 4)):
                    assert next(lines).startswith("data: ")
                    assert next(lines) == ""  # the blank line after each event
            close(streams[i])
    finally:
        for stream in streams:
            close(stream)
    server.assert_idle()
    assert_serves(client)


def test_bad_command_lines_fail_fast_with_one_error_line(tmp_path):
    runs = [
        serve("--port", "0x", stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        serve(
            "--port",
            str(free_port()),
            "--ckpt",
            str(tmp_path / "missing.gguf"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
    ]
    for process, words in zip(runs, ("--port", "missing.gguf")):
        out, err = process.communicate(timeout=60)
        assert process.returncode not in (0, None), out + err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and words in err
