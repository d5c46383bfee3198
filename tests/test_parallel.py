"""Tensor parallelism (chapter 12): `llama2_edu.load` under `torchrun` on 2 and 4 CPU processes (gloo), on tiny random
checkpoints in Meta's (1, 2, 4 shards, GQA), Hugging Face's (untied and tied) and GGUF (Q8_0) layouts. Every rank must
compute the single-process model's logits and tokens while holding only its slice of the weights and of the KV cache.

Starting processes is the slow part, so there are three launches: one of 2 ranks and one of 4 (each loads many
checkpoints, tests/parallel_worker.py), and the command line under torchrun."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from checkpoints import (TINY_PARAMS, random_state_dict, tiny_args, train_tokenizer, write_gguf, write_hf,
                         write_meta)
from llama2_edu import load
from llama2_edu.checkpoint import meta_split_dim
from llama2_edu.model import Transformer
from llama2_edu.parallel import check_world_size, shard_model, shards_of_rank
from parallel_worker import PROMPTS, TOKENS

TESTS = Path(__file__).parent
SIZES = dict(device="cpu", dtype=torch.float32, max_seq_len=64, max_batch_size=2)  # plain fp32 layers


def torchrun(n: int, *args, timeout=600):
    "Run `torchrun --standalone --nproc_per_node n ARGS` (one CPU thread per process, no progress bars)."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    "The checkpoints (one set of random weights in every layout), transformers' logits, and two models no 2 ranks can split."
    root = tmp_path_factory.mktemp("parallel")
    tokenizer_model = train_tokenizer(root / "tokenizer.model")
    args = tiny_args()
    state_dict = random_state_dict(args)
    paths = {f"meta{n}": write_meta(root / f"meta{n}", state_dict, n_shards=n) for n in (1, 2, 4)}
    hf_model = write_hf(root / "hf", state_dict, args, tokenizer_model)
    tied_args = tiny_args(tie_word_embeddings=True)
    write_hf(root / "hf_tied", random_state_dict(tied_args, seed=1), tied_args, tokenizer_model,
             tie_word_embeddings=True)
    paths["hf"], paths["hf_tied"], paths["hf_bin"] = root / "hf", root / "hf_tied", root / "hf_bin"
    paths["hf256"] = root / "hf256"  # trained on 256 positions
    write_hf(paths["hf256"], state_dict, tiny_args(max_seq_len=256), tokenizer_model)
    paths["hf_bin"].mkdir()  # PyTorch's .bin: memory-mapped, each rank un-permutes its slice in place
    for name in ["config.json", "tokenizer.model"]:
        shutil.copy(root / "hf" / name, paths["hf_bin"])
    torch.save(hf_model.state_dict(), paths["hf_bin"] / "pytorch_model.bin")
    paths["gguf"] = write_gguf(root / "tiny.gguf", state_dict, args, tokenizer_model,
                               qtype=gguf.GGMLQuantizationType.Q8_0)
    for name, n_kv_heads, n_shards in [("bad_heads", 3, 1),    # 3 KV heads: not for 2 ranks
                                       ("bad_shards", 6, 3)]:  # 6 heads suit 2 ranks, but 3 shards do not
        six_heads = dict(dim=48, n_heads=6, n_kv_heads=n_kv_heads)
        weights = random_state_dict(tiny_args(**six_heads))
        paths[name] = write_meta(root / name, weights, {**TINY_PARAMS, **six_heads}, n_shards=n_shards)
    with torch.no_grad():
        ref = hf_model(TOKENS).logits
    return dict(root=root, paths=paths, ref=ref, state_dict=state_dict, bin_sha256=bin_sha256(paths["hf_bin"]))


def bin_sha256(ckpt):
    return hashlib.sha256((ckpt / "pytorch_model.bin").read_bytes()).hexdigest()


def launch(ckpts, n: int, names, entry_points=False) -> dict:
    "Load each named checkpoint on `n` ranks; {name: [rank 0's result, rank 1's, ...]}."
    out = ckpts["root"] / f"ranks{n}"
    out.mkdir()
    spec = ckpts["root"] / f"spec{n}.json"
    spec.write_text(json.dumps(dict(out=str(out), checkpoints={k: str(ckpts["paths"][k]) for k in names},
                                    entry_points=entry_points and str(ckpts["paths"]["hf256"]))))
    run = torchrun(n, TESTS / "parallel_worker.py", spec)
    assert run.returncode == 0, run.stderr[-3000:]
    names = [*names, "entry_points"] if entry_points else names
    return {k: [torch.load(out / f"{k}.rank{r}.pt") for r in range(n)] for k in names}


@pytest.fixture(scope="module")
def ranks2(ckpts):
    return launch(ckpts, 2, ["meta1", "meta2", "meta4", "hf", "hf_bin", "hf_tied", "gguf", "bad_heads",
                             "bad_shards"],
                  entry_points=True)


@pytest.fixture(scope="module")
def ranks4(ckpts):
    return launch(ckpts, 4, ["meta4", "meta2", "hf"])


@pytest.fixture(scope="module")
def single(ckpts):
    "What one process computes for each checkpoint: the reference the ranks must reproduce."
    out = {}
    for name in ["meta2", "hf_tied", "gguf"]:
        llama = load(ckpts["paths"][name], **SIZES)
        out[name] = dict(logits=llama.model(TOKENS, 0), step=llama.model(torch.tensor([[7], [11]]), TOKENS.shape[1]),
                         greedy=llama.generate(PROMPTS, max_gen_len=8, temperature=0)[0],
                         seeded=llama.generate(PROMPTS, max_gen_len=8, temperature=1.0, seed=1234)[0],
                         parameter_bytes={n: sum(expected_bytes(llama.model, n)) for n in (1, 2, 4)})
    return out


def expected_bytes(model, n: int):
    "A rank's share of every parameter: 1/n of each split matrix, all of each replicated norm."
    for name, w in model.state_dict().items():
        yield w.numel() * w.element_size() // (1 if meta_split_dim(name) is None else n)


def close(a, b, tol):
    "Equal to `tol` relative to the logits' scale (a tied random model's logits reach 40: fp32 keeps 7 digits)."
    return (a - b).abs().max() <= tol * b.abs().max().clamp(min=1)


def same_as_single(results, ref):
    for r in results:
        assert close(r["logits"], ref["logits"], 1e-5) and close(r["step"], ref["step"], 1e-5)
        assert r["greedy"] == ref["greedy"] and r["seeded"] == ref["seeded"]


@pytest.mark.parametrize("name", ["meta1", "meta2", "meta4", "hf", "hf_bin"])
def test_two_ranks_match_one_process_and_transformers(ranks2, single, ckpts, name):
    results = ranks2[name]
    same_as_single(results, single["meta2"])  # the same weights in every layout
    for r in results:
        assert close(r["logits"], ckpts["ref"], 1e-4)
        assert r["cache_shape"] == (2, 64, 2, 8)  # 4 KV heads, 2 per rank
        assert r["parameter_bytes"] == single["meta2"]["parameter_bytes"][2]


@pytest.mark.parametrize("name", ["hf_tied", "gguf"])
def test_two_ranks_tied_and_gguf(ranks2, single, name):
    same_as_single(ranks2[name], single[name])
    for r in ranks2[name]:
        assert r["parameter_bytes"] == single[name]["parameter_bytes"][2]


@pytest.mark.parametrize("name", ["meta4", "meta2", "hf"])
def test_four_ranks_match_one_process_and_transformers(ranks4, single, ckpts, name):
    results = ranks4[name]
    same_as_single(results, single["meta2"])
    for r in results:
        assert close(r["logits"], ckpts["ref"], 1e-4)
        assert r["cache_shape"] == (2, 64, 1, 8)  # one KV head per rank
        assert r["parameter_bytes"] == single["meta2"]["parameter_bytes"][4]
    total = single["meta2"]["parameter_bytes"][1]
    assert results[0]["parameter_bytes"] < 0.26 * total  # norms are the only replicated weights


def test_ranks_never_write_the_mapped_bin_file(ranks2, ckpts):
    "Un-permuting wq/wk in place touches a private mapping: the file on disk is unchanged."
    assert bin_sha256(ckpts["paths"]["hf_bin"]) == ckpts["bin_sha256"]


def test_ranks_sample_the_same_tokens(ranks2, ranks4):
    "Sampling from torch's global RNG: every rank was seeded with rank 0's seed, so all draw the same tokens."
    for results in [*ranks2.values(), *ranks4.values()]:
        if "sampled" in results[0]:  # a model that loaded
            assert all(r["sampled"] == results[0]["sampled"] for r in results)
            assert all(torch.equal(r["logits"], results[0]["logits"]) for r in results)  # bit for bit


def test_unsplittable_models_are_one_line_errors(ranks2):
    for name, expected in [("bad_heads", "2 processes cannot split this model's 3 key/value heads evenly: start "
                                         "torchrun with --nproc_per_node 1 or 3."),
                           ("bad_shards", "A checkpoint of 3 model-parallel shards cannot be divided among 2 processes")]:
        assert all(r["error"].startswith(expected) and "\n" not in r["error"] for r in ranks2[name])


def test_build_and_quantize_under_torchrun(ranks2, single):
    "Llama.build checks Meta's model_parallel_size; load() runs a GGUF file in plain layers (no quantization)."
    results = ranks2["entry_points"]
    for r in results:
        assert r["build_greedy"] == single["meta2"]["greedy"]
        assert r["build_error"] == "model_parallel_size=3, but torchrun started 2 processes: pass " \
                                   "model_parallel_size=2, or leave it out."
        assert r["quantize_error"].startswith("quantize='int8' is not combined with tensor parallelism")
        assert r["gguf_auto_dtype"] == "torch.bfloat16" and r["gguf_auto_greedy"] == results[0]["gguf_auto_greedy"]
        # one process's context rule and memory check: a checkpoint trained on 256 positions loads them all by
        # default, refuses more, and refuses a cache larger than the memory, naming the fix
        assert r["default_max_seq_len"] == 256
        assert r["too_long_error"].startswith("max_seq_len=300 is more than the 256 positions hf256 was trained for")
        assert "GB of memory available on cpu: lower max_seq_len" in r["huge_cache_error"]


def test_shards_of_rank():
    assert [shards_of_rank(4, r, 4) for r in range(4)] == [([0], 0, 1), ([1], 0, 1), ([2], 0, 1), ([3], 0, 1)]
    assert [shards_of_rank(8, r, 2) for r in range(2)] == [([0, 1, 2, 3], 0, 1), ([4, 5, 6, 7], 0, 1)]
    assert [shards_of_rank(2, r, 4) for r in range(4)] == [([0], 0, 2), ([0], 1, 2), ([1], 0, 2), ([1], 1, 2)]
    with pytest.raises(ValueError, match="8 model-parallel shards cannot be divided among 3 processes"):
        shards_of_rank(8, 0, 3)


def test_check_world_size():
    from llama2_edu.model_file import LLAMA2_ARGS
    check_world_size(LLAMA2_ARGS["70B"], 8)  # Meta's own setting: 64 heads, 8 KV heads
    with pytest.raises(ValueError, match=r"^16 processes cannot split this model's 8 key/value heads evenly: "
                                         r"start torchrun with --nproc_per_node 1 or 2 or 4 or 8\.$"):
        check_world_size(LLAMA2_ARGS["70B"], 16)
    with pytest.raises(ValueError, match="40 query heads and 40 key/value heads"):
        check_world_size(LLAMA2_ARGS["13B"], 3)


def test_shard_model_shapes_on_meta():
    "On the meta device: each rank's matrices are 1/4 of the full ones, along Meta's split dimension."
    with torch.device("meta"):
        full, part = Transformer(tiny_args()), shard_model(Transformer(tiny_args()), rank=1, world_size=4)
    for (name, w), p in zip(full.state_dict().items(), part.state_dict().values()):
        dim = meta_split_dim(name)
        assert p.shape == w.shape if dim is None else p.shape[dim] * 4 == w.shape[dim], name
    assert part.layers[0].attention.n_heads == 2 and part.layers[0].attention.n_kv_heads == 1


def test_cli_under_torchrun_prints_once(ckpts):
    prompt, args = "The quick brown fox", ["--temperature", "0", "--max-gen-len", "6", "--device", "cpu"]
    expected = load(ckpts["paths"]["meta2"], **SIZES).text_completion([prompt], temperature=0, max_gen_len=6)
    run = torchrun(2, "-m", "llama2_edu", "--ckpt", ckpts["paths"]["meta2"], *args, prompt)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected[0]["generation"] + "\n"
