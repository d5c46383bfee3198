"""Bad and edge inputs, round three: chat templates bounded from outside the process that renders them, answers
that do not depend on their neighbours in a batch, the environment of torchrun read only under torchrun, empty
and late-checked options, and messages that say what really happened (permission, pickles, legacy files)."""
import argparse
import copy
import os
import subprocess
import sys
import time

import pytest
import torch

from llama2_edu import generation, support
from llama2_edu.generation import Llama, dialog_tokens, render_chat_template
from llama2_edu.model_file import CheckpointError, InputError
from llama2_edu.tokenizer import tokenizer_from_gguf

DIALOG = [{"role": "user", "content": "hi"}]


def run(*args, env=None):
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llama2_edu", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def one_error_line(out, *words):
    "The run failed with exactly one `error:` line on stderr that holds every one of `words`."
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture(scope="module")
def tokenizer(embedded_reader):
    return tokenizer_from_gguf(embedded_reader)


# Chat templates: the bound holds whatever the template calls, and the process is left as it was

def test_a_template_is_stopped_at_its_deadline(monkeypatch):
    "lipsum is a filter written in Python: its frames are no template's, and it runs for about 40 s."
    monkeypatch.setattr(support, "TEMPLATE_SECONDS", 1.0)  # the sandbox's deadline (the appendix)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="ran for more than 1 s"):
        render_chat_template("{{ lipsum(100000) }}", DIALOG, source="evil.gguf")
    assert time.monotonic() - start < 10  # stopped, not run to its end


def test_the_worker_stops_a_single_long_call():
    "One call that never returns to Python (a huge integer division, here a sleep) is stopped from outside."
    start = time.monotonic()
    with pytest.raises(generation.TemplateBoundError, match="ran for more than 1 s"):
        generation.render_in_worker(lambda: time.sleep(60) or "late", 1.0, 1 << 28)
    assert time.monotonic() - start < 10
    assert generation.render_in_worker(lambda: "on time", 1.0, 1 << 28) == "on time"


def test_rendering_changes_nothing_in_this_process(monkeypatch):
    "No RLIMIT_AS and no trace function are set here: the child process bounds itself."
    import resource
    parent, calls = os.getpid(), []
    setrlimit = resource.setrlimit

    def recording(*args):
        if os.getpid() == parent:
            calls.append(("setrlimit", args))
        return setrlimit(*args)

    monkeypatch.setattr(resource, "setrlimit", recording)
    monkeypatch.setattr(sys, "settrace", lambda f: calls.append(("settrace", f)))
    before = resource.getrlimit(resource.RLIMIT_AS), sys.gettrace()
    assert render_chat_template("{% for m in messages %}[{{ m.content }}]{% endfor %}", DIALOG) == "[hi]"
    assert calls == [] and (resource.getrlimit(resource.RLIMIT_AS), sys.gettrace()) == before


def test_a_template_that_writes_nothing_is_blamed(tokenizer):
    templated = copy.copy(tokenizer)
    templated.chat_template, templated.source = "{% if false %}never{% endif %}", "silent.gguf"
    with pytest.raises(CheckpointError, match="chat template of silent.gguf .* wrote nothing"):
        dialog_tokens(templated, DIALOG)


def test_no_bos_token_renders_as_nothing(tokenizer):
    "A tokenizer without BOS/EOS ids (-1) gives the template empty bos_token/eos_token, not the last piece."
    templated = copy.copy(tokenizer)
    templated.chat_template = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    templated.bos_id = templated.eos_id = -1
    assert dialog_tokens(templated, DIALOG) == templated.encode_markup("hi")


# Sampling and batches

