"""Speculative decoding on the embedded model (chapter 11): our prompt lookup against plain decoding, llama.cpp's
llama-lookup and transformers' prompt lookup, on copy-heavy prompts and on free text.

    python benchmarks/speculate.py                                        # ours and transformers
    python benchmarks/speculate.py --llama-lookup /path/to/llama-lookup   # and llama.cpp's llama-lookup
    python benchmarks/speculate.py --gen 96 --runs 3 --threads 2
    python benchmarks/speculate.py --only-cost --runs 30                   # re-measure the forward-pass cost only

llama-lookup comes from the llama.cpp that the llama-cpp-python source distribution vendors (no network
beyond PyPI; about ten minutes on two cores):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B llama.cpp-build -DCMAKE_BUILD_TYPE=Release \
          -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build llama.cpp-build --target llama-lookup llama-bench -j 2   # binaries in llama.cpp-build/bin

One process, one thread count. First it times a forward pass over k new tokens relative to one, on the default
path. Then, for each prompt, round r runs every contender once: ours plain; ours with adaptive prompt lookup (what
speculate="lookup" does) and with a fixed draft length; transformers plain and with prompt_lookup_num_tokens;
llama-lookup. Each rate is the median over the rounds, so the ratios compare runs made side by side. Greedy
decoding of exactly --gen tokens (EOS ignored) for ours and transformers; llama-lookup stops at an EOS and reports
its own counts. Rates are decode rates: each engine's prefill (timed in the same round) is subtracted, and
llama-lookup reports its decode time apart. Tokens per step = generated tokens / forward passes of the target (the
prefill's pass included), which for llama-lookup is n_predict / (n_predict - n_accept). llama.cpp's and
transformers' numerics write different texts from ours (the 4-bit path's near-ties go other ways), so our drafts
are also replayed on llama-lookup's and on transformers' greedy text (greedy speculation is plain greedy, so a
draft's passes on a known continuation can be counted without the model): draft against draft, on the same
tokens. Writes llama2_edu/results/speculate.json and speculate.png (package data), which chapter 11 reads.
A script, not a test: it asserts nothing about speed.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import cpu_name  # noqa: E402

import llama2_edu  # noqa: E402
from llama2_edu import speculative as S  # noqa: E402
from llama2_edu.model_file import embedded_model_path  # noqa: E402
from llama2_edu.tokenizer import FRENCH_PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent
PARAGRAPH = ("The old bridge crosses the river just below the town. It was built of grey stone in the twelfth "
             "century, and for six hundred years it was the only way across. Carts and cattle went over it on "
             "market days, and in the spring the river rose so high that the water touched its arches.")
CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)
'''
PROMPTS = {  # name: (kind, text)
    "french few-shot": ("copy-heavy", FRENCH_PROMPT),
    "edit a paragraph": ("copy-heavy", f"Paragraph:\n{PARAGRAPH}\n\nThe same paragraph, with 'river' replaced by "
                                       "'canal' and nothing else changed:\n"),
    "rewrite code": ("copy-heavy", f"```python\n{CODE}```\n\nThe same code with type hints added:\n\n```python\n"),
    "story": ("free text", "Write a short story about a girl who finds a lost dog.\n\nOnce upon a time"),
}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class Ours:
    def __init__(self, llama, draft=None):
        self.llama, self.draft = llama, draft

    def run(self, ids, n):
        "(seconds, tokens, forward passes of the target)"
        seconds, (out, _) = timed(lambda: self.llama.generate([ids], n, temperature=0, ignore_eos=True,
                                                              speculate=self.draft))
        st = self.draft.stats if self.draft else dict(steps=len(out[0]) - 1, accepted=0, drafted=0)
        return dict(seconds=seconds, tokens=len(out[0]), passes=1 + st["steps"], drafted=st["drafted"],
                    accepted=st["accepted"], ids=out[0])


class Transformers:
    def __init__(self, model, lookup=None):
        self.model, self.lookup, self.calls = model, lookup, 0
        model.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    @torch.inference_mode()
    def run(self, ids, n):
        x = torch.tensor([ids])
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, max_new_tokens=n,
                  min_new_tokens=n)
        if self.lookup:
            kw["prompt_lookup_num_tokens"] = self.lookup
        self.calls = 0
        seconds, out = timed(lambda: self.model.generate(x, **kw))
        tokens = out.shape[1] - len(ids)
        return dict(seconds=seconds, tokens=tokens, passes=self.calls, drafted=None,
                    accepted=tokens - self.calls, ids=out[0, len(ids):].tolist())


def llama_lookup(path, text, n, n_draft, threads):
    "One run of llama.cpp's llama-lookup: its decode time and counts, read from its log."
    cmd = [path, "-m", str(embedded_model_path()), "-p", text, "-n", str(n), "--spec-draft-n-max", str(n_draft),
           "-t", str(threads), "--temp", "0", "--seed", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    written = run.stdout[run.stdout.index(text) + len(text):]  # it echoes the prompt, then writes
    get = lambda key: float(re.search(rf"{key}\s*=\s*([\d.]+)", log).group(1))
    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    n_predict, n_accept = get("n_predict"), get("n_accept")
    # its decode time excludes the prompt's evaluation, as ours does once the prefill is subtracted
    return dict(seconds=float(decoded.group(2)), tokens=int(decoded.group(1)), passes=n_predict - n_accept,
                drafted=int(get("n_drafted")), accepted=int(n_accept), ids=None, text=written)


@torch.inference_mode()
def forward_cost(model, n_draft, rounds, context=100):
    """Seconds of one forward pass over k = 1 .. n_draft + 1 new tokens after a `context`-token prefill, relative to
    k = 1: medians over `rounds` interleaved rounds (a burst of other load hits every k alike), after one round of
    warm-up. Which tokens does not matter for the time, so they are random."""
    ks = range(1, n_draft + 2)
    tokens = torch.randint(100, 1000, (1, context + max(ks)), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in ks}
    model.forward(tokens[:, :context], 0, last_only=True)  # each pass below rewrites only positions >= context
    for r in range(rounds + 1):
        for k in ks:
            t = time.perf_counter()
            model.forward(tokens[:, context:context + k], context)
            if r:
                times[k].append(time.perf_counter() - t)
    base = statistics.median(times[1])
    return dict(context=context, k=list(ks), seconds=[statistics.median(times[k]) for k in ks],
                relative=[statistics.median(times[k]) / base for k in ks])


def replay(draft, prompt, gen):
    """Greedy speculation is plain greedy, so a draft's passes on a known greedy continuation `gen` can be counted
    without the model: each step accepts the longest drafted prefix that matches, plus the next token. Returns
    tokens per forward pass (the prefill's pass included)."""
    draft.reset()
    tokens, pos, passes = prompt + gen[:1], 1, 1
    while pos < len(gen):
        k = min(draft.length(), len(gen) - pos - 1)
        guess = draft.propose([tokens], [k])[0][0][:k]  # a batch of one row
        n = 0
        while n < len(guess) and guess[n] == gen[pos + n]:
            n += 1
        draft.record([tokens], [len(guess)], [n])
        tokens += gen[pos:pos + n + 1]
        pos, passes = pos + n + 1, passes + 1
    return len(gen) / passes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="rounds of interleaved runs (medians over them)")
    p.add_argument("--gen", type=int, default=96, help="tokens to decode per run")
    p.add_argument("--n-draft", type=int, default=8, help="the longest draft")
    p.add_argument("--llama-lookup", metavar="PATH", default=None, help="llama.cpp's llama-lookup binary")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT.parent / "llama2_edu" / "results")
    p.add_argument("--only-cost", action="store_true",
                   help="measure only the forward-pass cost (--runs rounds), into an existing speculate.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.only_cost:
        path = a.out / "speculate.json"
        results = json.loads(path.read_text())
        results["forward_cost"] = forward_cost(llama2_edu.load(device="cpu").model, a.n_draft, a.runs)
        results["forward_cost"]["command"] = "python benchmarks/speculate.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(" ".join(f"{k}:{r:.2f}" for k, r in zip(results["forward_cost"]["k"], results["forward_cost"]["relative"])))
        return

    base = llama2_edu.load(device="cpu")  # the default path: the file's own precision
    llama = S.Llama(base.model, base.tokenizer)
    print("forward-pass cost ...", flush=True)
    cost = forward_cost(base.model, a.n_draft, max(a.runs, 5))
    print(" ".join(f"{k}:{r:.2f}" for k, r in zip(cost["k"], cost["relative"])), flush=True)
    drafts = {"ours lookup (adaptive)": lambda: S.PromptLookup(a.n_draft),  # speculate="lookup", longest 8
              "ours lookup (fixed length)": lambda: S.PromptLookup(a.n_draft, adaptive=False)}
    contenders = {"ours plain": Ours(llama), **{name: Ours(llama, d()) for name, d in drafts.items()}}
    if not a.no_transformers:
        from transformers import AutoModelForCausalLM
        path = embedded_model_path()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32).eval()
        contenders["transformers plain"] = Transformers(hf)
        contenders["transformers prompt lookup"] = Transformers(hf, lookup=a.n_draft)

    results = dict(
        machine=dict(cpu=cpu_name(), threads=a.threads, torch=torch.__version__, python=platform.python_version()),
        command="python benchmarks/speculate.py " + " ".join(argv if argv is not None else sys.argv[1:]).replace(
            a.llama_lookup or "\0", "path/to/llama-lookup"),
        gen_tokens=a.gen, runs=a.runs, n_draft=a.n_draft, forward_cost=cost, prompts={})
    from tqdm import tqdm
    for name, (kind, text) in tqdm(PROMPTS.items(), desc="prompts", disable=False):
        ids = llama.encode_prompt(text)
        for c in contenders.values():  # warm up
            c.run(ids, 4)
        runs = {c: [] for c in contenders}
        if a.llama_lookup:
            runs["llama.cpp llama-lookup"] = []
        for _ in range(a.runs):
            prefill = {}  # each engine's prefill (and first token), measured in the round, then subtracted
            for cname, c in contenders.items():
                engine = cname.split()[0]
                if engine not in prefill:
                    prefill[engine] = c.run(ids, 1)["seconds"]
                r = c.run(ids, a.gen)
                r["seconds"] -= prefill[engine]
                r["tokens"] -= 1
                runs[cname].append(r)
            if a.llama_lookup:
                runs["llama.cpp llama-lookup"].append(llama_lookup(a.llama_lookup, text, a.gen, a.n_draft,
                                                                   a.threads))
        rows = {}
        for cname, rs in runs.items():
            r = rs[0]
            rows[cname] = dict(tok_s=statistics.median(x["tokens"] / x["seconds"] for x in rs),
                               tokens=r["tokens"] + (r["ids"] is not None), passes=r["passes"],
                               tokens_per_step=(r["tokens"] + (r["ids"] is not None)) / r["passes"],
                               drafted=r["drafted"], accepted=r["accepted"],
                               acceptance=(r["accepted"] / r["drafted"]) if r["drafted"] else None)
        plain_ids = runs["ours plain"][0]["ids"]
        same = all(runs[c][0]["ids"] == plain_ids for c in drafts)
        for cname in drafts:  # replaying a draft on its run's text counts what the run counted
            if runs[cname][0]["ids"] == plain_ids:
                counted = replay(drafts[cname](), ids, runs[cname][0]["ids"])
                assert abs(counted - rows[cname]["tokens_per_step"]) < 1e-9, (cname, counted)
        if a.llama_lookup:  # our drafts on llama-lookup's own text: draft against draft
            r = runs["llama.cpp llama-lookup"][0]
            theirs = base.tokenizer.encode(r["text"], bos=False, eos=False)[:r["tokens"]]
            rows["llama.cpp llama-lookup"]["text"] = r["text"]
            rows["llama.cpp llama-lookup"]["ours_on_this_text"] = {
                cname: replay(d(), ids, theirs) for cname, d in drafts.items()}
        if not a.no_transformers:  # and on transformers' greedy text (its plain run's, which its lookup's equals)
            theirs = runs["transformers plain"][0]["ids"]
            rows["transformers prompt lookup"]["same_tokens_as_plain"] = (
                runs["transformers prompt lookup"][0]["ids"] == theirs)
            rows["transformers prompt lookup"]["ours_on_this_text"] = {
                cname: replay(d(), ids, theirs) for cname, d in drafts.items()}
        for cname in rows:
            plain = "transformers plain" if cname.startswith("transformers") else "ours plain"
            if cname.startswith("llama.cpp"):
                continue
            rows[cname]["speedup"] = rows[cname]["tok_s"] / rows[plain]["tok_s"]
        results["prompts"][name] = dict(kind=kind, prompt_tokens=len(ids), same_tokens_as_plain=same,
                                        text=base.tokenizer.decode(runs["ours plain"][0]["ids"]), contenders=rows)
        print(f"\n{name} ({kind}): same tokens {same}", flush=True)
        for cname, r in rows.items():
            print(f"  {cname:>28}: {r['tok_s']:6.2f} tok/s  x{r.get('speedup', float('nan')):.2f}  "
                  f"{r['tokens_per_step']:.2f} tok/step  accept {r['acceptance']}", flush=True)
        (a.out / "speculate.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, a.out)


def plot(results, out: Path):
    "The chapter's figure: speed-up over plain decoding and tokens per step, per prompt and contender."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["prompts"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    shown = ["ours lookup (adaptive)", "ours lookup (fixed length)", "transformers prompt lookup",
             "llama.cpp llama-lookup"]
    width = 0.8 / len(shown)
    for i, cname in enumerate(shown):
        rows = [results["prompts"][n]["contenders"].get(cname) for n in names]
        x = [j + i * width for j in range(len(names))]
        if cname != "llama.cpp llama-lookup":
            axes[0].bar(x, [r["speedup"] if r else 0 for r in rows], width, label=cname)
        axes[1].bar(x, [r["tokens_per_step"] if r else 0 for r in rows], width, label=cname)
    for ax, ylabel in zip(axes, ["speed-up over plain greedy (x)", "tokens per forward pass"]):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=15)
        ax.set_ylabel(ylabel)
        ax.axhline(1, color="gray", lw=0.8)
    axes[0].set_title("Speed-up (each engine against its own plain decoding)")
    axes[1].set_title("Tokens per pass (each engine on its own text)")
    axes[1].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"Prompt lookup on the embedded model: {m['cpu']}, {m['threads']} threads", fontsize=10)
    plt.tight_layout()
    fig.savefig(out / "speculate.png", dpi=120)


if __name__ == "__main__":
    main()
