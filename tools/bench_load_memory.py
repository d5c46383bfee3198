"""Peak host memory of `load_checkpoint` on a >= 1 GB random checkpoint, against the checkpoint's size.

    python tools/bench_load_memory.py                      # Meta (1, 2 and 4 shards) and HF safetensors, bf16, ~1.2 GB
    python tools/bench_load_memory.py --layouts hf --gb 2  # one layout, a bigger checkpoint

Writes random Llama-shaped weights (dim 2048, Llama 2's vocabulary size) to a temporary directory, then loads them
to the CPU, in the checkpoint's own dtype, in a fresh subprocess, runs one forward pass and sums every parameter (so
every page of every weight has really been read), and reports the subprocess's load time and peak resident set size (VmHWM: anonymous memory plus the pages of
memory-mapped files it touched; unlike ru_maxrss it does not inherit the parent's peak across fork). Goal (issue 4): peak RSS <= 1.25 x checkpoint bytes.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DIM, FFN, VOCAB, HEADS = 2048, 5632, 32000, 16  # TinyLlama-1.1B-like widths
CHILD = r"""
import json, os, resource, sys, time, torch
def status_mb(key):  # VmRSS: resident now; VmHWM: peak resident (anonymous + file-backed pages), MiB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
from llama2_edu.checkpoint import load_checkpoint
from llama2_edu.model import Transformer
from llama2_edu.model_file import ModelArgs
with torch.device("meta"):  # building any model imports ~70 MiB of library code (torch._dynamo, sympy): baseline, not weights
    Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=100, max_seq_len=16, max_batch_size=1))
baseline = status_mb("VmRSS")
start = time.perf_counter()
model, _ = load_checkpoint(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]), max_seq_len=16, max_batch_size=1)
load_s = time.perf_counter() - start
model(torch.tensor([[1, 2, 3, 4]]), 0)  # a forward pass works ...
for p in model.parameters():  # ... and every page of every weight is read (the forward reads only 4 embedding rows)
    p.sum()
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork (here the random weights we wrote)
print(json.dumps(dict(baseline_mb=baseline, peak_mb=status_mb("VmHWM"), load_s=load_s)))
"""


def params_for(gb: float, dtype) -> dict:
    "params.json of a model whose weights take about `gb` GB in `dtype`."
    size = torch.finfo(dtype).bits // 8
    per_layer = (4 * DIM * DIM + 3 * DIM * FFN + 2 * DIM) * size
    n_layers = max(1, round((gb * 1e9 - 2 * VOCAB * DIM * size) / per_layer))
    return dict(dim=DIM, n_layers=n_layers, n_heads=HEADS, n_kv_heads=HEADS, vocab_size=VOCAB, multiple_of=256, norm_eps=1e-5,
                ffn_dim_multiplier=FFN / 5461)  # 2/3 * 4 * 2048 = 5461 -> 5632 after rounding


def random_weights(args, dtype) -> dict:
    from checkpoints import random_state_dict
    return {name: w.to(dtype) for name, w in random_state_dict(args).items()}


def write(layout: str, root: Path, gb: float, dtype) -> Path:
    "Write the checkpoint in a subprocess-free way; returns its directory."
    from checkpoints import hf_config, tiny_args, to_hf, write_meta
    from safetensors.torch import save_file

    from llama2_edu.tokenizer import fetch_llama2_vocab
    params = params_for(gb, dtype)
    args = tiny_args(**{k: v for k, v in params.items()}, max_seq_len=16, max_batch_size=1)
    # Llama 2's own 32,000-piece tokenizer.model (the loader checks it against the weights' vocabulary),
    # beside the Meta directories, where Meta's download puts it
    tokenizer = root / "tokenizer.model"
    if not tokenizer.exists():
        tokenizer.write_bytes((fetch_llama2_vocab().parent / "tokenizer.model").read_bytes())
    state_dict = random_weights(args, dtype)
    if layout.startswith("meta"):
        n_shards = int(layout[4:] or 1)
        return write_meta(root / layout, state_dict, params, n_shards=n_shards, dtype=dtype)
    ckpt = root / layout
    ckpt.mkdir()
    hf_config(args).save_pretrained(ckpt)
    save_file(to_hf(state_dict, args), ckpt / "model.safetensors", metadata={"format": "pt"})
    (ckpt / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return ckpt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="meta1,meta2,meta4,hf", help="comma-separated: meta1, meta2, meta4, hf")
    parser.add_argument("--gb", type=float, default=1.2, help="checkpoint size in GB (>= 1)")
    parser.add_argument("--dtype", default="bfloat16", help="checkpoint dtype, also the dtype loaded to")
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in opts.layouts.split(","):
            ckpt = write(layout, Path(tmp), opts.gb, dtype)
            nbytes = sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix in (".pth", ".safetensors"))
            env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), opts.dtype], capture_output=True,
                                 text=True, env=env, cwd=ROOT)
            if out.returncode:
                sys.exit(f"loading {layout} failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(dict(layout=layout, checkpoint_mb=nbytes / 2**20, **r,
                             ratio=r["peak_mb"] * 2**20 / nbytes,
                             ratio_above_baseline=(r["peak_mb"] - r["baseline_mb"]) * 2**20 / nbytes))
            for p in ckpt.iterdir():
                p.unlink()
            ckpt.rmdir()
    print(f"{'layout':8} {'checkpoint':>12} {'baseline RSS':>13} {'peak RSS':>10} {'peak/ckpt':>10} {'(peak-base)/ckpt':>17} "
          f"{'load time':>10}")
    for r in rows:
        print(f"{r['layout']:8} {r['checkpoint_mb']:9.0f} MiB {r['baseline_mb']:9.0f} MiB {r['peak_mb']:6.0f} MiB "
              f"{r['ratio']:10.2f} {r['ratio_above_baseline']:17.2f} {r['load_s']:8.2f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
