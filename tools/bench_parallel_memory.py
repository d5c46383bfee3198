"""Peak host memory per rank of `load` under torchrun (CPU, gloo), against one process loading it all.

    python tools/bench_parallel_memory.py                   # Meta, 2 shards, bf16, ~1 GB: 1, 2 and 4 processes
    python tools/bench_parallel_memory.py --shards 4 --gb 2

Writes a random Llama-shaped checkpoint in Meta's layout (TinyLlama-1.1B's widths, a small vocabulary), then in fresh processes loads it
with 1 process (plain python) and with N processes (torchrun --nproc_per_node N), runs one forward pass, reads every
parameter, and reports per rank: the parameters' bytes and the peak resident set size above the baseline of an
empty model (VmHWM - VmRSS before loading: the weights' pages and the loader's temporaries).
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
DIM, FFN, HEADS = 2048, 5632, 16


def write(root: Path, gb: float, n_shards: int, dtype) -> Path:
    "A random Meta checkpoint of about `gb` GB in `dtype`, with a small trained tokenizer beside it."
    from checkpoints import TINY_VOCAB, random_state_dict, tiny_args, train_tokenizer, write_meta
    size = torch.finfo(dtype).bits // 8
    n_layers = max(1, round(gb * 1e9 / ((4 * DIM * DIM + 3 * DIM * FFN) * size)))
    params = dict(dim=DIM, n_layers=n_layers, n_heads=HEADS, n_kv_heads=HEADS, vocab_size=-1, multiple_of=256,
                  norm_eps=1e-5, ffn_dim_multiplier=FFN / 5461)  # 2/3 * 4 * 2048 = 5461 -> 5632 after rounding
    train_tokenizer(root / "tokenizer.model")
    args = tiny_args(**{**params, "vocab_size": TINY_VOCAB})
    state_dict = {name: w.to(dtype) for name, w in random_state_dict(args).items()}
    return write_meta(root / f"meta{n_shards}", state_dict, params, n_shards=n_shards, dtype=dtype)

CHILD = r"""
import json, os, sys, torch
def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
from llama2_edu import load
from llama2_edu.model import Transformer
from llama2_edu.model_file import ModelArgs
from llama2_edu.parallel import parameter_bytes
with torch.device("meta"):
    Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=100, max_seq_len=16, max_batch_size=1))
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # join the group first: its buffers are baseline, not weights
    from llama2_edu.parallel import init_parallel
    init_parallel("cpu")
baseline = status_mb("VmRSS")
model = load(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]), max_seq_len=16, max_batch_size=1,
             quantize=None).model  # under torchrun: this rank's slice
with torch.inference_mode():
    model(torch.tensor([[1, 2, 3, 4]]), 0)
for p in model.parameters():
    p.sum()
result = dict(rank=int(os.environ.get("RANK", "0")), parameter_mb=parameter_bytes(model) / 2**20,
              peak_above_baseline_mb=status_mb("VmHWM") - baseline)
with open(os.path.join(sys.argv[3], f"rank{result['rank']}.json"), "w") as f:  # stdout lines would interleave
    json.dump(result, f)
"""


def run(ckpt: Path, dtype: str, n: int, tmp: Path) -> list:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={n}"]
    results = tmp / f"results{n}"
    results.mkdir()
    out = subprocess.run([*launcher, str(script), str(ckpt), dtype, str(results)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{n} process(es) failed:\n{out.stderr[-3000:]}")
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2, help="model-parallel shards of the checkpoint")
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB")
    parser.add_argument("--dtype", default="bfloat16", help="checkpoint dtype, also the dtype loaded to")
    parser.add_argument("--ranks", default="1,2,4", help="process counts to compare")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write(Path(tmp), opts.gb, opts.shards, getattr(torch, opts.dtype))
        print(f"{'processes':>9} {'rank':>4} {'parameters':>12} {'peak RSS above baseline':>24}")
        for n in map(int, opts.ranks.split(",")):
            for r in run(ckpt, opts.dtype, n, Path(tmp)):
                print(f"{n:9d} {r['rank']:4d} {r['parameter_mb']:8.0f} MiB {r['peak_above_baseline_mb']:20.0f} MiB",
                      flush=True)


if __name__ == "__main__":
    main()
