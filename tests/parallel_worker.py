"""Run by tests/test_parallel.py under `torchrun --nproc_per_node N`: every rank loads each checkpoint named in the
spec with `llama2_edu.load`, as a user would, and saves what it computed to `{out}/{name}.rank{R}.pt`.

    torchrun --standalone --nproc_per_node 2 tests/parallel_worker.py SPEC.json
"""
import json
import sys

import torch
import torch.distributed as dist

import llama2_edu
from llama2_edu.parallel import parameter_bytes

TOKENS = torch.tensor([[1, 5, 77, 200, 13, 9, 31, 383], [1, 300, 2, 64, 64, 8, 120, 3]])
PROMPTS = [[1, 5, 77, 200], [1, 300, 2, 64, 64, 8]]


def run(name: str, ckpt: str, out: str):
    try:
        llama = llama2_edu.load(ckpt, device="cpu", dtype=torch.float32, max_seq_len=64, max_batch_size=2)
    except ValueError as e:  # a model these ranks cannot split: every rank must say so
        torch.save(dict(error=str(e)), f"{out}/{name}.rank{dist.get_rank()}.pt")
        return
    model = llama.model
    result = dict(
        logits=model(TOKENS, 0),                                          # a prefill ...
        step=model(torch.tensor([[7], [11]]), TOKENS.shape[1]),           # ... and one decoding step after it
        greedy=llama.generate(PROMPTS, max_gen_len=8, temperature=0)[0],
        sampled=llama.generate(PROMPTS, max_gen_len=8, temperature=1.0, top_p=0.95)[0],  # torch's global RNG
        seeded=llama.generate(PROMPTS, max_gen_len=8, temperature=1.0, seed=1234)[0],
        parameter_bytes=parameter_bytes(model),
        cache_shape=tuple(model.layers[0].attention.cache.cache_k.shape),
        device=str(llama.device),
    )
    torch.save(result, f"{out}/{name}.rank{dist.get_rank()}.pt")


def entry_points(meta: str, gguf: str, hf256: str, out: str):
    """Llama.build with Meta's model_parallel_size, load()'s quantize= under torchrun, and one process's context rule
    and memory check on a checkpoint trained on 256 positions."""
    from llama2_edu import Llama
    world_size, result = dist.get_world_size(), {}
    llama = Llama.build(meta, max_seq_len=64, max_batch_size=2, model_parallel_size=world_size, device="cpu",
                        dtype=torch.float32)
    result["build_greedy"] = llama.generate(PROMPTS, max_gen_len=8, temperature=0)[0]
    for key, call in [("build_error", lambda: Llama.build(meta, model_parallel_size=world_size + 1, device="cpu")),
                      ("quantize_error", lambda: llama2_edu.load(gguf, device="cpu", quantize="int8")),
                      ("too_long_error", lambda: llama2_edu.load(hf256, device="cpu", max_seq_len=300)),
                      ("huge_cache_error", lambda: llama2_edu.load(hf256, device="cpu", max_batch_size=10**7))]:
        try:
            call()
        except ValueError as e:
            result[key] = str(e)
    # no max_seq_len: one process's rule, the trained context (256 positions here) up to 512
    result["default_max_seq_len"] = llama2_edu.load(hf256, device="cpu").args.max_seq_len
    llama = llama2_edu.load(gguf, device="cpu", max_seq_len=64, max_batch_size=2)  # quantize="auto"
    result["gguf_auto_dtype"] = str(llama.model.layers[0].attention.wq.weight.dtype)
    result["gguf_auto_greedy"] = llama.generate(PROMPTS, max_gen_len=8, temperature=0)[0]
    torch.save(result, f"{out}/entry_points.rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    for name, ckpt in spec["checkpoints"].items():
        run(name, ckpt, spec["out"])
    if spec.get("entry_points"):
        entry_points(spec["checkpoints"]["meta2"], spec["checkpoints"]["gguf"], spec["entry_points"], spec["out"])
