"""load_checkpoint: Meta (1, 2, 4 shards, GQA, ffn_dim_multiplier), Hugging Face (safetensors, .bin, tied), GGUF
(F32, F16, Q8_0) and the embedded model, each checked against transformers' LlamaForCausalLM; every error it names."""
import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch

from checkpoints import (TINY_PARAMS, random_state_dict, tiny_args, train_tokenizer, write_gguf, write_hf,
                         write_meta)
from llama2_edu.checkpoint import (check_dtype, default_dtype, hf_to_meta_name, load_checkpoint, meta_split_dim)

SIZES = dict(device="cpu", max_seq_len=64, max_batch_size=2)
TOKENS = torch.tensor([[1, 5, 77, 200, 13, 9, 31, 383], [1, 300, 2, 64, 64, 8, 120, 3]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tokenizer trained here, random tiny weights, their transformers reference model and logits."
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer_model = train_tokenizer(root / "tokenizer.model")  # Meta's layout: next to the model directories
    args = tiny_args()
    state_dict = random_state_dict(args)
    hf_model = write_hf(root / "hf", state_dict, args, tokenizer_model, max_shard_size="100KB")  # sharded + index
    with torch.no_grad():
        ref = hf_model(TOKENS).logits
    return dict(root=root, tokenizer_model=tokenizer_model, args=args, state_dict=state_dict, hf=hf_model, ref=ref)


def logits(model):
    return model(TOKENS, 0)


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_shards_match_transformers(tiny, n_shards):
    ckpt = write_meta(tiny["root"] / f"meta{n_shards}", tiny["state_dict"], n_shards=n_shards)
    model, tokenizer = load_checkpoint(ckpt, **SIZES)
    assert model.params.vocab_size == tokenizer.n_words == 384  # vocab_size: -1 -> from tokenizer.model
    assert model.params.n_kv_heads == 4 and model.params.ffn_dim_multiplier == 1.3
    assert (logits(model) - tiny["ref"]).abs().max() <= 1e-4


def test_meta_bf16_checkpoint_cast_on_load(tiny):
    ckpt = write_meta(tiny["root"] / "meta_bf16", tiny["state_dict"], n_shards=2, dtype=torch.bfloat16)
    model, _ = load_checkpoint(ckpt, **{**SIZES, "dtype": torch.float32})
    assert all(p.dtype == torch.float32 for p in model.parameters())
    w = model.layers[1].attention.wo.weight  # row-parallel: merged along dim 1
    assert torch.equal(w, tiny["state_dict"]["layers.1.attention.wo.weight"].bfloat16().float())


def test_hf_sharded_safetensors_match_transformers(tiny):
    assert (tiny["root"] / "hf" / "model.safetensors.index.json").is_file()
    model, tokenizer = load_checkpoint(tiny["root"] / "hf", **SIZES)
    assert (logits(model) - tiny["ref"]).abs().max() <= 1e-4
    # the un-permuted rows are exactly Meta's: the same tensors as the Meta checkpoint holds
    for name, w in model.state_dict().items():
        assert torch.equal(w, tiny["state_dict"][name]), name


def test_hf_without_unpermuting_is_wrong(tiny):
    "Loading HF's q/k rows as they are (no permute_from_hf) gives a different model: the permutation matters."
    from llama2_edu.model import Transformer
    from checkpoints import to_hf
    hf = to_hf(tiny["state_dict"], tiny["args"])
    names = {hf_name: hf_to_meta_name(hf_name) for hf_name in hf}
    model = Transformer(tiny["args"])
    model.load_state_dict({names[k]: w for k, w in hf.items()})
    assert (logits(model) - tiny["ref"]).abs().max() > 0.1


def test_hf_pytorch_bin(tiny):
    ckpt = tiny["root"] / "hf_bin"
    ckpt.mkdir()
    shutil.copy(tiny["root"] / "hf" / "config.json", ckpt)
    shutil.copy(tiny["tokenizer_model"], ckpt)
    torch.save(tiny["hf"].state_dict(), ckpt / "pytorch_model.bin")
    model, _ = load_checkpoint(ckpt, **SIZES)
    assert (logits(model) - tiny["ref"]).abs().max() <= 1e-4


def test_hf_tied_embeddings(tiny, tmp_path):
    from transformers import LlamaForCausalLM
    write_hf(tmp_path / "tied", tiny["state_dict"], tiny["args"], tiny["tokenizer_model"], tie_word_embeddings=True)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32).eval()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    model, _ = load_checkpoint(tmp_path / "tied", **SIZES)
    assert model.output is None and model.params.tie_word_embeddings
    with torch.no_grad():
        assert (logits(model) - ref(TOKENS).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("qtype, tol", [(gguf.GGMLQuantizationType.F32, 1e-4),
                                        (gguf.GGMLQuantizationType.F16, 1e-2),   # 11-bit mantissa
                                        (gguf.GGMLQuantizationType.Q8_0, 1e-1)])  # 8 bits per weight (logits ~ +-4)
def test_gguf_matches_transformers(tiny, qtype, tol):
    path = write_gguf(tiny["root"] / f"tiny-{qtype.name}.gguf", tiny["state_dict"], tiny["args"],
                      tiny["tokenizer_model"], qtype=qtype)
    model, tokenizer = load_checkpoint(path, **SIZES)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny["tokenizer_model"]))
    text = "Translate English to French: cheese =>"
    assert tokenizer.encode(text, bos=True, eos=False) == [1] + sp.encode(text)
    wq = model.layers[0].attention.wq.weight
    ref_wq = tiny["state_dict"]["layers.0.attention.wq.weight"]
    if qtype == gguf.GGMLQuantizationType.F16:
        assert torch.equal(wq, ref_wq.half().float())
    if qtype == gguf.GGMLQuantizationType.Q8_0:  # blocks of 32 weights, each within ~half a step (scale stored as fp16)
        step = ref_wq.view(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        assert 0 < (wq.view(-1, 32) - ref_wq.view(-1, 32)).abs().div(step).max() <= 0.6
    diff = (logits(model) - tiny["ref"]).abs().max()
    assert diff <= tol
    assert (qtype == gguf.GGMLQuantizationType.F32) == (diff <= 1e-4)  # quantized files really were quantized


def test_embedded_matches_transformers(hf_embedded):
    model, tokenizer = load_checkpoint(None, device="cpu", dtype=torch.float32, max_seq_len=64, max_batch_size=1)
    hf_model, hf_tokenizer = hf_embedded
    tokens = tokenizer.encode("Translate English to French: cheese =>", bos=False, eos=False)
    assert tokens == hf_tokenizer("Translate English to French: cheese =>")["input_ids"]
    with torch.no_grad():
        ref = hf_model(torch.tensor([tokens])).logits
    assert (model(torch.tensor([tokens]), 0) - ref).abs().max() <= 1e-4


def test_split_dims_follow_meta():
    assert [meta_split_dim(f"layers.0.attention.{w}.weight") for w in ("wq", "wk", "wv", "wo")] == [0, 0, 0, 1]
    assert [meta_split_dim(f"layers.0.feed_forward.{w}.weight") for w in ("w1", "w2", "w3")] == [0, 1, 0]
    assert meta_split_dim("tok_embeddings.weight") == 1 and meta_split_dim("output.weight") == 0
    assert meta_split_dim("norm.weight") is None and meta_split_dim("layers.3.ffn_norm.weight") is None


# --- errors -------------------------------------------------------------------------------------------------------

def test_error_missing_path():
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint("/no/such/dir/llama-2-7b", device="cpu")


def test_error_unrecognised_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Unrecognised checkpoint layout.*notes.txt"):
        load_checkpoint(tmp_path, device="cpu")


def test_error_meta_without_weights(tiny, tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    shutil.copy(tiny["tokenizer_model"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth"):
        load_checkpoint(tmp_path, device="cpu")


def test_error_missing_tokenizer(tiny, tmp_path):
    write_meta(tmp_path / "a" / "b", tiny["state_dict"])
    with pytest.raises(FileNotFoundError, match="No tokenizer.model.*tokenizer_path="):
        load_checkpoint(tmp_path / "a" / "b", device="cpu")


def test_error_hf_missing_shard(tiny, tmp_path):
    ckpt = shutil.copytree(tiny["root"] / "hf", tmp_path / "hf")
    (ckpt / "model-00002-of-00009.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00009.safetensors"):
        load_checkpoint(ckpt, device="cpu")


def test_error_params_disagree_with_tensors(tiny, tmp_path):
    ckpt = write_meta(tmp_path / "m", tiny["state_dict"], params={**TINY_PARAMS, "ffn_dim_multiplier": None})
    shutil.copy(tiny["tokenizer_model"], ckpt)
    with pytest.raises(ValueError, match=r"'layers.0.feed_forward.w1.weight' has shape \(224, 64\).*imply \(192, 64\)"):
        load_checkpoint(ckpt, **SIZES)


def test_error_config_disagrees_with_tensors(tiny, tmp_path):
    ckpt = shutil.copytree(tiny["root"] / "hf", tmp_path / "hf")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 8}))
    with pytest.raises(ValueError, match=r"'layers.0.attention.wk.weight' has shape \(32, 64\).*imply \(64, 64\)"):
        load_checkpoint(ckpt, **SIZES)


def test_error_shards_do_not_divide_heads(tiny, tmp_path):
    ckpt = write_meta(tmp_path / "m", tiny["state_dict"], n_shards=1)
    shutil.copy(tiny["tokenizer_model"], ckpt)
    for i in (1, 2):  # three files: 8 query heads and 4 KV heads cannot be split three ways
        shutil.copy(ckpt / "consolidated.00.pth", ckpt / f"consolidated.0{i}.pth")
    with pytest.raises(ValueError, match="3 shards cannot split 8 query heads and 4 key/value heads"):
        load_checkpoint(ckpt, **SIZES)


def test_error_shards_hold_different_tensors(tiny, tmp_path):
    ckpt = write_meta(tmp_path / "m", tiny["state_dict"], n_shards=2)
    shutil.copy(tiny["tokenizer_model"], ckpt)
    shard = torch.load(ckpt / "consolidated.01.pth")
    del shard["layers.1.feed_forward.w2.weight"]
    torch.save(shard, ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match="'layers.1.feed_forward.w2.weight' is in consolidated.00.pth but not in consolidated.01.pth"):
        load_checkpoint(ckpt, **SIZES)
    shard["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    torch.save(shard, ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"'layers.1.feed_forward.w2.weight' has shape \(64, 100\) in consolidated.01.pth"):
        load_checkpoint(ckpt, **SIZES)


def test_meta_merge_unmaps_shards(tiny, tmp_path):
    "Each merged tensor arrives with no shard file mapped: the pages read to build it have left our memory."
    from llama2_edu.checkpoint import meta_state_dict
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs Linux's /proc/self/maps")
    ckpt = write_meta(tmp_path / "m", tiny["state_dict"], n_shards=4)
    paths = sorted(ckpt.glob("consolidated.*.pth"))
    mapped = lambda: sum(str(p) in line for p in paths for line in maps.read_text().splitlines())
    n = 0
    for name, w in meta_state_dict(paths, "cpu", torch.float32):
        assert mapped() == 0, name
        assert torch.equal(w, tiny["state_dict"][name]), name
        n += 1
    assert n == len(tiny["state_dict"])


def test_hf_load_leaves_files_unchanged(tiny):
    "wq/wk are un-permuted in place in a private (copy-on-write) mapping: the files on disk must not change."
    import hashlib
    files = sorted((tiny["root"] / "hf").glob("*.safetensors"))
    digest = lambda: [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    before = digest()
    model, _ = load_checkpoint(tiny["root"] / "hf", **{**SIZES, "dtype": torch.float32})
    assert torch.equal(model.layers[0].attention.wq.weight, tiny["state_dict"]["layers.0.attention.wq.weight"])
    del model
    assert digest() == before


def test_error_unknown_params(tiny, tmp_path):
    ckpt = write_meta(tmp_path / "m", tiny["state_dict"], params={**TINY_PARAMS, "use_scaled_rope": True})
    shutil.copy(tiny["tokenizer_model"], ckpt)
    with pytest.raises(ValueError, match="use_scaled_rope"):
        load_checkpoint(ckpt, **SIZES)


def test_error_hf_unsupported_architecture(tiny, tmp_path):
    ckpt = shutil.copytree(tiny["root"] / "hf", tmp_path / "hf")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Unsupported architecture 'gpt2'"):
        load_checkpoint(ckpt, **SIZES)


def test_error_gguf_unsupported_architecture(tiny, tmp_path):
    path = write_gguf(tmp_path / "x.gguf", tiny["state_dict"], tiny["args"], tiny["tokenizer_model"], arch="gpt2")
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'gpt2'"):
        load_checkpoint(path, **SIZES)


def test_error_gguf_unsupported_tensor_type(tiny, tmp_path):
    import numpy as np
    path = write_gguf(tmp_path / "x.gguf", tiny["state_dict"], tiny["args"], tiny["tokenizer_model"])
    reader = gguf.GGUFReader(path)  # rewrite the file with one tensor stored as 64-bit floats
    writer = gguf.GGUFWriter(str(tmp_path / "f64.gguf"), "llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data).reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, data.astype(np.float64) if t.name == "blk.0.attn_q.weight" else data)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' is stored as F64.*llama-quantize"):
        load_checkpoint(tmp_path / "f64.gguf", **SIZES)


def test_error_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("huggingface_hub")
    with pytest.raises(RuntimeError, match="Could not download 'meta-llama/Llama-2-7b-hf'.*huggingface-cli login"):
        load_checkpoint("meta-llama/Llama-2-7b-hf", device="cpu")


def test_error_bf16_on_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert default_dtype("cuda") == torch.float16
    with pytest.raises(ValueError, match="bfloat16 is not supported on Tesla T4.*dtype=torch.float16"):
        check_dtype("cuda", torch.bfloat16)


def test_error_unsupported_dtype():
    with pytest.raises(ValueError, match="dtype=torch.int8 is not supported"):
        load_checkpoint(None, device="cpu", dtype=torch.int8)


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MAP_SHARED") or __import__("os").name == "nt",
                    reason="torch supports mmap options only on POSIX systems")
def test_hf_bin_stays_unchanged_under_a_shared_mmap_default(tiny, tmp_path):
    "Even if the user made torch map files shared by default, un-permuting wq/wk in place must not write the .bin."
    import hashlib
    import mmap
    ckpt = tmp_path / "hf_bin"
    ckpt.mkdir()
    shutil.copy(tiny["root"] / "hf" / "config.json", ckpt)
    torch.save(tiny["hf"].state_dict(), ckpt / "pytorch_model.bin")
    before = hashlib.sha256((ckpt / "pytorch_model.bin").read_bytes()).hexdigest()
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        model, _ = load_checkpoint(ckpt, tokenizer_path=tiny["tokenizer_model"], **{**SIZES, "dtype": torch.float32})
    assert torch.equal(model.layers[0].attention.wq.weight, tiny["state_dict"]["layers.0.attention.wq.weight"])
    del model
    assert hashlib.sha256((ckpt / "pytorch_model.bin").read_bytes()).hexdigest() == before
