"""Damaged GGUF files, made on purpose and at random: each loads and generates, or is refused with one of the
package's own errors, on one line that names the file and the key or tensor. Never a traceback.

The targeted cases first (tensors overlapping or retyped, keys of the wrong type, an array nested 5,000 deep,
a byte-level vocabulary without BOS, a device given as the checkpoint), then a seeded mutation fuzzer over a tiny
GGUF model (one block, a 384-piece SentencePiece vocabulary) and a byte-level BPE vocabulary. The fuzzer runs
LLAMA2_EDU_FUZZ_CASES cases (default 500, about 15 s); `pytest -s` prints what became of them."""
import collections
import os
import random
import struct
import time
import traceback
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFValueType as V

from checkpoints import random_state_dict, tiny_args, train_tokenizer, write_gguf
from llama2_edu.checkpoint import load_checkpoint
from llama2_edu.model_file import CheckpointError, InputError, Llama2EduError, gguf_header
from llama2_edu.support import GGUF_KEY_TYPES
from llama2_edu.tokenizer import bytes_to_unicode, tokenizer_from_gguf
from test_bad_input import PROMPT, assert_one_error, main_in_process

SIZES = dict(device="cpu", dtype=torch.float32, max_seq_len=8, max_batch_size=1)
CASES = int(os.environ.get("LLAMA2_EDU_FUZZ_CASES", "500"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    "A one-block Llama model with a 384-piece SentencePiece vocabulary, as a GGUF file (F32 weights)."
    root = tmp_path_factory.mktemp("fuzz")
    args = tiny_args(n_layers=1)
    return write_gguf(root / "tiny.gguf", random_state_dict(args), args, train_tokenizer(root / "tokenizer.model"))


def bpe_vocab(path: Path, bos: bool = True, template: str = None) -> Path:
    """A vocabulary-only GGUF with a byte-level BPE (gpt2) tokenizer: GPT-2's 256 byte pieces, three merges,
    a control token, BOS/EOS ids unless `bos` is False, and a chat template."""
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<|end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    if bos:
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(template or "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
    writer.close()
    return path


# --- where things are in a GGUF file -------------------------------------------------------------------------

def part_offsets(field) -> list:
    "The file offset of each part of a ReaderField (its parts lie one after the other)."
    offsets, pos = [], field.offset
    for part in field.parts:
        offsets.append(pos)
        pos += int(part.nbytes)
    return offsets


def layout(path: Path) -> dict:
    """Where the keys, the tensor infos and the tensor data of `path` are, and the length of each string (a key's
    name, a string value or item, a tensor's name)."""
    reader = gguf.GGUFReader(path)
    keys = {name: (field, part_offsets(field)) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
    tensors = {t.name: (t, part_offsets(t.field)) for t in reader.tensors}
    strings = [offsets[0] for _, offsets in [*keys.values(), *tensors.values()]]
    for field, offsets in keys.values():
        if field.types[-1:] == [V.STRING]:  # a string, or an array of strings
            strings += offsets[3:4] if field.types == [V.STRING] else offsets[5::2]
    return dict(keys=keys, tensors=tensors, strings=strings, data_offset=reader.data_offset)


def set_key_type(data: bytearray, where: dict, key: str, kind: int):
    "Overwrite the value type of `key` (the value's bytes stay)."
    field, offsets = where["keys"][key]
    struct.pack_into("<I", data, offsets[2], kind)


def set_tensor(data: bytearray, where: dict, name: str, kind=None, offset=None):
    "Overwrite the type or the data offset of tensor `name` in the tensor infos."
    t, offsets = where["tensors"][name]
    if kind is not None:
        struct.pack_into("<I", data, offsets[4], kind)
    if offset is not None:
        struct.pack_into("<Q", data, offsets[5], offset)


def damaged(tmp_path: Path, source: Path, change) -> Path:
    "A copy of `source` that `change(data, layout)` has damaged."
    data = bytearray(source.read_bytes())
    change(data, layout(source))
    path = tmp_path / f"damaged-{source.name}"
    path.write_bytes(data)
    return path


# --- 1. damaged files that loaded and answered ---------------------------------------------------------------

def test_overlapping_tensors_are_refused(tiny, tmp_path):
    def overlap(data, where):  # attn_k's data offset := attn_q's
        q, _ = where["tensors"]["blk.0.attn_q.weight"]
        set_tensor(data, where, "blk.0.attn_k.weight", offset=int(q.field.parts[5][0]))
    with pytest.raises(CheckpointError, match=r"damaged-tiny.gguf: tensor 'blk.0.attn_k.weight' starts at byte 98,304"
                                              r" of the tensor data instead of at byte 114,688, right after tensor"
                                              r" 'blk.0.attn_q.weight' \(F32, 16,384 bytes\)"):
        load_checkpoint(damaged(tmp_path, tiny, overlap), **SIZES)


def test_a_tensor_shifted_into_its_neighbour_is_refused(tiny, tmp_path):
    def shift(data, where):
        t, _ = where["tensors"]["blk.0.attn_k.weight"]
        set_tensor(data, where, t.name, offset=int(t.field.parts[5][0]) - 32)
    with pytest.raises(CheckpointError, match="tensor 'blk.0.attn_k.weight' starts at byte 114,656 .* instead of"):
        load_checkpoint(damaged(tmp_path, tiny, shift), **SIZES)


def test_a_norm_retyped_to_a_smaller_type_is_refused(tiny, tmp_path):
    path = damaged(tmp_path, tiny,
                   lambda data, where: set_tensor(data, where, "blk.0.attn_norm.weight", kind=GGML.Q8_0))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.ffn_norm.weight' starts at byte [\d,]+ of the tensor data"
                                              r" instead of at byte [\d,]+, right after tensor"
                                              r" 'blk.0.attn_norm.weight' \(Q8_0, 68 bytes\)"):
        load_checkpoint(path, **SIZES)


def test_the_last_tensor_must_fill_the_file(tiny, tmp_path):
    path = damaged(tmp_path, tiny, lambda data, where: set_tensor(data, where, "output.weight", kind=GGML.Q8_0))
    with pytest.raises(CheckpointError, match=r"the last tensor, 'output.weight' \(Q8_0, 26,112 bytes\), ends at byte"
                                              r" [\d,]+ but the file goes on to byte [\d,]+"):
        load_checkpoint(path, **SIZES)


def test_cli_float_key_stored_as_uint32(tiny, tmp_path, capsys):
    "rope.freq_base's float32 bits read as a uint32 would be 1.18e9: refused, naming the key and both types."
    path = damaged(tmp_path, tiny, lambda data, where: set_key_type(data, where, "llama.rope.freq_base", V.UINT32))
    assert_one_error(main_in_process("--ckpt", str(path), "--device", "cpu", PROMPT, capsys=capsys),
                     "damaged-tiny.gguf: llama.rope.freq_base is stored as uint32, but llama.cpp reads it as float32")


def test_block_count_must_match_the_blocks(tiny, tmp_path):
    "A block_count of 16,385 built a Transformer of that many blocks (about 15 s) before any weight was read."
    def blocks(data, where):
        _, offsets = where["keys"]["llama.block_count"]
        struct.pack_into("<I", data, offsets[3], 2**14 + 1)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="llama.block_count=16385, but the file holds the weights of 1 blocks"):
        load_checkpoint(damaged(tmp_path, tiny, blocks), **SIZES)
    assert time.monotonic() - start < 5


# --- 2 and 4. tokenizer metadata of the wrong type, and messages that name the key ---------------------------------

def vocab_gguf(path: Path, model: str = "gpt2", **keys) -> Path:
    "A vocabulary-only GGUF; `keys`: tokenizer.ggml.NAME=(value, type), an array's type being that of its items."
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    base = dict(tokens=(["a", "b", "ab", "<|end|>"], V.STRING))
    if model == "gpt2":
        base["merges"] = (["a b"], V.STRING)
    for name, (value, kind) in {**base, **keys}.items():
        if isinstance(value, list):
            writer.add_key_value(f"tokenizer.ggml.{name}", value, V.ARRAY, sub_type=kind)
        else:
            writer.add_key_value(f"tokenizer.ggml.{name}", value, kind)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("model, keys, needle", [
    ("llama", dict(add_space_prefix=("yes", V.STRING)),
     "tokenizer.ggml.add_space_prefix is stored as string, but llama.cpp reads it as bool"),
    ("llama", dict(bos_token_id=(True, V.BOOL)),
     "tokenizer.ggml.bos_token_id is stored as bool, but llama.cpp reads it as uint32"),
    ("gpt2", dict(bos_token_id=(True, V.BOOL)), "tokenizer.ggml.bos_token_id is stored as bool"),
    ("gpt2", dict(tokens=([1, 2, 3], V.INT32)),
     "tokenizer.ggml.tokens is stored as array of int32, but llama.cpp reads it as array of string"),
    ("gpt2", dict(merges=([1, 2], V.INT32)), "tokenizer.ggml.merges is stored as array of int32"),
    ("gpt2", dict(pre=(["x", "y"], V.STRING)),
     "tokenizer.ggml.pre is stored as array of string, but llama.cpp reads it as string"),
    ("gpt2", dict(merges=(["a zz"], V.STRING)),
     "the merge 'a zz' (tokenizer.ggml.merges) names 'zz', which is not a piece of the vocabulary"),
    ("gpt2", dict(tokens=(["a", "b"], V.STRING)),  # tokenizers panicked
     "the merge 'a b' (tokenizer.ggml.merges) names 'ab'"),
    ("llama", dict(scores=(["s", "t", "u", "v"], V.STRING)),  # was: could not convert string to float: 's'
     "tokenizer.ggml.scores is stored as array of string, but llama.cpp reads it as array of float32"),
    ("llama", dict(scores=([0.0, 0.0], V.FLOAT32)), "tokenizer.ggml.scores has 2 values for the 4 pieces"),
    ("llama", dict(token_type=([99, 1, 1, 1], V.INT32)),  # was: invalid enumerator 99
     "tokenizer.ggml.token_type holds 99, which is not a SentencePiece token type"),
    ("gpt2", dict(token_type=(["x", "y", "z", "w"], V.STRING)),
     "tokenizer.ggml.token_type is stored as array of string"),
])
def test_gguf_tokenizer_metadata_of_the_wrong_type(tmp_path, model, keys, needle):
    path = vocab_gguf(tmp_path / "vocab.gguf", model, **keys)
    with pytest.raises(CheckpointError) as e:
        tokenizer_from_gguf(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, message


def test_array_where_a_number_is_expected_names_the_key(tiny, tmp_path):
    "The header's arrays are left unread: one where a number belongs used to print as <GGUFArray object at 0x...>."
    def array(writer):
        writer.add_array("llama.embedding_length", [64])
    args = tiny_args(n_layers=1)
    path = tmp_path / "array.gguf"
    write_gguf(path, random_state_dict(args), args, tiny.with_name("tokenizer.model"), extra=array)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **SIZES)
    assert "llama.embedding_length is stored as array of int32, but llama.cpp reads it as uint32" in str(e.value)
    assert "GGUFArray" not in str(e.value)


# --- 3. an array nested 5,000 deep -----------------------------------------------------------------------------

def nested_array_gguf(path: Path, depth: int = 5000) -> Path:
    "A GGUF file of one key, general.nested: an array of an array of ... (`depth` deep) of no uint8."
    key = b"general.nested"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", V.ARRAY)
    data += struct.pack("<IQ", V.ARRAY, 1) * depth + struct.pack("<IQ", V.UINT8, 0)
    path.write_bytes(data)
    return path


def test_array_nested_5000_deep(tmp_path, capsys):
    path = nested_array_gguf(tmp_path / "nested.gguf")
    needle = f"{path}: general.nested is an array of arrays, which llama.cpp refuses to read"
    for read in (tokenizer_from_gguf, gguf_header):  # gguf's reader, and chapter 2's own
        with pytest.raises(CheckpointError, match=needle):
            read(path)
    assert_one_error(main_in_process("--ckpt", str(path), "--device", "cpu", PROMPT, capsys=capsys), needle)


# --- 5. a byte-level vocabulary without BOS or EOS ---------------------------------------------------------------

def test_no_bos_renders_as_nothing(tmp_path):
    "With no BOS id (-1), {{ bos_token }} is empty: id_to_piece(-1) indexed from the end, the last piece."
    from llama2_edu.generation import dialog_tokens
    tok = tokenizer_from_gguf(bpe_vocab(tmp_path / "nobos.gguf", bos=False,
                                        template="{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"))
    assert (tok.bos_id, tok.eos_id) == (-1, -1)
    assert tok.id_to_piece(-1) == "" and tok.id_to_piece(tok.n_words - 1) == "<|end|>"
    assert tok.decode(dialog_tokens(tok, [{"role": "user", "content": "the"}])) == "the"
    with pytest.raises(InputError, match="Token id -2 at position 0 is not in the vocabulary"):
        tok.id_to_piece(-2)


# --- 6. a device as the checkpoint -------------------------------------------------------------------------------

def test_cli_dev_zero_as_the_checkpoint(capsys):
    assert_one_error(main_in_process("--ckpt", "/dev/zero", "--device", "cpu", PROMPT, capsys=capsys),
                     "/dev/zero is not a regular file (a directory, a FIFO or a device)")


# --- 7. the fuzzer -----------------------------------------------------------------------------------------------

def pick_key(rng, where, arrays=None):
    "A key of the file (an array, a scalar or either), as (name, field, offsets)."
    names = [name for name, (field, _) in where["keys"].items()
             if arrays is None or (field.types[0] == V.ARRAY) == arrays]
    name = rng.choice(names)
    return (name, *where["keys"][name])


def new_count(rng, n: int) -> int:
    "Another length or count: one more or less, none, twice, or far too many."
    return rng.choice([max(n - 1, 0), n + 1, 0, 2 * n + 1, rng.randrange(2**32), 2**63 + rng.randrange(2**32)])


def mutate(rng, data: bytearray, where: dict) -> tuple:
    """Damage `data` at random: `(description, must_refuse)`, where must_refuse says that no loader may answer
    after this change (a key this book reads retyped, a tensor moved)."""
    kind = rng.choice(["flip", "key_type", "item_type", "array_length", "string_length", "scalar", "count",
                       "tensor_offset", "swap_offsets", "tensor_type", "tensor_dims", "truncate", "tensor_data"])
    if not where["tensors"] and kind.startswith(("tensor", "swap")):
        kind = "flip"
    if kind == "flip":  # anywhere before the tensor data: header, keys, tensor infos
        spots = sorted(rng.randrange(min(where["data_offset"], len(data))) for _ in range(rng.randint(1, 4)))
        for spot in spots:
            data[spot] ^= rng.randrange(1, 256)
        return f"flip bytes {spots}", False
    if kind == "key_type":
        name, field, offsets = pick_key(rng, where)
        new = rng.choice([t for t in range(14) if t != field.types[0]])
        struct.pack_into("<I", data, offsets[2], new)
        return f"key {name}: type {field.types[0]} -> {new}", name in GGUF_KEY_TYPES
    if kind == "item_type":
        name, field, offsets = pick_key(rng, where, arrays=True)
        new = rng.choice([t for t in range(14) if t != field.parts[3][0]])
        struct.pack_into("<I", data, offsets[3], new)
        return f"array {name}: item type {field.parts[3][0]} -> {new}", name in GGUF_KEY_TYPES
    if kind == "array_length":
        name, field, offsets = pick_key(rng, where, arrays=True)
        new = new_count(rng, int(field.parts[4][0]))
        struct.pack_into("<Q", data, offsets[4], new)
        return f"array {name}: length {field.parts[4][0]} -> {new}", False
    if kind == "string_length":
        spot = rng.choice(where["strings"])
        old = struct.unpack_from("<Q", data, spot)[0]
        new = new_count(rng, old)
        struct.pack_into("<Q", data, spot, new)
        return f"string length at byte {spot}: {old} -> {new}", False
    if kind == "scalar":  # a number or a bool: random bytes
        name, field, offsets = pick_key(rng, where, arrays=False)
        size = 8 if field.types == [V.STRING] else int(field.parts[3].nbytes)  # a string: its length
        new = bytes(rng.randrange(256) for _ in range(size))
        data[offsets[3]: offsets[3] + size] = new
        return f"key {name}: value bytes -> {new.hex()}", False
    if kind == "count":  # how many tensors, or how many keys
        spot = rng.choice([8, 16])
        old = struct.unpack_from("<Q", data, spot)[0]
        new = new_count(rng, old)
        struct.pack_into("<Q", data, spot, new)
        return f"{'tensor' if spot == 8 else 'key'} count {old} -> {new}", False
    if kind == "truncate":
        cut = rng.randrange(len(data))
        del data[cut:]
        return f"truncated to {cut} bytes", False
    name = rng.choice(sorted(where["tensors"]))
    t, offsets = where["tensors"][name]
    if kind == "tensor_offset":
        others = [int(u.data_offset) - where["data_offset"] for u, _ in where["tensors"].values() if u.name != name]
        old = int(t.data_offset) - where["data_offset"]
        new = rng.choice([rng.choice(others), old + 32, old - 32, old + 1, old * 2 + 32, rng.randrange(2**64)])
        new = new if new != old else old + 32
        struct.pack_into("<Q", data, offsets[5], new % 2**64)
        return f"tensor {name}: offset {old} -> {new % 2**64}", True
    if kind == "swap_offsets":
        other = rng.choice([u for u in sorted(where["tensors"]) if u != name])
        u, other_offsets = where["tensors"][other]
        struct.pack_into("<Q", data, offsets[5], int(u.field.parts[5][0]))
        struct.pack_into("<Q", data, other_offsets[5], int(t.field.parts[5][0]))
        return f"tensors {name} and {other}: offsets swapped", True
    if kind == "tensor_type":
        new = rng.choice([int(q) for q in GGML if q != t.tensor_type] + [rng.randrange(2**32)])
        struct.pack_into("<I", data, offsets[4], new)
        return f"tensor {name}: type {t.tensor_type.name} -> {new}", False
    if kind == "tensor_dims":
        n_dims = int(t.field.parts[2][0])
        if rng.random() < 0.25:
            new = rng.choice([0, n_dims + 1, max(n_dims - 1, 0), rng.randrange(2**32)])
            struct.pack_into("<I", data, offsets[2], new)
            return f"tensor {name}: {n_dims} dims -> {new}", False
        i = rng.randrange(n_dims)
        old = int(t.field.parts[3][i])
        new = rng.choice([old * 2, old // 2, 0, old + 1, rng.randrange(2**64)])
        struct.pack_into("<Q", data, offsets[3] + 8 * i, new)
        return f"tensor {name}: dim {i} {old} -> {new}", False
    spot = rng.randrange(where["data_offset"], len(data))  # tensor_data: bytes of a weight
    data[spot] ^= rng.randrange(1, 256)
    return f"weight byte {spot} flipped", False


def load_and_generate(path: Path):
    from llama2_edu.program import load
    llama = load(path, device="cpu", max_seq_len=8)
    llama.text_completion(["the cat"], max_gen_len=1, temperature=0)


def encode_and_decode(path: Path):
    tok = tokenizer_from_gguf(path)
    tok.decode(tok.encode("the theme", bos=True, eos=True)[1:-1])


def test_gguf_mutation_fuzzer(tiny, tmp_path):
    """CASES seeded mutations: of the tiny model (half the cases), of the same model with Q4_0 matrices (a
    quarter; each loaded, then one token generated), of a byte-level vocabulary (a quarter; read, then used).
    Each must work or raise the package's own error on one line."""
    args = tiny_args(n_layers=1)
    q4 = write_gguf(tmp_path / "tiny-q4_0.gguf", random_state_dict(args), args, tiny.with_name("tokenizer.model"),
                    qtype=GGML.Q4_0)
    targets = [(tiny, load_and_generate)] * 2 + [(q4, load_and_generate), (bpe_vocab(tmp_path / "bpe.gguf"),
                                                                          encode_and_decode)]
    for path, run in targets:  # undamaged, each works
        run(path)
    where = {path: layout(path) for path, _ in targets}
    counts, failures = collections.Counter(), []
    for seed in range(CASES):
        rng = random.Random(seed)
        source, run = targets[seed % 4]
        data = bytearray(source.read_bytes())
        mutation, must_refuse = mutate(rng, data, where[source])
        path = tmp_path / f"case{seed}.gguf"
        path.write_bytes(data)
        try:
            run(path)
            outcome = "loaded"
            if must_refuse:
                failures.append(f"seed {seed} ({source.name}: {mutation}): loaded and answered")
        except Llama2EduError as e:
            outcome = f"refused: {type(e).__name__}"
            if "\n" in str(e):
                failures.append(f"seed {seed} ({source.name}: {mutation}): a message of several lines: {e}")
        except BaseException as e:  # a traceback: tokenizers' panics are BaseExceptions
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = f"traceback: {type(e).__name__}"
            failures.append(f"seed {seed} ({source.name}: {mutation}): "
                            + "".join(traceback.format_exception_only(type(e), e)).strip()[:500])
        path.unlink()
        counts[outcome] += 1
    print(f"\n{CASES} GGUF mutations:", ", ".join(f"{n} {outcome}" for outcome, n in counts.most_common()))
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
