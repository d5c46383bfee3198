"""Check every CUDA-only path of llama2_edu on a GPU, with random Llama 2 7B weights.

    python tools/gpu_check.py               # any CUDA machine: an H100, an A100, a T4
    python tools/gpu_check.py --only int4   # one check (repeat --only for more)

In Colab (Runtime -> Change runtime type -> a GPU), in a cell:

    !git clone -q https://github.com/llama2-edu/llama2-edu
    !pip install -q -e llama2-edu
    !python llama2-edu/tools/gpu_check.py

Nothing is downloaded: the script writes random weights of Llama 2 7B's shapes
(chapter 2's LLAMA2_ARGS["7B"]) as a Hugging Face checkpoint in a temporary folder
(13.5 GB of fp16, written a layer at a time, with a tokenizer.model of 32,000 pieces),
and every check loads it with the package's one `load` (chapter 13), as a user loads a
model: the same weights each time, in the check's precision. The checks, one function
each:

  fp16      the plain model in fp16: finite logits; they are the reference below
  bf16      the same weights in bf16 (GPUs of compute capability 8.0+ only)
  int8      Int8Linear, whose CUDA forward is forward_fused (chapter 10)
  int4      Int4Linear on CUDA's int4 kernel (bf16 GPUs only; a T4 gets int8)
  compile   compile_decoding, the decoding step compiled (load(compile=True))
  parallel  chapter 12's sharded model under NCCL, one GPU, a world of size 1

Each prints one line, PASS, FAIL or SKIP, with what it verified, its greedy decoding
rate (batch 1, an 8-token prompt, 32 new tokens, prefill excluded) and its peak GPU
memory.
The exit status is 1 if any check failed. A 16 GB T4 holds every check it can run (fp16
7B is 12.6 GiB); the whole run takes a few minutes, plus the time to write 13.5 GB and to
read it once per check (from the page cache where the host's memory holds it).

`--tiny --device cpu` runs the same code on the CPU with a tiny random model (gloo in
place of NCCL, the CPU kernels in place of the CUDA ones, torch.compile's aot_eager
backend in place of inductor): it checks this script, not a GPU, and
tests/test_gpu_check.py runs it. Memory is then the process's peak RSS so far. Without
a CUDA device and without those options the script stops with one `error:` line and exit
status 2.
"""
import argparse
import dataclasses
import gc
import json
import os
import resource
import socket
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

CHECKS = ("fp16", "bf16", "int8", "int4", "compile", "parallel")
PROMPT_LEN = 8
SEED = 0
# the relative error ||logits - reference|| / ||reference|| allowed, the reference being
# the fp16 model's logits on the same weights (compile: the eager step's). With random
# weights the errors grow with depth: on the CPU, dim 1024, int4's error went from 0.22
# (2 layers) to 0.35 (16 layers), int8's from 0.025 to 0.039, bf16's from 0.009 to
# 0.016. An unrelated random model is at about 1.4.
TOLERANCE = {"bf16": 0.05, "int8": 0.1, "int4": 0.6, "compile": 0.05, "parallel": 1e-3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu only with --tiny: a check of this script, not of a GPU")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random model instead of Llama 2 7B's shapes")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per decode")
    p.add_argument("--only", action="append", choices=CHECKS,
                   help="run only this check (repeatable)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile's backend (default: inductor on a GPU; "
                   "aot_eager on the CPU, where inductor's C++ build takes long)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the model, random


def model_args(tiny: bool, max_seq_len: int):
    from llama2_edu.model_file import LLAMA2_ARGS, ModelArgs

    if tiny:  # grouped-query attention, and widths the int4 kernels accept
        return ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                         multiple_of=32, max_seq_len=max_seq_len, max_batch_size=1)
    return dataclasses.replace(LLAMA2_ARGS["7B"], max_seq_len=max_seq_len,
                               max_batch_size=1)


