"""Decoding speed of llama2_edu against transformers and llama.cpp on the embedded model (chapter 10).

    python benchmarks/decode.py                                  # minutes: 2.5 on the benchmark CPU, 2 cores
    python benchmarks/decode.py --llama-bench /path/to/llama-bench --threads 2 --runs 5
    python benchmarks/decode.py --only compile                   # eager vs torch.compile, added to the results
    python benchmarks/decode.py --only layout                    # Meta's KV-cache layout vs heads first
    python benchmarks/decode.py --only fusion                    # separate vs fused wq|wk|wv and w1|w3
    python benchmarks/decode.py --only kv                        # bf16 vs fp32 keys and values on the CPU
    python benchmarks/decode.py --only overhead                  # a step without its matrix products
    python benchmarks/decode.py --only ragged                    # a long prompt alone and beside a short one

llama-bench: build it as benchmarks/speculate.py's docstring shows (llama.cpp from the llama-cpp-python sdist).

One process, one prompt, one thread count; the contenders are interleaved (round r runs every contender once) and
each figure is the median over the rounds. Writes llama2_edu/results/decode.json (package data) and the plots next to it, which
chapter 10 reads. A script, not a test: it asserts nothing about speed.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama2_edu.program import Llama, load  # noqa: E402
from llama2_edu.model_file import embedded_model_path  # noqa: E402
from llama2_edu.tokenizer import FRENCH_PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent
PROMPT = FRENCH_PROMPT  # the book's prompt (chapter 1)
TEXT = ("The history of the city goes back more than two thousand years. It was founded on the banks of a wide "
        "river, where traders from the north met farmers from the south. Over the centuries it grew into a busy "
        "port, then into the capital of a small kingdom, and finally into the large and crowded city that we know "
        "today. Its old streets are narrow and winding, and many of its houses were built of the grey stone that is "
        "still quarried in the hills nearby. Every summer, visitors come to see the cathedral, walk along the river "
        "and eat in the small restaurants of the market square. In the evening the bridges are lit, and the cafés "
        "stay open late; in winter the city is quieter, and the river is often covered in fog.")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def read_bandwidth_gbs(runs: int = 7, n_bytes: int = 1 << 30) -> float:
    "Read bandwidth (GB/s): the median time of summing a 1 GiB fp32 array, far larger than any cache."
    x = torch.ones(n_bytes // 4)
    x.sum()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times) / 1e9


# --- contenders: each times a prefill of the prompt and a decode of n tokens ------------------------------------

class Ours:
    def __init__(self, name, precision, llama: Llama, compiled=False):
        self.name, self.precision, self.llama, self.compiled = name, precision, llama, compiled

    def run(self, ids, n):
        "(prefill seconds, decode seconds for n - 1 tokens): generate 1 token, then n tokens, with ignore_eos."
        t = time.perf_counter()
        self.llama.generate([ids], max_gen_len=1, temperature=0, ignore_eos=True)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        self.llama.generate([ids], max_gen_len=n, temperature=0, ignore_eos=True)
        return prefill, time.perf_counter() - t - prefill


class Transformers:
    def __init__(self, dtype):
        from transformers import AutoModelForCausalLM
        path = embedded_model_path()
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
        self.name, self.precision, self.compiled = f"transformers generate", str(dtype).replace("torch.", ""), False
        self.precision = {"float32": "fp32", "bfloat16": "bf16"}[self.precision]

    @torch.no_grad()
    def run(self, ids, n):
        x = torch.tensor([ids])
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        self.model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        self.model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return prefill, time.perf_counter() - t - prefill


def llama_bench(path, threads, n_prompt, n_gen):
    "(prefill tok/s, decode tok/s) from one run of llama.cpp's llama-bench on the embedded GGUF file."
    cmd = [path, "-m", str(embedded_model_path()), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", "1", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    rate = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return rate["pp"], rate["tg"]


# --- the other measurements -----------------------------------------------------------------------------------

@torch.no_grad()  # as generate runs (chapter 10: a compiled step takes no inference tensors)
def accuracy(reference: Llama, llama: Llama):
    "Top-1 agreement and mean KL(reference || llama) of the next-token distributions over TEXT."
    tokens = torch.tensor([reference.encode_prompt(TEXT)])
    p = torch.log_softmax(reference.model.forward(tokens, 0)[0], -1)
    q = torch.log_softmax(llama.model.forward(tokens, 0)[0], -1)
    return dict(top1_agreement=(p.argmax(-1) == q.argmax(-1)).float().mean().item(),
                kl=(p.exp() * (p - q)).sum(-1).mean().item(), positions=tokens.shape[1])


@torch.no_grad()
def hf_accuracy(reference: Llama, hf_model):
    tokens = torch.tensor([reference.encode_prompt(TEXT)])
    p = torch.log_softmax(reference.model.forward(tokens, 0)[0], -1)
    q = torch.log_softmax(hf_model(tokens).logits[0].float(), -1)
    return dict(top1_agreement=(p.argmax(-1) == q.argmax(-1)).float().mean().item(),
                kl=(p.exp() * (p - q)).sum(-1).mean().item(), positions=tokens.shape[1])


@torch.no_grad()
def context_sweep(llama: Llama, contexts, runs):
    "Seconds per decoded token at each context length: with the KV cache (one position) and without (all of them)."
    model, out = llama.model, {"context": contexts, "with_cache": [], "without_cache": []}
    for ctx in contexts:
        tokens = torch.randint(100, 1000, (1, ctx + 1), generator=torch.Generator().manual_seed(ctx))
        cached, full = [], []
        for _ in range(runs):
            model.forward(tokens[:, :ctx], 0, last_only=True)
            t = time.perf_counter()
            model.forward(tokens[:, ctx:], ctx, last_only=True)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.forward(tokens, 0, last_only=True)  # no cache: the whole sequence again
            full.append(time.perf_counter() - t)
        out["with_cache"].append(statistics.median(cached))
        out["without_cache"].append(statistics.median(full))
    return out


@torch.no_grad()
def profile(llama: Llama, ids, steps=8, top=8):
    "Share of a decoding step's CPU time per operator (self time), from torch.profiler."
    from torch.profiler import profile as torch_profile
    model = llama.model
    model.forward(torch.tensor([ids]), 0, last_only=True)
    tok = torch.tensor([[ids[-1]]])
    with torch_profile() as prof:
        for i in range(steps):
            model.forward(tok, len(ids) + i, last_only=True)
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    events.sort(key=lambda e: -e[1])
    return [[name, t / total] for name, t in events[:top]]


def interleaved_medians(runs: int, measures: dict) -> dict:
    "{name: median}: each of `measures` (name: a function returning a number) over `runs` rounds, each calling all."
    values = {name: [] for name in measures}
    for _ in range(runs):
        for name, measure in measures.items():
            values[name].append(measure())
    return {name: statistics.median(v) for name, v in values.items()}


def interleaved_decode_rates(a, llamas: dict, ids) -> dict:
    "{name}_decode_tok_s: the median decode rate of each of `llamas` over a.runs rounds, each round running all."
    measures = {name: lambda llama=llama: (a.gen - 1) / Ours("", "", llama).run(ids, a.gen)[1]
                for name, llama in llamas.items()}
    return {f"{name}_decode_tok_s": v for name, v in interleaved_medians(a.runs, measures).items()}


def fusion(a):
    "Decode rates of the default model with separate and with fused projections, interleaved."
    separate, fused = load(device="cpu"), load(device="cpu", fuse=True)
    ids = fused.encode_prompt(PROMPT)
    return dict(runs=a.runs, **interleaved_decode_rates(a, dict(separate=separate, fused=fused), ids))


def long_context(llama: Llama, context: int) -> torch.Tensor:
    "The first `context` tokens of TEXT repeated, (1, context)."
    return torch.tensor([llama.encode_prompt((TEXT + " ") * 4)[:context]])


@torch.no_grad()
def decode_rate_after(model, tokens, gen: int) -> float:
    "Tokens per second of `gen` decoding steps after a prefill of `tokens` (the prefill is not timed)."
    model.forward(tokens, 0, last_only=True)
    context = tokens.shape[1]
    t = time.perf_counter()
    for i in range(gen):
        model.forward(tokens[:, -1:], context + i, last_only=True)
    return gen / (time.perf_counter() - t)


def kv_dtype(a, context=400, calls=200):
    """One layer's attention call at decoding shape, bf16 vs fp32, and the default model's decode rate after a
    `context`-token prompt with a bf16 and with an fp32 cache, interleaved."""
    from llama2_edu.attention import attention
    from llama2_edu.levers import use_heads_first_cache
    llama = load(device="cpu")
    args = llama.args
    out = dict(context=context, runs=a.runs)
    with torch.no_grad():
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            q = torch.randn(1, args.n_heads, 1, args.head_dim).to(torch.bfloat16)
            k, v = (torch.randn(1, args.n_kv_heads, context, args.head_dim, dtype=dtype) for _ in "kv")
            out[f"{name}_attention_s"] = time_it(lambda: [attention(q, k, v) for _ in range(calls)], a.runs) / calls
    tokens = long_context(llama, context)

    def rate_with(dtype):
        use_heads_first_cache(llama.model, dtype)
        return decode_rate_after(llama.model, tokens, a.gen)

    rates = interleaved_medians(a.runs, dict(bf16=lambda: rate_with(None), fp32=lambda: rate_with(torch.float32)))
    return dict(out, **{f"{k}_decode_tok_s": v for k, v in rates.items()})


@torch.no_grad()
def ragged(fast: Llama, runs: int) -> dict:
    """A 390-token prompt alone, and beside a 5-token one (one padded prefill, then a position per row); the
    prefill's logits for every position against the last one only."""
    long_ids = fast.encode_prompt((TEXT + " ") * 3)[:390]
    short_ids = fast.encode_prompt("Hello, my name is")
    n = 16
    alone = time_it(lambda: fast.generate([long_ids], max_gen_len=n, temperature=0, ignore_eos=True), runs)
    mixed = time_it(lambda: fast.generate([short_ids, long_ids], max_gen_len=n, temperature=0, ignore_eos=True),
                    runs)
    prompt = torch.tensor([long_ids])
    with torch.no_grad():
        last = time_it(lambda: fast.model.forward(prompt, 0, last_only=True), runs)
        every = time_it(lambda: fast.model.forward(prompt, 0), runs)
    return dict(ragged=dict(long_tokens=len(long_ids), short_tokens=len(short_ids), gen_tokens=n,
                            long_alone_s=alone, mixed_batch_s=mixed),
                prefill_logits=dict(tokens=len(long_ids), last_only_s=last, all_positions_s=every))