def test_a_temperature_that_rounds_to_zero_is_greedy(embedded_model, tokenizer):
    "1e-46 is 0 in fp32: dividing by it gave NaN probabilities; it is greedy decoding, as 1e-45 is."
    from llama2_edu import speculative
    llama = speculative.Llama(embedded_model, tokenizer)
    greedy = llama.text_completion(["cheese =>"], temperature=0, max_gen_len=3)
    assert llama.text_completion(["cheese =>"], temperature=1e-46, max_gen_len=3, seed=0) == greedy
    assert llama.text_completion(["cheese =>"], temperature=1e-46, max_gen_len=3, seed=0,
                                 speculate="lookup") == greedy  # the verifier's distribution too


def test_an_answer_does_not_depend_on_its_neighbours(embedded_model, tokenizer):
    "A short prompt beside a long one gets max_gen_len new tokens, as alone, although the cache fills first."
    llama = Llama(embedded_model, tokenizer)
    short = llama.encode_prompt("The capital of France is")
    long = llama.encode_prompt("Paris is a city. " * 200)[: llama.args.max_seq_len - 10]
    (alone,), _ = llama.generate([short], max_gen_len=20, temperature=0, ignore_eos=True)
    (beside, cut), _ = llama.generate([short, long], max_gen_len=20, temperature=0, ignore_eos=True)
    assert len(alone) == 20 and beside == alone and len(cut) == 10


# The command line: torchrun's variables, empty values, checks before loading

@pytest.mark.slow
def test_rank_outside_torchrun_is_ignored():
    out = run("--max-gen-len", "2", "--temperature", "0", "--dtype", "fp32", "cheese =>", env={"RANK": "1"})
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    assert run("--max-gen-len", "1", "--temperature", "0", "cheese =>", env={"RANK": "x"}).returncode == 0


@pytest.mark.slow
def test_world_size_that_is_no_number():
    one_error_line(run("cheese =>", env={"WORLD_SIZE": "x"}), "WORLD_SIZE='x'", "unset it")


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--ckpt", ""], ["checkpoint path is empty"]),
    (["--tokenizer", ""], ["tokenizer path is empty"]),
    (["--speculate", ""], ["--speculate draft path is empty"]),
    (["--n-draft", "4"], ["--n-draft", "add --speculate"]),
    (["--ckpt", "/no/such/model", "--speculate", "lookup", "--n-draft", "0"], ["--n-draft=0"]),
    (["--ckpt", "/no/such/model", "--speculate", "/no/such/draft"], ["--speculate /no/such/draft", "lookup"]),
    (["--ckpt", "~no_such_user_here/model"], ["~", "does not exist"]),
])
def test_option_refused_before_anything_loads(args, words):
    "Each is refused in one line, naming itself, before the (missing) checkpoint is even looked at."
    one_error_line(run(*args, "cheese =>"), *words)


def test_load_checks_its_seed_and_path_first():
    from llama2_edu.program import load
    with pytest.raises(InputError, match="seed=-1"):
        load("/no/such/model", seed=-1)
    with pytest.raises(InputError, match="checkpoint path is empty"):
        load("")


# Messages that say what happened

def test_an_unreadable_file_is_not_called_missing(tmp_path, monkeypatch):
    from llama2_edu.tokenizer import check_file
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # as root, chmod would not stop us reading
    with pytest.raises(InputError, match="cannot be read: permission denied"):
        check_file(path, "weight file")


def test_pickles_and_legacy_files_are_named_for_what_they_are(tmp_path):
    from llama2_edu.checkpoint import open_shard
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "objects.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors") as e:
        open_shard(tmp_path / "objects.pth")
    assert "weights_only" not in str(e.value) and "damaged" not in str(e.value)
    with pytest.raises(CheckpointError, match="legacy format .* save it again"):
        open_shard(tmp_path / "legacy.pth")


@pytest.mark.slow
def test_help_says_what_speculation_keeps():
    "Not 'the same output': plain greedy's tokens in fp32, maybe not at near-ties on 4-bit weights, sampling's law."
    text = " ".join(run("--help").stdout.split())
    assert "the output is the same" not in text
    assert "near-ties" in text and "same distribution" in text and "--dtype fp32" in text