def write_checkpoint(folder: Path, args, device, seed: int = SEED) -> Path:
    """Random weights for `args` as a Hugging Face checkpoint in `folder`: fp16
    safetensors, one file per layer (the host holds one layer at a time), config.json
    and a tokenizer.model of args.vocab_size pieces. Norm gains 1, every other weight
    N(0, 0.02) drawn on `device` from a generator seeded by its name."""
    from safetensors.torch import save_file

    from llama2_edu.checkpoint import HF_CONFIG_KEYS, HF_TO_META
    from llama2_edu.model import Transformer, ffn_hidden_dim
    from llama2_edu.support import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL,
                                    TOKEN_UNKNOWN)
    from llama2_edu.tokenizer import spm_model_proto

    with torch.device("meta"):
        shapes = {name: w.shape for name, w in Transformer(args).state_dict().items()}
    hf_names = {meta: hf for hf, meta in HF_TO_META.items()}
    files = {}  # file -> its tensors' names: one file per layer, one for the rest
    for name in shapes:
        part = name.split(".")[1] if name.startswith("layers.") else "rest"
        files.setdefault(f"model-{part}.safetensors", []).append(name)
    for file, names in files.items():
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                w = torch.ones(shapes[name])
            else:
                g = torch.Generator(device).manual_seed(seed + zlib.crc32(name.encode()))
                w = torch.empty(shapes[name], device=device)
                w.normal_(0.0, 0.02, generator=g)
            layer, _, rest = name.removeprefix("layers.").partition(".")
            hf = (hf_names[f"layers.{{i}}.{rest}"].format(i=layer)
                  if name.startswith("layers.") else hf_names[name])
            tensors[hf] = w.to(torch.float16).cpu()
        save_file(tensors, folder / file)
    config = {key: getattr(args, field) for field, key in HF_CONFIG_KEYS.items()}
    config.update(model_type="llama", intermediate_size=ffn_hidden_dim(args),
                  max_position_embeddings=args.max_seq_len)
    (folder / "config.json").write_text(json.dumps(config))
    n = args.vocab_size - 3 - 256  # 3 special pieces, 256 bytes, n made-up words
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"w{i}" for i in range(n)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    proto = spm_model_proto(pieces, [0.0] * len(pieces), types + [TOKEN_NORMAL] * n)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return folder


def load_model(ctx, dtype=torch.float16, quantize=None):
    """The random checkpoint in `dtype`, quantized by `quantize`: built by llama2_edu's
    `load`, the one function that builds a model (with its KV cache in attention's
    layout, in fp32 on the CPU)."""
    from llama2_edu.program import load

    return load(ctx["ckpt"], device=ctx["device"], dtype=dtype, quantize=quantize,
                max_seq_len=ctx["args"].max_seq_len, max_batch_size=1)


def prompt_ids(args):
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, args.vocab_size, (PROMPT_LEN,), generator=g).tolist()


# ---------------------------------------------------------------- measuring


@torch.inference_mode()
def logits_of(model, ids, device):
    "The prefill's logits (1, PROMPT_LEN, vocab_size), fp32."
    return model.forward(torch.tensor([ids], device=device), 0)