def time_it(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5, help="rounds of interleaved runs (medians over them)")
    p.add_argument("--gen", type=int, default=64, help="tokens to decode per run")
    p.add_argument("--llama-bench", metavar="PATH", default=None, help="llama.cpp's llama-bench binary")
    p.add_argument("--out", type=Path, default=ROOT.parent / "llama2_edu" / "results")
    p.add_argument("--only", choices=["fusion", "kv", "compile", "layout", "overhead", "ragged", "llama-bench"], default=None,
                   help="measure only this, and add it to an existing decode.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.only:
        return add_to_results(a)

    print("loading ...", flush=True)
    t = time.perf_counter()
    plain = load(device="cpu", dtype=torch.float32)            # the fp32 nn.Linear model of chapters 7-9
    ours = [Ours("llama2_edu fp32", "fp32", plain),
            Ours("llama2_edu bf16", "bf16", load(device="cpu", dtype=torch.bfloat16)),
            Ours("llama2_edu int8", "int8", load(device="cpu", quantize="int8")),
            Ours("llama2_edu int4", "int4", load(device="cpu", quantize="int4")),
            Ours("llama2_edu default (file's precision)", "Q4_1 file", load(device="cpu")),
            Ours("llama2_edu default, compiled", "Q4_1 file", load(device="cpu", compile=True), compiled=True)]
    hf = [Transformers(torch.float32), Transformers(torch.bfloat16)]
    print(f"loaded in {time.perf_counter() - t:.0f} s", flush=True)

    ids = plain.encode_prompt(PROMPT)
    contenders = ours + hf
    for c in contenders:  # one untimed run each: warm caches, and the compiled step's compilation
        c.run(ids, 4)
    times = {c.name + c.precision: [] for c in contenders}
    lcpp = []
    for r in range(a.runs):
        for c in contenders:
            times[c.name + c.precision].append(c.run(ids, a.gen))
        if a.llama_bench:
            lcpp.append(llama_bench(a.llama_bench, a.threads, len(ids), a.gen))
        print(f"round {r + 1}/{a.runs} done", flush=True)
        gc.collect()

    rows = []
    for c in contenders:
        pre, dec = zip(*times[c.name + c.precision])
        rows.append(dict(name=c.name, precision=c.precision, compiled=c.compiled,
                         prefill_tok_s=len(ids) / statistics.median(pre),
                         decode_tok_s=(a.gen - 1) / statistics.median(dec)))
    if lcpp:
        rows.append(dict(name="llama.cpp llama-bench", precision="Q4_1 file", compiled=False,
                         prefill_tok_s=statistics.median(r[0] for r in lcpp),
                         decode_tok_s=statistics.median(r[1] for r in lcpp)))

    print("accuracy, context sweep, profile ...", flush=True)
    acc = {c.precision: accuracy(plain, c.llama) for c in ours[1:5]}
    acc["transformers bf16"] = hf_accuracy(plain, hf[1].model)
    fast = ours[4].llama
    contexts = [16, 64, 128, 256, 384, 496]
    sweep = {"fp32": context_sweep(plain, contexts, a.runs), "default": context_sweep(fast, contexts, a.runs)}
    prof = {"fp32": profile(plain, ids), "Q4_1 file (int4 + int8 head)": profile(fast, ids)}

    results = dict(
        machine=dict(cpu=cpu_name(), threads=a.threads, torch=torch.__version__, python=platform.python_version(),
                     read_bandwidth_gbs=read_bandwidth_gbs()),
        command="python benchmarks/decode.py " + " ".join(argv if argv is not None else os.sys.argv[1:]).replace(
            a.llama_bench or "\0", "path/to/llama-bench"),  # where the binary lies on this machine says nothing
        prompt_tokens=len(ids), gen_tokens=a.gen, runs=a.runs,
        contenders=rows, accuracy=acc, context_sweep=sweep, profile=prof,
        **ragged(fast, a.runs),
    )
    (a.out / "decode.json").write_text(json.dumps(results, indent=1) + "\n")
    for row in rows:
        print(f"{row['name']:>40} {row['precision']:>10}  prefill {row['prefill_tok_s']:7.1f} tok/s  "
              f"decode {row['decode_tok_s']:6.1f} tok/s")
    print(json.dumps({k: results[k] for k in ("machine", "accuracy", "ragged", "prefill_logits")},
                     indent=1))
    plot(results, a.out)


@torch.no_grad()
def step_accuracy(reference: Llama, llama: Llama, prompt_len=8, steps=64):
    "Top-1 agreement and mean KL of the next-token distributions of `steps` decoding steps over TEXT (teacher forcing)."
    tokens = torch.tensor([reference.encode_prompt(TEXT)[:prompt_len + steps]])
    logp = []
    for each in (reference, llama):  # each through its own step function: eager, or compiled
        model, step = each.model, each.decode_one_token
        model.forward(tokens[:, :prompt_len], 0, last_only=True)
        steps_logits = [step(model, tokens[:, i:i + 1], i)[0] for i in range(prompt_len, tokens.shape[1])]
        logp.append(torch.log_softmax(torch.stack(steps_logits), -1))
    p, q = logp
    return dict(top1_agreement=(p.argmax(-1) == q.argmax(-1)).float().mean().item(),
                kl=(p.exp() * (p - q)).sum(-1).mean().item(), positions=p.shape[0])


def compiled_decode(a):
    "Compilation time (batch 1, then batch 2), eager vs compiled decode rates of the default model, interleaved."
    import tempfile
    # a cold start: Inductor's on-disk cache would otherwise hand back kernels compiled by an earlier run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    eager, compiled = load(device="cpu"), load(device="cpu", compile=True)
    ids = eager.encode_prompt(PROMPT)
    t = time.perf_counter()
    compiled.generate([ids], max_gen_len=4, temperature=0, ignore_eos=True)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled.generate([ids, ids[:8]], max_gen_len=4, temperature=0, ignore_eos=True)
    second_s = time.perf_counter() - t
    return dict(compile_seconds=compile_s, second_batch_size_compile_seconds=second_s, runs=a.runs,
                accuracy=step_accuracy(eager, compiled),
                **interleaved_decode_rates(a, dict(eager=eager, compiled=compiled), ids))


def cache_layout(a, context=400):
    """Decode rates of the default model with Meta's KV-cache layout and with HeadsFirstKVCache, interleaved: after
    the prompt, and after a `context`-token prefill."""
    from llama2_edu.kv_cache import KVCache
    heads_first, meta = load(device="cpu"), load(device="cpu")
    # the same precision, Meta's order
    meta.model.setup_caches(KVCache, meta.model.layers[0].attention.cache.dtype)
    llamas = dict(meta=meta, heads_first=heads_first)
    ids, tokens = meta.encode_prompt(PROMPT), long_context(meta, context)
    at_context = interleaved_medians(a.runs, {name: lambda llama=llama: decode_rate_after(llama.model, tokens, a.gen)
                                              for name, llama in llamas.items()})
    return dict(runs=a.runs, context=context, **interleaved_decode_rates(a, llamas, ids),
                **{f"{name}_decode_tok_s_at_context": v for name, v in at_context.items()})


@torch.no_grad()
def step_overhead(a, steps=20):
    """Seconds per decoding step of the default model as it is, with its int4 layers' matrix products replaced by a
    ready-made output, and with the head's as well (interleaved): what is left is the cost of everything else."""
    from llama2_edu.levers import Int4Linear
    llama = load(device="cpu")
    model, head = llama.model, llama.model.output
    ids = llama.encode_prompt(PROMPT)
    model.forward(torch.tensor([ids]), 0, last_only=True)
    tok = torch.tensor([[ids[-1]]])
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    kernels = {m: m.mm for m in layers}
    outputs = {m: torch.zeros(1, m.out_features, dtype=m.dtype) for m in layers}
    head_output = torch.zeros(1, 1, model.vocab_size, dtype=head.dtype)

    def step_seconds(int4=True, head_product=True):
        for m in layers:
            m.mm = kernels[m] if int4 else (lambda *args, out=outputs[m]: out)
        if not head_product:  # an instance attribute, in front of the class's forward until deleted
            head.forward = lambda x: head_output
        t = time.perf_counter()
        for i in range(steps):
            model.forward(tok, len(ids) + i, last_only=True)
        seconds = (time.perf_counter() - t) / steps
        vars(head).pop("forward", None)
        for m in layers:
            m.mm = kernels[m]
        return seconds

    times = interleaved_medians(a.runs, dict(step=step_seconds, without_int4_step=lambda: step_seconds(False),
                                             without_int4_and_head_step=lambda: step_seconds(False, False)))
    return dict(runs=a.runs, steps=steps, int4_layers=len(layers), **{f"{k}_s": v for k, v in times.items()})


def add_to_results(a):
    path = a.out / "decode.json"
    results = json.loads(path.read_text())
    if a.only == "fusion":
        results["fusion"] = fusion(a)
    elif a.only == "kv":
        results["kv_dtype"] = kv_dtype(a)
    elif a.only == "compile":
        results["compile"] = compiled_decode(a)
    elif a.only == "layout":
        results["cache_layout"] = cache_layout(a)
    elif a.only == "overhead":
        results["overhead"] = step_overhead(a)
    elif a.only == "ragged":
        results.update(ragged(load(device="cpu"), a.runs))
    else:  # llama.cpp interleaved with our default path, same prompt length and token count
        if not a.llama_bench:
            raise SystemExit("--only llama-bench needs --llama-bench PATH")
        ours = Ours("llama2_edu default (file's precision)", "Q4_1 file", load(device="cpu"))
        ids = ours.llama.encode_prompt(PROMPT)
        pairs = [(ours.run(ids, a.gen), llama_bench(a.llama_bench, a.threads, len(ids), a.gen)) for _ in range(a.runs)]
        row = dict(name="llama.cpp llama-bench", precision="Q4_1 file", compiled=False,
                   prefill_tok_s=statistics.median(l[0] for _, l in pairs),
                   decode_tok_s=statistics.median(l[1] for _, l in pairs))
        results["contenders"] = [r for r in results["contenders"] if r["name"] != row["name"]] + [row]
        results["llama-bench"] = dict(ours_decode_tok_s=statistics.median((a.gen - 1) / o[1] for o, _ in pairs),
                                      llama_cpp_decode_tok_s=row["decode_tok_s"], runs=a.runs)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results[{"layout": "cache_layout", "kv": "kv_dtype"}.get(a.only, a.only)], indent=1))


def plot(results, out: Path):
    "The two figures of the chapter, as PNG files next to the results."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = results["machine"]
    label = f"{m['cpu']}, {m['threads']} threads"
    rows = results["contenders"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [f"{r['name'].replace('llama2_edu ', '')} ({r['precision']})" for r in rows]
    ax.barh(names[::-1], [r["decode_tok_s"] for r in rows][::-1])
    ax.set(xlabel="decode tokens/s (batch 1, greedy)", title=f"Decoding speed: {label}")
    plt.tight_layout()
    fig.savefig(out / "decode_speed.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, sweep in results["context_sweep"].items():
        ax.plot(sweep["context"], [1e3 * s for s in sweep["with_cache"]], marker="o", label=f"{name}, KV cache")
        ax.plot(sweep["context"], [1e3 * s for s in sweep["without_cache"]], marker="x", linestyle="--",
                label=f"{name}, no cache")
    ax.set(xlabel="context length (tokens)", ylabel="ms per decoded token", title=f"Decode time vs context: {label}")
    ax.legend()
    plt.tight_layout()
    fig.savefig(out / "decode_context.png", dpi=120)


if __name__ == "__main__":
    main()
