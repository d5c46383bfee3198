"""Chapter 1's tokenizers against their references: transformers' GGUF tokenizer (byte-level BPE) and sentencepiece."""
import io

import gguf
import pytest
import sentencepiece as spm

from llama2_edu.tokenizer import (FRENCH_PROMPT, BPETokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, spm_model_proto,
                                  tokenizer_from_gguf)

PROMPT = FRENCH_PROMPT  # the book's prompt (chapter 1)

STRINGS = [
    PROMPT, "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", " \t\n \r\n", "Hello world", " Hello world",
    "Hello  world", "Hello   world  ", "hello\nworld\n\n", "HELLO World!!!", "don't you're I'll we've he'd",
    "3", "42", "2023", "1234567890", "3.14159", "1,000,000 $", "v0.1.2-rc3", "x = 12 + 345 * 6789",
    "café", "naïve façade", "Ärger über Öl", "Straße", "こんにちは世界", "日本語のテキスト", "中文分词测试",
    "Привет, мир", "مرحبا بالعالم", "שלום", "ελληνικά", "한국어", "🦙", "🦙🤗🚀", "emoji 👩‍👩‍👧 family",
    "👍🏽 skin tone", "a\u200bb zero width", "\u00a0non-breaking", "tab\tseparated\tvalues",
    "def f(x):\n    return x ** 2\n", "for i in range(10):\n\tprint(i)", "<html><body>hi</body></html>",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "https://example.com/path?q=1&r=2", "user@example.com",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "<|im_end|>",
    "text<|im_end|>more", "<|im_start|", "<| im_start |>", "<repo_name>x<file_sep>y", "<s> </s> <unk>",
    "    leading spaces", "trailing spaces    ", "mixed \n  \n\t whitespace \n", "ÀÉÎõü", "\x00\x01 control",
]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer()  # the embedded model's byte-level BPE, from its GGUF file


@pytest.fixture(scope="module")
def hf_tokenizer(hf_embedded):
    return hf_embedded[1]


@pytest.mark.parametrize("s", STRINGS)
def test_bpe_matches_transformers(bpe, hf_tokenizer, s):
    assert bpe.encode(s, bos=False, eos=False) == hf_tokenizer.encode(s, add_special_tokens=False)


@pytest.mark.parametrize("s", STRINGS)
def test_bpe_round_trip(bpe, s):
    assert bpe.decode(bpe.encode(s, bos=False, eos=False)) == s


def test_bpe_special_tokens_are_single_ids(bpe, hf_tokenizer):
    assert isinstance(bpe, BPETokenizer) and isinstance(bpe, Tokenizer)
    for piece, i in bpe.special_tokens.items():
        assert hf_tokenizer.convert_tokens_to_ids(piece) == i
        assert bpe.encode(piece, bos=False, eos=False) == [i]
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(bpe.special_tokens)


def test_bpe_metadata_matches_transformers(bpe, hf_tokenizer):
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id,
                                                    hf_tokenizer.pad_token_id)
    assert bpe.n_words == len(hf_tokenizer) == 49152
    assert bpe.add_bos is False  # tokenizer.ggml.add_bos_token
    assert bpe.encode("hi", bos=True, eos=True) == [bpe.bos_id, *hf_tokenizer.encode("hi", add_special_tokens=False),
                                                    bpe.eos_id]
    ids = bpe.encode(PROMPT, bos=False, eos=False)
    assert [bpe.id_to_piece(i) for i in ids] == hf_tokenizer.convert_ids_to_tokens(ids)
    assert bpe.chat_template == hf_tokenizer.chat_template