def rel_error(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(llama, ids, n_tokens) -> float:
    """Tokens/s of greedy decoding with Llama.generate, batch 1, the prefill excluded:
    chapter 10's decode_rate (a warm-up run pays for allocation and compilation)."""
    from llama2_edu.levers import decode_rate as rate

    return rate(llama, ids, n_tokens)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak RSS {rss / 2**20:.1f} GiB"


def bf16_ok(device) -> bool:
    from llama2_edu.checkpoint import supports_bf16

    return supports_bf16(device)  # compute capability 8.0+, as load() decides


def half(device):
    "The activations' dtype load() picks: bf16 where the device computes in it."
    return torch.bfloat16 if bf16_ok(device) else torch.float16


def close(name, out, ref) -> tuple:
    err, tol = rel_error(out, ref), TOLERANCE[name]
    ok = bool(torch.isfinite(out).all()) and err < tol
    return ok, f"error {err:.3g} {'<' if ok else '>='} {tol:g}"


class Skip(Exception):
    "A check that does not apply to this device."


# ---------------------------------------------------------------- the checks
# each: (run) -> (passed, what it verified, tokens/s); ctx holds args, device, etc.


def check_fp16(ctx):
    llama = load_model(ctx, torch.float16)
    ref = logits_of(llama.model, ctx["ids"], ctx["device"])
    ok = bool(torch.isfinite(ref).all())
    ctx["reference"] = ref  # the other checks compare with these logits
    rate = decode_rate(llama, ctx["ids"], ctx["tokens"])
    return ok, "logits finite" if ok else "non-finite logits", rate


def check_bf16(ctx):
    if not bf16_ok(ctx["device"]):
        raise Skip("no bf16 on this GPU (compute capability < 8.0)")
    llama = load_model(ctx, torch.bfloat16)  # the fp16 weights, cast
    ok, what = close("bf16", logits_of(llama.model, ctx["ids"], ctx["device"]),
                     ctx["reference"])
    return ok, what, decode_rate(llama, ctx["ids"], ctx["tokens"])


def check_int8(ctx):
    from llama2_edu.levers import Int8Linear

    dtype = half(ctx["device"])
    llama = load_model(ctx, dtype, quantize="int8")
    layer = llama.model.layers[0].attention.wq
    assert isinstance(layer, Int8Linear)
    path = "_weight_int8pack_mm" if layer.on_cpu else "forward_fused"
    ok, what = close("int8", logits_of(llama.model, ctx["ids"], ctx["device"]),
                     ctx["reference"])
    rate = decode_rate(llama, ctx["ids"], ctx["tokens"])
    return ok, f"{path} {'bf16' if dtype == torch.bfloat16 else 'fp16'}, {what}", rate


def check_int4(ctx):
    from llama2_edu.levers import Int4Linear

    if not bf16_ok(ctx["device"]):
        raise Skip("CUDA's int4 kernel needs bf16 (load() uses int8 here)")
    llama = load_model(ctx, torch.bfloat16, quantize="int4")
    layer = llama.model.layers[0].feed_forward.w2
    assert isinstance(layer, Int4Linear)
    ok, what = close("int4", logits_of(llama.model, ctx["ids"], ctx["device"]),
                     ctx["reference"])
    rate = decode_rate(llama, ctx["ids"], ctx["tokens"])
    return ok, f"{layer.mm.__name__}, {what}", rate


@torch.no_grad()  # as the loop runs it: a compiled graph cannot take inference tensors
def check_compile(ctx):
    """The decoding step's logits, eager and compiled, after the same prefill; then the
    compiled decoding rate (its warm-up run pays for the compilation, timed apart)."""
    from llama2_edu.levers import compile_decoding

    # RoPE's complex arithmetic stays in eager kernels (chapter 10 says why)
    warnings.filterwarnings("ignore", "Torchinductor does not support code generation")
    device, ids = ctx["device"], ctx["ids"]
    llama = load_model(ctx, half(device))
    model = llama.model
    prompt = torch.tensor([ids], device=device)
    step = lambda: llama.decode_one_token(model, prompt[:, -1:], PROMPT_LEN - 1)
    model.forward(prompt[:, :-1], 0)
    eager = step()
    compile_decoding(llama, backend=ctx["backend"])
    model.forward(prompt[:, :-1], 0)  # the prefill stays eager
    sync(device)
    start = time.perf_counter()
    compiled = step()  # compiles
    sync(device)
    seconds = time.perf_counter() - start
    err, tol = rel_error(compiled, eager), TOLERANCE["compile"]
    ok = bool(torch.isfinite(compiled).all()) and err < tol
    verdict = "<" if ok else ">="
    what = f"{ctx['backend']} {seconds:.0f} s, error {err:.3g} {verdict} {tol:g}"
    try:
        return ok, what, decode_rate(llama, ids, ctx["tokens"])
    finally:
        torch._dynamo.reset()  # the compiled code lets go of the model's weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_parallel(ctx):
    """init_parallel (NCCL on a GPU, gloo on the CPU) in a world of one process, a
    tcp://127.0.0.1 rendezvous; an all-reduce; then the sharded model, which `load`
    builds in a process group, and whose logits must be the plain model's."""
    import torch.distributed as dist
    from llama2_edu.parallel import init_parallel

    for key, value in [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")]:
        os.environ.setdefault(key, value)
    device = init_parallel(ctx["device"])
    x = torch.arange(4, dtype=torch.float32, device=device)
    dist.all_reduce(x)  # a sum over one rank: x itself
    reduced = x.tolist() == [0.0, 1.0, 2.0, 3.0]
    llama = load_model(ctx, torch.float16)
    sharded = bool(llama.model.layers[0].attention._forward_hooks)  # its all-reduce
    ok, what = close("parallel", logits_of(llama.model, ctx["ids"], device),
                     ctx["reference"])
    rate = decode_rate(llama, ctx["ids"], ctx["tokens"])
    what = f"{dist.get_backend()}, all-reduce {'ok' if reduced else 'wrong'}, {what}"
    what = what if sharded else f"load() did not shard, {what}"
    return ok and reduced and sharded, what, rate


# ---------------------------------------------------------------- the run


def describe(device) -> str:
    if device.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        name = torch.cuda.get_device_name(device)
        gpu = f"{name}, {memory:.1f} GiB, compute capability {cap}"
    else:
        gpu = "CPU (--tiny --device cpu: a check of this script, not of a GPU)"
    return f"{gpu}\ntorch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


def run_check(name, ctx) -> bool:
    device = ctx["device"]
    reset_peak(device)
    try:
        ok, what, rate = globals()[f"check_{name}"](ctx)
    except Skip as why:
        print(f"SKIP {name}: {why}", flush=True)
        return True
    except Exception as e:  # one line, and the next check
        print(f"FAIL {name}: {type(e).__name__}: {e}".splitlines()[0][:88], flush=True)
        return False
    finally:  # the check's model goes before the next one is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    status = "PASS" if ok else "FAIL"
    print(f"{status} {name}: {what}, {rate:.0f} tok/s, {peak(device)}", flush=True)
    return ok


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.device == "cpu" and not opts.tiny:
        print("error: --device cpu runs only the tiny model: add --tiny.",
              file=sys.stderr)
        return 2
    if opts.device == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA device (torch {torch.__version__}); to check this script"
              ": --tiny --device cpu", file=sys.stderr)
        return 2
    device = torch.device(opts.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    args = model_args(opts.tiny, max_seq_len=PROMPT_LEN + opts.tokens + 8)
    print(describe(device))
    print(f"random weights: dim {args.dim}, {args.n_layers} layers, {args.n_heads} "
          f"heads ({args.n_kv_heads} KV), vocab {args.vocab_size}")
    print(f"decoding: greedy, batch 1, an {PROMPT_LEN}-token prompt, {opts.tokens} new "
          "tokens, prefill excluded")
    print("errors: of the logits, relative to the fp16 model's (compile: to eager's)")
    backend = opts.compile_backend or (
        "inductor" if device.type == "cuda" else "aot_eager"
    )
    names = [n for n in CHECKS if not opts.only or n in opts.only]
    if "fp16" not in names:
        names.insert(0, "fp16")  # the reference the others compare with
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        start = time.perf_counter()
        ckpt = write_checkpoint(Path(folder), args, device)
        print(f"checkpoint written in {time.perf_counter() - start:.0f} s: every check "
              "loads it with load()", flush=True)
        ctx = dict(args=args, device=device, ids=prompt_ids(args), tokens=opts.tokens,
                   backend=backend, ckpt=ckpt)
        for name in names:
            if name != "fp16" and "reference" not in ctx:
                print(f"FAIL {name}: no fp16 reference logits", flush=True)
                results.append(False)
                continue
            results.append(run_check(name, ctx))
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} checks passed or skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
