"""Chapter 13's one assembly: every model the package builds goes through `load`, so a `--speculate` draft runs with
the target's levers (quantization, dtype, device), and under torchrun only rank 0 prints, without touching
sys.stdout."""
import sys
from functools import partial

import pytest
import torch

from checkpoints import random_state_dict, tiny_args, train_tokenizer, write_gguf, write_meta
from llama2_edu import program
from llama2_edu.speculative import parse_speculate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "The same tiny random weights as a Meta checkpoint (the target) and a GGUF file (the draft)."
    root = tmp_path_factory.mktemp("program")
    tokenizer_model = train_tokenizer(root / "tokenizer.model")  # beside meta/: Meta's download layout
    args = tiny_args()
    state_dict = random_state_dict(args)
    return dict(meta=write_meta(root / "meta", state_dict), gguf=write_gguf(root / "tiny.gguf", state_dict, args,
                                                                                  tokenizer_model))


def built(model) -> dict:
    "What the levers decide: each module's class, each tensor's dtype, the KV cache's class and dtype."
    attention = model.layers[0].attention
    return dict(modules={name: type(m).__name__ for name, m in model.named_modules()},
                dtypes={name: w.dtype for name, w in model.state_dict().items()},
                cache=(type(attention.cache).__name__, attention.cache.dtype))


def cli(tiny, *options):
    return program.build_parser().parse_args(["--ckpt", str(tiny["meta"]), "--device", "cpu", "--max-seq-len", "64",
                                              "--temperature", "0", "--max-gen-len", "4", *options, "x"])


@pytest.mark.parametrize("options", [["--quantize", "int8"], ["--quantize", "int4", "--dtype", "bf16"],
                                     ["--dtype", "fp16"]])
def test_the_command_lines_draft_is_built_like_the_target(tiny, monkeypatch, options):
    "The draft that --speculate PATH passes to the target has the target's layers, dtypes and cache."
    seen = {}

    def completion(self, prompts, **sampling):
        seen.update(target=self, draft=sampling["speculate"])
        return [{"generation": ""}]

    monkeypatch.setattr(program.Llama, "text_completion", completion)
    program.generate(cli(tiny, "--speculate", str(tiny["gguf"]), *options), "x", stream=False)
    target, draft = built(seen["target"].model), built(seen["draft"].model)
    assert target == draft
    quantized = {"int8": "Int8Linear", "int4": "Int4Linear"}.get(options[1])
    if quantized:  # the levers did act: the draft is no plain fp32 model
        assert target["modules"]["layers.0.attention.wq"] == quantized
    assert seen["draft"].model.params.max_seq_len == seen["target"].model.params.max_seq_len == 64


def test_a_draft_for_the_api_takes_loads_levers(tiny):
    "parse_speculate(load=...) builds the draft with chapter 13's `load`: any lever, fuse included."
    levers = dict(device="cpu", quantize="int8", fuse=True)
    target = program.load(tiny["meta"], max_seq_len=64, max_batch_size=1, **levers)
    draft = parse_speculate(str(tiny["gguf"]), 4, max_seq_len=64, load=partial(program.load, max_batch_size=1, **levers))
    assert built(draft.model) == built(target.model)
    prompt = target.tokenizer.encode("the cat sat on the mat", bos=True, eos=False)
    plain, _ = target.generate([prompt], 6, temperature=0)
    assert target.generate([prompt], 6, temperature=0, speculate=draft)[0] == plain  # same weights: all accepted


def test_a_process_that_does_not_print_leaves_stdout_alone(tiny, capsys):
    "Under torchrun the ranks above 0 run generate with show=False: nothing printed, sys.stdout not replaced."
    stdout = sys.stdout
    program.generate(cli(tiny, "--echo", "--dtype", "fp32"), "x", stream=True, show=False)
    program.generate(cli(tiny, "--dtype", "fp32"), "x", stream=False, show=False)
    assert sys.stdout is stdout
    assert capsys.readouterr().out == ""
    program.generate(cli(tiny, "--dtype", "fp32"), "x", stream=False)
    assert capsys.readouterr().out.endswith("\n")
