"""The command line (chapter 13): `python -m llama2_edu`, run as a user runs it, in a subprocess."""
import os
import subprocess
import sys

import pytest

from llama2_edu.generation import Llama
from llama2_edu.tokenizer import tokenizer_from_gguf

PROMPT = "The capital of France is"
ARGS = ["--temperature", "0", "--max-gen-len", "6", "--device", "cpu"]


def run(*args, input=None):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "llama2_edu", *args], input=input, capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def expected():
    "The greedy completion of PROMPT, computed in this process with the library's default load() (the CLI's)."
    from llama2_edu.program import load
    llama = load(device="cpu", max_batch_size=1)
    return llama.text_completion([PROMPT], temperature=0, max_gen_len=6)[0]["generation"]


@pytest.fixture(scope="module")
def expected_fp32(embedded_model, embedded_reader):
    "The same with the plain fp32 model of chapters 7-9."
    llama = Llama(embedded_model, tokenizer_from_gguf(embedded_reader))
    return llama.text_completion([PROMPT], temperature=0, max_gen_len=6)[0]["generation"]


def test_help_explains_every_option():
    out = run("--help")
    assert out.returncode == 0
    for option in ("--file", "--ckpt", "--tokenizer", "--max-gen-len", "--temperature", "--top-p", "--top-k",
                   "--seed", "--device", "--dtype", "--quantize", "--compile", "--speculate", "--n-draft", "--chat",
                   "--stream", "fetch-tokenizer"):
        assert option in out.stdout
    out = run("fetch-tokenizer", "--help")
    assert out.returncode == 0 and "SentencePiece" in out.stdout


def test_prompt_as_argument(expected):
    out = run(*ARGS, PROMPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_fp32_is_one_option_away(expected_fp32):
    out = run(*ARGS, "--dtype", "fp32", PROMPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_fp32 + "\n"


def test_speculate_lookup_prints_plain_greedy_fp32(expected_fp32, tmp_path):
    "--speculate (chapter 11) changes how tokens are found, not which: fp32 greedy, the same text."
    out = run(*ARGS, "--dtype", "fp32", "--speculate", "lookup", "--n-draft", "4", PROMPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_fp32 + "\n"
    bad = run(*ARGS, "--speculate", str(tmp_path / "missing.gguf"), PROMPT)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "missing.gguf" in bad.stderr


def test_prompt_from_stdin_streamed(expected):
    out = run(*ARGS, "--stream", input=PROMPT + "\n")  # the trailing newline of stdin is dropped
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_prompt_from_file(expected, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT + "\n", encoding="utf-8")
    out = run(*ARGS, "--echo", "--file", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == PROMPT + expected + "\n"


def test_errors_are_messages_not_tracebacks(tmp_path):
    out = run("--temperature", "-1", PROMPT)
    assert out.returncode == 1 and "temperature=-1.0 is invalid" in out.stderr and "Traceback" not in out.stderr
    out = run("--file", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "no such file" in out.stderr
    out = run("--dtype", "int8", PROMPT)
    assert out.returncode == 2 and "invalid choice" in out.stderr
