"""Measurements behind chapter 15's choices, on this machine's CPU:

    python benchmarks/engine.py            # ~2 min on 2 cores, nothing else running

- `sdpa`: microseconds per SDPA call on one decoding row's shapes (the embedded model's
  9 query heads, 3 key/value heads of 64 values, 256 keys), in fp32 and in bf16;
- `padding`: in how many of 15 cases (rows of 5, 37, 100, 130 and 600 keys, three random
  draws each) a row's bf16 attention output keeps its bits when its keys are padded with
  7, 50 or 300 masked positions (as a gathered batch would pad them);
- `rows`: the numbers of rows M (1-16) among which a row of an fp32 nn.Linear(576, 1536)
  gets other bits than among 16 rows, and the same for the embedded model's int4 layer;
- `fixed_shape`: the engine's decoding throughput with 1 and 8 requests, with decoding
  rows padded to max_num_seqs = 8 and without, for the file's precision and fp32.

Writes llama2_edu/results/engine.json. A script, not a test: it asserts nothing.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import cpu_name  # noqa: E402

from llama2_edu.engine import Engine, SamplingParams  # noqa: E402
from llama2_edu.program import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def sdpa_us(dtype, n_keys=256, calls=2000) -> float:
    "Microseconds per SDPA call for one decoding row."
    q = torch.randn(1, 9, 1, 64, dtype=dtype)
    k, v = (torch.randn(1, 3, n_keys, 64, dtype=dtype) for _ in range(2))
    for _ in range(100):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    start = time.perf_counter()
    for _ in range(calls):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return (time.perf_counter() - start) / calls * 1e6


def padding_keeps_bits(pad: int, n_keys: int, seed: int) -> bool:
    "Does a bf16 row attend to `pad` masked extra keys with the same result?"
    torch.manual_seed(seed)
    q = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3, n_keys, 64, dtype=torch.bfloat16) for _ in range(2))
    alone = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    zeros = torch.zeros(1, 3, pad, 64, dtype=torch.bfloat16)
    mask = (torch.arange(n_keys + pad) < n_keys)[None, None, None]
    padded = F.scaled_dot_product_attention(
        q, torch.cat([k, zeros], 2), torch.cat([v, zeros], 2), attn_mask=mask,
        enable_gqa=True,
    )  # fmt: skip
    return torch.equal(alone, padded)


def rows_that_differ(layer, dtype) -> list:
    "The M in 1..16 among which a row gets other bits than among 16 rows."
    torch.manual_seed(0)
    x = torch.randn(16, 1, 576, dtype=dtype)
    with torch.no_grad():
        reference = layer(x)
        return [m for m in range(1, 17) if not torch.equal(layer(x[:m]), reference[:m])]


def decode_rate(dtype, fixed_shape: bool, n_requests: int, tokens=48) -> float:
    "Output tokens per second of the engine's decoding steps (prompts excluded)."
    engine = Engine(load(max_batch_size=8, max_seq_len=1024, dtype=dtype),
                    fixed_shape=fixed_shape, prefix_caching=False)  # fmt: skip
    ids = engine.tokenizer.encode((ROOT / "README.md").read_text(), False, False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(n_requests):
        engine.add_request(ids[50 * i : 50 * i + 64], params)
    while any(r.num_computed < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.waiting:  # fmt: skip
        engine.step()
    start, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += len(engine.step())
    return n / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "llama2_edu/results/engine.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = dict(
        command="python benchmarks/engine.py" + " ".join([""] + list(argv or sys.argv[1:])),
        machine=dict(cpu=cpu_name(), threads=a.threads, torch=torch.__version__,
                     python=platform.python_version()),
    )  # fmt: skip
    out["sdpa_us"] = {"fp32": sdpa_us(torch.float32), "bf16": sdpa_us(torch.bfloat16)}
    print("SDPA per decoding row (us):", out["sdpa_us"], flush=True)
    cases = [(n, seed) for n in (5, 37, 100, 130, 600) for seed in range(3)]
    out["padding_keeps_bits"] = {
        pad: f"{sum(padding_keeps_bits(pad, *c) for c in cases)} of {len(cases)}"
        for pad in (7, 50, 300)
    }
    print(
        "bf16 row unchanged by masked padding:", out["padding_keeps_bits"], flush=True
    )
    fp32 = torch.nn.Linear(576, 1536, bias=False)
    int4 = load(max_batch_size=1).model.layers[0].feed_forward.w1
    out["rows_that_differ"] = {
        "fp32 nn.Linear(576, 1536)": rows_that_differ(fp32, torch.float32),
        "int4 (the file's w1 of layer 0, bf16 activations)": rows_that_differ(
            int4, torch.bfloat16
        ),
    }
    print("M whose rows differ from M=16:", out["rows_that_differ"], flush=True)
    rates = {}
    for name, dtype in (("file's precision", None), ("fp32", torch.float32)):
        for fixed in (False, True):
            for n in (1, 8):
                key = f"{name}, {'fixed shape' if fixed else 'free shape'}, {n}"
                rates[key] = decode_rate(dtype, fixed, n)
                print(f"  {key}: {rates[key]:.0f} tok/s", flush=True)
    out["decode_tok_s"] = rates
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