def test_bpe_chat_template_tokens_match_transformers(bpe, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert bpe.encode(text, bos=False, eos=False) == list(expected)


def test_tokenizer_from_open_reader(embedded_reader, bpe):
    tok = tokenizer_from_gguf(embedded_reader)
    assert tok.encode(PROMPT, bos=False, eos=False) == bpe.encode(PROMPT, bos=False, eos=False)


# SentencePiece: a tiny model with Llama 2's settings, trained here in a second, against sentencepiece itself

CORPUS = [
    "Translate English to French: sea otter => loutre de mer, peppermint => menthe poivrée, cheese => fromage.",
    "The quick brown fox jumps over the lazy dog. Le renard brun saute par-dessus le chien paresseux.",
    "Llama 2 is a family of language models. Its tokenizer is a SentencePiece model with 32000 pieces.",
]


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=320, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_wrapper_adds_bos_eos_once(sp_model_file):
    "What the wrapper itself adds to sentencepiece: BOS/EOS only when asked, each once, never from the text."
    tok = SentencePieceTokenizer(sp_model_file)
    body = tok.encode("cheese => fromage", bos=False, eos=False)
    assert body and tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode("cheese => fromage", bos=True, eos=True) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.encode("", bos=True, eos=False) == [tok.bos_id]
    assert tok.bos_id not in tok.encode("<s> text", bos=False, eos=False)  # "<s>" in plain text is characters


def test_sentencepiece_pieces_and_byte_fallback_decode(sp_model_file):
    tok = SentencePieceTokenizer(sp_model_file)
    ids = tok.encode(" leading 🦙", bos=False, eos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[0].startswith("\u2581")  # the dummy prefix: a word-initial space is part of the piece
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # the llama is not in the vocabulary: bytes
    assert tok.decode(ids) == " leading 🦙"


def test_encode_markup_turns_special_tokens_written_as_text_into_ids(sp_model_file):
    tok = SentencePieceTokenizer(sp_model_file)
    assert tok.encode_markup("<s>cheese</s><s>sea") == ([1] + tok.encode_text("cheese") + [2, 1]
                                                       + tok.encode_text("sea"))
    assert 1 not in tok.encode_text("<s>cheese")  # plain encoding keeps them as characters


def test_token_texts_keep_sentencepiece_spaces(sp_model_file):
    tok = SentencePieceTokenizer(sp_model_file)
    ids = tok.encode("cheese => fromage 🦙", bos=False, eos=False)
    texts = tok.token_texts(ids)
    assert "".join(texts) == tok.decode(ids) == "cheese => fromage 🦙"
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)  # decoded one by one, the spaces go


def test_check_ids_names_the_bad_id(sp_model_file):
    tok = SentencePieceTokenizer(sp_model_file)
    assert tok.check_ids([0, 5, 319]) == [0, 5, 319]
    with pytest.raises(ValueError, match="Token id 320 at position 1 is not in the vocabulary.*0 to 319"):
        tok.check_ids([5, 320])
    with pytest.raises(ValueError, match="Token id -1 at position 0"):
        tok.check_ids([-1])


def test_encode_refuses_what_is_not_text(bpe):
    with pytest.raises(TypeError, match="must be a str, not NoneType"):
        bpe.encode(None, bos=False, eos=False)
    with pytest.raises(ValueError, match="not valid Unicode.*not UTF-8"):
        bpe.encode("caf\udce9", bos=False, eos=False)  # b"caf\xe9" decoded with surrogateescape


def test_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError, match="tokenizer.model is not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")


def test_sentencepiece_llama_conventions(sp_model_file):
    tok = SentencePieceTokenizer(sp_model_file)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (320, 1, 2, -1, True)
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.id_to_piece(3) == "<0x00>"  # byte fallback: 256 byte pieces after the three specials
    assert [tok.id_to_piece(i) for i in tok.encode("🦙", bos=False, eos=False)][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>",
                                                                                       "<0x99>"]
    assert tok.chat_template is None


def test_sentencepiece_from_gguf_vocabulary(sp_model_file):
    "tokens, scores and types -> ModelProto gives back the trained model's ids."
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    n = sp.vocab_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    proto = spm_model_proto([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types)
    tok = SentencePieceTokenizer(model_proto=proto.SerializeToString())
    for s in STRINGS:
        assert tok.encode(s, bos=True, eos=False) == [1] + sp.encode(s)


def test_load_tokenizer_sources(sp_model_file, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    expected = [1] + sp.encode(PROMPT)
    meta = tmp_path / "llama-2-7b"  # Meta's download: tokenizer.model beside the model folders
    meta.mkdir()
    (tmp_path / "tokenizer.model").write_bytes(sp_model_file.read_bytes())
    hf = tmp_path / "hf"  # Hugging Face's: tokenizer.model inside the checkpoint folder
    hf.mkdir()
    (hf / "tokenizer.model").write_bytes(sp_model_file.read_bytes())
    for source in (sp_model_file, str(sp_model_file), meta, hf):
        tok = load_tokenizer(source)
        assert isinstance(tok, SentencePieceTokenizer)
        assert tok.encode(PROMPT, bos=True, eos=False) == expected


def test_error_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No SentencePiece model at"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="No tokenizer at .* no such file"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="No GGUF file at"):
        tokenizer_from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="No tokenizer in the directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="'llama-2', a tokenizer.model file, a .gguf file"):
        load_tokenizer(42)
    with pytest.raises(ValueError, match="exactly one of model_path"):
        SentencePieceTokenizer()


def test_error_unknown_gguf_tokenizer_model(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="Unsupported GGUF tokenizer model 'bert'.*'llama' and 'gpt2'"):
        load_tokenizer(path)
