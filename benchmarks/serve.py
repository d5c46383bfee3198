"""Serving benchmark: our OpenAI-compatible server (chapter 16) against llama.cpp's
llama-server, on the same GGUF file (the embedded SmolLM2-135M-Instruct, Q4_1).

    python benchmarks/serve.py --llama-server /path/to/llama-server   # ~13 min, 2 cores
    python benchmarks/serve.py --llama-server PATH --only long_prompts
    python benchmarks/serve.py --llama-server PATH --quick    # a smoke run, ~2 min
    python benchmarks/serve.py                                # ours alone

llama-server: build it like llama-bench (benchmarks/speculate.py's docstring), with
`--target llama-server`.

A load generator in the style of vLLM's benchmark_serving.py, with its metrics: output
tokens/s and requests/s over a run; TTFT (time to first token), TPOT (time per output
token after the first: (E2E - TTFT) / (n - 1)), ITL (the gaps between streamed chunks
that carry text) and E2E latency, each at p50 and p99. Every request streams, asks for
exactly 128 tokens (--quick: 16; ignore_eos, greedy) and sends its prompt as token ids,
cut from the repository's own prose (README.md, book/*.md) by our tokenizer, so both
servers see the same tokens; output tokens are counted from the final usage chunk.

Each server runs as a subprocess, started once (ours: --max-num-seqs 16 and
its default threads: all cores but one, which it leaves to the event loop and the HTTP
work; llama-server: -np 16 slots of 1024 tokens, -t --threads),
warmed up, and stopped at the end. Each configuration runs on ours, then on
llama-server, so a drift of the machine hits both. The sections (--only runs one of
them and updates only its part of the results):

  closed        closed loop: C clients, each sending its next request when the last one
                ends, at C = 1, 2, 4, 8, 16; max(8, 4 C) requests per level;
                prompts of 64-512 tokens (lengths and cuts drawn with a fixed seed)
  poisson       open loop: 40 requests arriving as a Poisson process, --rate a second
                (0.5 by default: a load that both keep up with on 2 cores)
  long_prompts  8 clients stream with 64-token prompts while a 512-token prompt arrives
                every 3 s (10 of them): the short requests' ITL, for ours with chunked
                prefill (its default), ours without (--chunk-size 512
                --max-num-batched-tokens 528, a second start) and llama-server
  prefix        8 clients send 48 questions of 16-64 tokens after one 448-token system
                prompt, 32 output tokens: ours with prefix caching, ours without
                (--no-prefix-caching, a second start) and llama-server, whose slots
                keep their last prompt's cache
  cleanup       ours only: 16 clients, half of which leave their requests at random
                points (closing the stream, or timing out a non-streaming request);
                200 requests, then 300 more. After each round, /metrics is polled for
                the time until no request runs and no KV block is used; then 16 more
                requests start together and all their clients vanish 2 s later (some
                waiting, some in their prefill, some decoding), and the time until the
                server is idle again is taken from that moment. The server's RSS
                (VmRSS) before and after. Prompts of 64-256 tokens, 64 output tokens:
                what matters here is the number of requests

Writes llama2_edu/results/serve.json (--quick: serve_quick.json in the temporary
folder). The load generator shares the machine's cores with the server it measures, as a
real client on the same machine would. A script, not a test: it asserts nothing about
speed.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import cpu_name  # noqa: E402

from llama2_edu.support import embedded_model_path  # noqa: E402
from llama2_edu.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("closed", "poisson", "long_prompts", "prefix", "cleanup")
FULL = SimpleNamespace(
    max_tokens=128,
    levels=(1, 2, 4, 8, 16),
    per_client=4,  # closed loop: max(min_requests, per_client * C) requests
    min_requests=8,
    poisson_requests=40,
    long_clients=8,
    long_count=10,
    long_every=3.0,  # seconds between two long prompts
    cleanup_rounds=(200, 300),
    cleanup_clients=16,
    cleanup_tokens=64,
    vanish_after=2.0,  # seconds
    prefix_requests=48,
    prefix_tokens=32,
)
QUICK = SimpleNamespace(
    max_tokens=16,
    levels=(1, 4),
    per_client=1,
    min_requests=4,
    poisson_requests=8,
    long_clients=4,
    long_count=3,
    long_every=1.5,
    cleanup_rounds=(16, 16),
    cleanup_clients=8,
    cleanup_tokens=16,
    vanish_after=1.0,
    prefix_requests=8,
    prefix_tokens=8,
)
MAX_NUM_SEQS = 16
UNCHUNKED = ["--chunk-size", "512", "--max-num-batched-tokens", "528"]
SHARED_PROMPT = 448  # prefix: tokens of the system prompt every request starts with


# --- prompts ----------------------------------------------------------------------


def corpus_ids() -> list[int]:
    "The repository's prose (README.md and the book's pages) as token ids."
    files = [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]
    text = "\n\n".join(p.read_text() for p in files)
    return load_tokenizer().encode(text, bos=False, eos=False)


def make_prompts(ids, n, lo, hi, seed) -> list[list[int]]:
    "n prompts of lo..hi tokens, cut from `ids` at places drawn with `seed`."
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(len(ids) - length)
        prompts.append(ids[start : start + length])
    return prompts


# --- one request ------------------------------------------------------------------


@dataclass
class Result:
    prompt_len: int
    ok: bool = False  # the server sent its usage chunk
    left: bool = False  # the client left before the end, on purpose (cleanup)
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list = field(default_factory=list)  # seconds between text chunks
    prompt_tokens: int = 0
    output_tokens: int = 0


def request_body(ids, max_tokens, stream=True) -> dict:
    body = dict(prompt=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def stream_completion(client, url, ids, max_tokens, leave_after=None) -> Result:
    """One streamed completion, timed as vLLM's benchmark times it. With `leave_after`,
    the client closes the connection after that many text chunks (0: before any)."""
    r = Result(len(ids), start=time.perf_counter())
    last = r.start
    try:
        body = request_body(ids, max_tokens)
        async with client.stream(
            "POST", url + "/v1/completions", json=body
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                r.error = f"HTTP {response.status_code}: {text[:200]}"
                return r
            chunks = 0
            if leave_after == 0:  # leaving the block closes the connection
                r.left = True
                return r
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("usage"):  # ours: a last chunk of its own; llama.cpp's:
                    usage = chunk["usage"]  # the one with the finish_reason
                    r.prompt_tokens = usage["prompt_tokens"]
                    r.output_tokens = usage["completion_tokens"]
                    r.ok = True
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if r.ttft == 0.0:
                        r.ttft = now - r.start
                    else:
                        r.itl.append(now - last)
                    last = now
                    chunks += 1
                    if chunks == leave_after:
                        r.left = True
                        return r
                if "error" in chunk:
                    r.error = str(chunk["error"])[:200]
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    r.e2e = time.perf_counter() - r.start
    if not r.ok and not r.error:
        r.error = "no usage chunk in the stream"
    return r


async def timed_out_completion(client, url, ids, max_tokens, timeout) -> Result:
    "A non-streaming completion that the client gives up on after `timeout` seconds."
    r = Result(len(ids), start=time.perf_counter())
    try:
        body = request_body(ids, max_tokens, stream=False)
        response = await client.post(
            url + "/v1/completions", json=body, timeout=timeout
        )
        response.raise_for_status()
        r.output_tokens = response.json()["usage"]["completion_tokens"]
        r.ok = True
    except httpx.TimeoutException:
        r.left = True
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    r.e2e = time.perf_counter() - r.start
    return r


# --- runs and their metrics -------------------------------------------------------


def percentiles(name, values, scale=1000.0) -> dict:
    "{name_p50, name_p99} in milliseconds, as numpy's (and vLLM's) percentile has them."
    if not values:
        return {f"{name}_p50": None, f"{name}_p99": None}
    p50, p99 = np.percentile(np.array(values) * scale, [50, 99])
    return {f"{name}_p50": float(p50), f"{name}_p99": float(p99)}


def summarize(results, duration, max_tokens) -> dict:
    "A run's metrics, vLLM's definitions, over the requests that ran to their end."
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    tpot = [
        (r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1
    ]
    return dict(
        requests=len(results),
        completed=len(done),
        errors=sorted({r.error for r in results if r.error}),
        not_max_tokens=sum(r.output_tokens != max_tokens for r in done),
        prompt_tokens_differ=sum(r.prompt_tokens != r.prompt_len for r in done),
        input_tokens=sum(r.prompt_len for r in done),
        output_tokens=tokens,
        duration_s=duration,
        request_throughput=len(done) / duration,
        output_throughput=tokens / duration,
        **percentiles("ttft_ms", [r.ttft for r in done]),
        **percentiles("tpot_ms", tpot),
        **percentiles("itl_ms", [gap for r in done for gap in r.itl]),
        **percentiles("e2e_ms", [r.e2e for r in done]),
    )


def show(label, s) -> None:
    "One line: throughputs, then p50 and p99 of each latency (nan: no value)."
    s = {k: float("nan") if v is None else v for k, v in s.items()}
    latencies = " | ".join(
        f"{name} {s[f'{key}_ms_p50']:.1f} {s[f'{key}_ms_p99']:.1f}"
        for name, key in (
            ("TTFT", "ttft"),
            ("TPOT", "tpot"),
            ("ITL", "itl"),
            ("E2E", "e2e"),
        )
    )
    print(
        f"  {label:<28} {s['output_throughput']:6.1f} tok/s "
        f"{s['request_throughput']:5.2f} req/s | {latencies} ms",
        flush=True,
    )
    if s["errors"] or s["not_max_tokens"] or s["prompt_tokens_differ"]:
        print(
            f"  !! {s['completed']}/{s['requests']} completed;"
            f" errors {s['errors'][:3]};"
            f" usage's completion_tokens != max_tokens: {s['not_max_tokens']};"
            f" prompt_tokens != the prompt's length: {s['prompt_tokens_differ']}",
            flush=True,
        )


def new_client() -> httpx.AsyncClient:
    "A connection per request: llama-server sometimes drops a kept-alive connection."
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=600, limits=limits)


async def closed_loop(url, prompts, clients, max_tokens, label) -> dict:
    "`clients` clients, each sending its next prompt when its last request has ended."
    queue, results = list(prompts), []
    bar = tqdm(total=len(prompts), desc=label, leave=False, disable=False)
    async with new_client() as client:

        async def one_client():
            while queue:
                results.append(
                    await stream_completion(client, url, queue.pop(0), max_tokens)
                )
                bar.update()

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        duration = time.perf_counter() - start
    bar.close()
    return summarize(results, duration, max_tokens)


async def open_loop(url, prompts, rate, seed, max_tokens, label) -> dict:
    "Requests sent at the times of a Poisson process of `rate` per second (`seed`)."
    rng, tasks, at = random.Random(seed), [], 0.0
    bar = tqdm(total=len(prompts), desc=label, leave=False, disable=False)
    async with new_client() as client:

        async def one_request(ids):
            r = await stream_completion(client, url, ids, max_tokens)
            bar.update()
            return r

        start = time.perf_counter()
        for ids in prompts:  # at 0, then after exponentially distributed gaps
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(ids)))
            at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return summarize(results, duration, max_tokens)


# --- the servers ------------------------------------------------------------------


class Server:
    "A server run as a subprocess, with its output in a log file; `stop` ends it."

    def __init__(self, name, cmd, port, env=None):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} is in use: pick other ports with --port")
        self.name, self.cmd, self.url = name, cmd, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(
            "w", prefix=f"serve-{name}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches this script, which stops it
        )

    def wait_ready(self, timeout=600.0) -> None:
        "Wait until GET /health answers 200 (ours answers 503 while it loads)."
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                log = Path(self.log.name).read_text()[-3000:]
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(
            f"{self.name} not ready after {timeout:.0f} s: {self.log.name}"
        )

    def rss_mb(self) -> float:
        "The process's resident memory (VmRSS), in MiB."
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def ours_command(port, extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "llama2_edu", "serve", "--port", str(port)]
    return cmd + ["--max-num-seqs", str(MAX_NUM_SEQS), *extra]


def llama_server_command(a, port) -> list[str]:
    cmd = [a.llama_server, "-m", str(embedded_model_path()), "--port", str(port)]
    cmd += ["-t", str(a.threads), "-np", str(MAX_NUM_SEQS)]
    return cmd + ["-c", str(MAX_NUM_SEQS * 1024), "--host", "127.0.0.1"]


def start_ours(a, port, extra=()) -> Server:
    return Server("ours", ours_command(port, extra), port, {})


def start_llama_server(a, port) -> Server:
    libs = [str(Path(a.llama_server).parent), os.environ.get("LD_LIBRARY_PATH", "")]
    env = {"LD_LIBRARY_PATH": os.pathsep.join(libs)}
    return Server("llama-server", llama_server_command(a, port), port, env)


def shown(a, cmd) -> str:
    "A command as the results show it, without this machine's paths."
    text = " ".join(cmd).replace(sys.executable, "python")
    text = text.replace(str(embedded_model_path()), embedded_model_path().name)
    return (
        text.replace(a.llama_server, "path/to/llama-server") if a.llama_server else text
    )


def ready(server, ids) -> Server:
    "Wait for the server, then warm it up: 4 concurrent requests of 8 tokens."
    server.wait_ready()
    warm = make_prompts(ids, 4, 64, 512, "warm-up")
    asyncio.run(closed_loop(server.url, warm, 4, 8, f"warm-up {server.name}"))
    return server


async def metrics(client, url) -> dict:
    "Our /metrics, Prometheus text, as {name: value} (labels dropped)."
    text = (await client.get(url + "/metrics")).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(maxsplit=1)
            values[name.split("{")[0]] = float(value)
    return values


async def seconds_until_idle(url, timeout=30.0) -> float | None:
    "Seconds until /metrics shows no request running and no KV block used, or None."
    start = time.perf_counter()
    async with new_client() as client:
        while time.perf_counter() - start < timeout:
            m = await metrics(client, url)
            if (
                m["llama2_edu_requests_running"] == 0
                and m["llama2_edu_kv_blocks_used"] == 0
            ):
                return time.perf_counter() - start
            await asyncio.sleep(0.01)
    return None


# --- the sections -----------------------------------------------------------------


def closed(a, s, servers, ids) -> dict:
    levels = []
    for c in s.levels:
        n = max(s.min_requests, s.per_client * c)
        prompts = make_prompts(ids, n, 64, 512, f"closed-{c}")
        row = dict(concurrency=c)
        for name, server in servers.items():
            label = f"{name}, {c} clients"
            row[name] = asyncio.run(
                closed_loop(server.url, prompts, c, s.max_tokens, label)
            )
            show(label, row[name])
        levels.append(row)
    return dict(requests=f"max({s.min_requests}, {s.per_client} C)", levels=levels)


def poisson(a, s, servers, ids) -> dict:
    prompts = make_prompts(ids, s.poisson_requests, 64, 512, "poisson")
    out = dict(rate=a.rate, requests=len(prompts))
    for name, server in servers.items():
        label = f"{name}, {a.rate:g} req/s"
        out[name] = asyncio.run(
            open_loop(server.url, prompts, a.rate, "arrivals", s.max_tokens, label)
        )
        show(label, out[name])
    return out


async def long_prompt_run(url, s, short, long, label) -> dict:
    """s.long_clients clients stream the `short` prompts in a closed loop while the
    `long` ones arrive every s.long_every seconds, until the last long one ends."""
    queue, results, done = list(short), [], asyncio.Event()
    bar = tqdm(total=len(long), desc=label, leave=False, disable=False)
    async with new_client() as client:

        async def short_client():
            while not done.is_set() and queue:
                ids = queue.pop(0)
                results.append(await stream_completion(client, url, ids, s.max_tokens))

        async def long_request(delay, ids):
            await asyncio.sleep(delay)
            r = await stream_completion(client, url, ids, s.max_tokens)
            bar.update()
            return r

        start = time.perf_counter()
        clients = [asyncio.create_task(short_client()) for _ in range(s.long_clients)]
        delays = [s.long_every * (i + 0.5) for i in range(len(long))]
        long_results = await asyncio.gather(*map(long_request, delays, long))
        done.set()
        await asyncio.gather(*clients)
        duration = time.perf_counter() - start
    bar.close()
    out = summarize(results, duration, s.max_tokens)
    gaps = [gap for r in results for gap in r.itl]
    out["itl_ms_max"] = 1000 * max(gaps) if gaps else None
    out["itl_p99_over_p50"] = out["itl_ms_p99"] / out["itl_ms_p50"] if gaps else None
    out["long"] = summarize(long_results, duration, s.max_tokens)
    return out


def long_prompts(a, s, servers, ids) -> dict:
    short = make_prompts(ids, 1000, 64, 64, "long_prompts-short")  # more than needed
    long = make_prompts(ids, s.long_count, 512, 512, "long_prompts-long")
    out = dict(
        short_clients=s.long_clients,
        short_prompt_tokens=64,
        long_prompt_tokens=512,
        long_every_s=s.long_every,
        long_requests=s.long_count,
        unchunked_flags=" ".join(UNCHUNKED),
    )
    runs = [("ours", servers["ours"]), ("ours without chunked prefill", None)]
    runs += [(name, server) for name, server in servers.items() if name != "ours"]
    for name, server in runs:
        unchunked = server is None
        if unchunked:  # a second start of ours, for this run only
            server = ready(start_ours(a, a.port + 2, UNCHUNKED), ids)
        try:
            out[name] = asyncio.run(long_prompt_run(server.url, s, short, long, name))
        finally:
            if unchunked:
                server.stop()
        r = out[name]
        print(
            f"  {name:<32} short requests' ITL p50 {r['itl_ms_p50']:.1f} ms, p99 "
            f"{r['itl_ms_p99']:.1f} ms (x{r['itl_p99_over_p50']:.2f}), max "
            f"{r['itl_ms_max']:.0f} ms; long prompts' TTFT p50 "
            f"{r['long']['ttft_ms_p50']:.0f} ms",
            flush=True,
        )
    return out


def prefix(a, s, servers, ids) -> dict:
    """8 clients in a closed loop send questions of 16-64 tokens after the same
    448-token system prompt: ours with and without prefix caching, and llama-server
    (which reuses the prompt a slot has cached)."""
    questions = make_prompts(ids, s.prefix_requests, 16, 64, "prefix")
    prompts = [ids[:SHARED_PROMPT] + q for q in questions]
    out = dict(
        clients=8,
        shared_prompt_tokens=SHARED_PROMPT,
        question_tokens="16-64",
        requests=len(prompts),
        max_tokens=s.prefix_tokens,
    )
    runs = [("ours", servers["ours"]), ("ours without prefix caching", None)]
    runs += [(name, server) for name, server in servers.items() if name != "ours"]
    for name, server in runs:
        uncached = server is None
        if uncached:  # a second start of ours, for this run only
            server = ready(start_ours(a, a.port + 3, ["--no-prefix-caching"]), ids)
        try:
            out[name] = asyncio.run(
                closed_loop(server.url, prompts, 8, s.prefix_tokens, name)
            )
        finally:
            if uncached:
                server.stop()
        show(name, out[name])
    return out


async def cleanup_round(url, prompts, s, seed, label) -> dict:
    """s.cleanup_clients clients share `prompts`: half of them stream to the end, a
    quarter close their stream after a random number of chunks, a quarter time out a
    non-streaming request after 0.05-3 s. Then: seconds until the server is idle."""
    queue, results, rng = list(prompts), [], random.Random(seed)
    bar = tqdm(total=len(prompts), desc=label, leave=False, disable=False)
    n = s.cleanup_tokens
    async with new_client() as client:

        async def one_client(i):
            while queue:
                ids, kind = queue.pop(0), ("stay", "close", "stay", "time out")[i % 4]
                if kind == "stay":
                    r = await stream_completion(client, url, ids, n)
                elif kind == "close":
                    r = await stream_completion(client, url, ids, n, rng.randrange(n))
                else:
                    r = await timed_out_completion(
                        client, url, ids, n, rng.uniform(0.05, 3)
                    )
                results.append(r)
                bar.update()

        await asyncio.gather(*(one_client(i) for i in range(s.cleanup_clients)))
    bar.close()
    idle = await seconds_until_idle(url)
    stayed = [r for r in results if not r.left]
    return dict(
        requests=len(results),
        left=sum(r.left for r in results),
        completed=sum(r.ok for r in stayed),
        errors=sorted({r.error for r in results if r.error}),
        idle_after_round_s=idle,
    )


async def vanish(url, prompts, max_tokens, after) -> float | None:
    """Streamed requests for `prompts`, all at once; `after` seconds later all their
    clients vanish. Returns the seconds from then until the server is idle."""
    async with new_client() as client:
        tasks = [
            asyncio.create_task(stream_completion(client, url, ids, max_tokens))
            for ids in prompts
        ]
        await asyncio.sleep(after)
        for task in tasks:
            task.cancel()  # leaves its stream's `async with`: closes the connection
        await asyncio.gather(*tasks, return_exceptions=True)
    return await seconds_until_idle(url)


def seconds(value) -> str:
    return "never (30 s)" if value is None else f"{value:.3f} s"


def cleanup(a, s, servers, ids) -> dict:
    ours = servers["ours"]
    out = dict(
        clients=s.cleanup_clients,
        prompt_tokens="64-256",
        max_tokens=s.cleanup_tokens,
        vanish_after_s=s.vanish_after,
    )
    out["idle_before"] = asyncio.run(seconds_until_idle(ours.url))
    out["rss_mb_before"] = rss = ours.rss_mb()
    for i, n in enumerate(s.cleanup_rounds):
        prompts = make_prompts(ids, n, 64, 256, f"cleanup-{i}")
        r = asyncio.run(
            cleanup_round(ours.url, prompts, s, f"leave-{i}", f"cleanup {n}")
        )
        wave = make_prompts(ids, s.cleanup_clients, 64, 256, f"vanish-{i}")
        r["vanished"] = len(wave)
        r["idle_after_vanish_s"] = asyncio.run(
            vanish(ours.url, wave, s.cleanup_tokens, s.vanish_after)
        )
        r["rss_mb_after"] = ours.rss_mb()
        out.setdefault("rounds", []).append(r)
        print(
            f"  round {i + 1}: {r['requests']} requests, {r['left']} left early, "
            f"{r['completed']} completed, errors {r['errors'][:3]}; idle "
            f"{seconds(r['idle_after_round_s'])} after the round, "
            f"{seconds(r['idle_after_vanish_s'])} after {len(wave)} clients vanished; "
            f"RSS {r['rss_mb_after']:.0f} MiB",
            flush=True,
        )
    out["requests"] = sum(s.cleanup_rounds) + len(s.cleanup_rounds) * s.cleanup_clients
    out["rss_mb_after"] = out["rounds"][-1]["rss_mb_after"]
    out["rss_growth"] = out["rss_mb_after"] / rss - 1
    print(
        f"  RSS {rss:.0f} -> {out['rss_mb_after']:.0f} MiB ({out['rss_growth']:+.1%})"
    )
    return out


# --- main -------------------------------------------------------------------------


def machine(a) -> dict:
    m = dict(cpu=cpu_name(), threads=a.threads, python=platform.python_version())
    if a.llama_server:
        run = subprocess.run(
            [a.llama_server, "--version"], capture_output=True, text=True
        )
        lines = (run.stdout + run.stderr).splitlines()
        m["llama_server"] = next((x for x in lines if x.startswith("version")), None)
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server")
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t")
    p.add_argument("--rate", type=float, default=0.5, help="poisson: requests a second")
    p.add_argument("--port", type=int, default=8400, help="ours; llama-server: +1")
    p.add_argument("--only", choices=SECTIONS, help="run one section, keep the others")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few requests")
    p.add_argument("--out", type=Path, help="default: llama2_edu/results/serve.json")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    s = QUICK if a.quick else FULL
    if a.out is None and a.quick:
        a.out = Path(tempfile.gettempdir()) / "serve_quick.json"
    elif a.out is None:
        a.out = ROOT / "llama2_edu" / "results" / "serve.json"
    args = argv if argv is not None else sys.argv[1:]
    record = dict(
        command=shown(a, ["python benchmarks/serve.py", *args]),
        machine=machine(a),
        servers={
            "ours": shown(a, ours_command(a.port)),
        },
        max_tokens=s.max_tokens,
    )
    if a.llama_server:
        record["servers"]["llama-server"] = shown(
            a, llama_server_command(a, a.port + 1)
        )
    measures = dict(
        closed=closed,
        poisson=poisson,
        long_prompts=long_prompts,
        prefix=prefix,
        cleanup=cleanup,
    )
    sections = [a.only] if a.only else list(SECTIONS)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    ids = corpus_ids()
    servers = {}
    try:  # both start at once; ours loads its model while llama-server starts
        servers["ours"] = start_ours(a, a.port)
        if a.llama_server and sections != ["cleanup"]:
            servers["llama-server"] = start_llama_server(a, a.port + 1)
        for server in servers.values():
            ready(server, ids)
        for section in sections:
            print(f"{section} ({s.max_tokens} output tokens)", flush=True)
            results[section] = dict(record, **measures[section](a, s, servers, ids))
            a.out.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        for server in servers.values():
            server.stop()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
