"""Write tiny random Llama 2 checkpoints in Meta's, Hugging Face's and llama.cpp's (GGUF) layouts, for the tests.

No real Llama 2 weights exist here: the tests make their own. One set of random weights (Meta's names and
Meta's interleaved RoPE row order) is written in each layout, so every loader must recover the same model.
"""
import json
from pathlib import Path

import numpy as np
import torch

TINY_PARAMS = dict(  # params.json of a tiny Llama 2 70B look-alike: GQA and ffn_dim_multiplier
    dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=-1, multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5,
)
TINY_VOCAB = 384  # byte fallback (256 pieces) + merges; divisible by 1, 2 and 4 shards (Meta splits `output` by rows)

CORPUS = [
    "Translate English to French: sea otter => loutre de mer, peppermint => menthe poivrée, cheese => fromage.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.",
    "Llama 2 is a family of large language models released by Meta with seven to seventy billion parameters.",
    "Rotary position embeddings rotate pairs of query and key features by an angle that grows with position.",
    "A key value cache stores past keys and values so that each new token costs one step instead of many.",
]


def train_tokenizer(path: Path, vocab_size: int = TINY_VOCAB) -> Path:
    "Train a small SentencePiece BPE model like Llama 2's (byte fallback, <unk>=0, <s>=1, </s>=2) and write it to `path`."
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=True, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def tiny_args(vocab_size: int = TINY_VOCAB, **overrides):
    "ModelArgs of the tiny model (fp32 tests use a small KV cache)."
    from llama2_edu.model_file import ModelArgs
    return ModelArgs(**{**TINY_PARAMS, "vocab_size": vocab_size, "max_seq_len": 64, "max_batch_size": 2, **overrides})


def random_state_dict(args, seed: int = 0) -> dict:
    """Random weights (Meta's names and row order) for `args`: the shapes of a meta-device Transformer. Large enough
    that attention is far from uniform (wq, wk ~ N(0, 0.2)), so a wrong row order or head split changes the logits."""
    from llama2_edu.model import Transformer
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    std = lambda name: 0.2 if name.endswith(("wq.weight", "wk.weight")) else 1.0 if "tok_embeddings" in name else 0.1
    return {name: (1 + 0.1 * torch.randn(shape, generator=g)) if name.endswith("norm.weight")
            else std(name) * torch.randn(shape, generator=g)
            for name, shape in shapes.items()}


def shard_meta(state_dict: dict, n_shards: int) -> list:
    "Split a full Meta state dict into `n_shards` model-parallel shards, as Meta's training code saved them."
    from llama2_edu.checkpoint import meta_split_dim
    shards = [{} for _ in range(n_shards)]
    for name, w in state_dict.items():
        dim = meta_split_dim(name)
        parts = [w] * n_shards if dim is None else w.chunk(n_shards, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def write_meta(ckpt_dir: Path, state_dict: dict, params: dict = TINY_PARAMS, n_shards: int = 1,
               dtype=torch.float32, rope_freqs: bool = True) -> Path:
    "Meta's layout: params.json + consolidated.NN.pth (one per model-parallel shard); `rope.freqs` included, as in Meta's files."
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shard_meta(state_dict, n_shards)):
        shard = {name: w.to(dtype) for name, w in shard.items()}
        if rope_freqs:
            shard["rope.freqs"] = torch.ones(params["dim"] // params["n_heads"] // 2)
        torch.save(shard, ckpt_dir / f"consolidated.{i:02d}.pth")
    return ckpt_dir


def hf_config(args, tie_word_embeddings: bool = False):
    "transformers' LlamaConfig for `args`."
    from transformers import LlamaConfig

    from llama2_edu.model import ffn_hidden_dim
    return LlamaConfig(
        hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args), num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads, num_hidden_layers=args.n_layers,
        vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2)


def to_hf(state_dict: dict, args) -> dict:
    "Meta names and row order -> Hugging Face names and row order (wq/wk permuted with `permute_to_hf`)."
    from llama2_edu.checkpoint import HF_TO_META
    from llama2_edu.rope import permute_to_hf
    inverse = {meta: hf for hf, meta in HF_TO_META.items()}
    out = {}
    for name, w in state_dict.items():
        parts = name.split(".")
        key, i = (".".join(["layers", "{i}", *parts[2:]]), parts[1]) if parts[0] == "layers" else (name, None)
        if key.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.n_kv_heads or args.n_heads)
        out[inverse[key].format(i=i)] = w.contiguous()
    return out


def write_hf(ckpt_dir: Path, state_dict: dict, args, tokenizer_model: Path = None, max_shard_size="50GB",
             tie_word_embeddings: bool = False):
    "Hugging Face's layout, written by transformers itself (save_pretrained); returns the fp32 LlamaForCausalLM."
    from transformers import LlamaForCausalLM
    config = hf_config(args, tie_word_embeddings)
    model = LlamaForCausalLM(config).eval()
    hf = to_hf(state_dict, args)
    if tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ckpt_dir = Path(ckpt_dir)
    model.save_pretrained(ckpt_dir, max_shard_size=max_shard_size)
    if tokenizer_model is not None:
        (ckpt_dir / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return model


def write_gguf(path: Path, state_dict: dict, args, tokenizer_model: Path, qtype=None, arch: str = "llama",
               extra=None, vocab: bool = True, context: bool = True) -> Path:
    """llama.cpp's layout, written by `gguf`'s own GGUFWriter: Meta's row order, llama.cpp's names, the SentencePiece
    vocabulary in the metadata. Matrices are stored as `qtype` (a GGMLQuantizationType; None: F32), norms as F32.
    `extra(writer)` adds keys or tensors of its own; `vocab`/`context` False leave out the tokens / context_length."""
    import gguf
    import sentencepiece as spm

    from llama2_edu.model import ffn_hidden_dim
    from llama2_edu.model_file import GGUF_TO_META
    qtype = qtype or gguf.GGMLQuantizationType.F32
    inverse = {meta: g for g, meta in GGUF_TO_META.items()}
    writer = gguf.GGUFWriter(str(path), arch)
    if context:
        writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(ffn_hidden_dim(args))
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads or args.n_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_vocab_size(args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(sp.vocab_size())]
    writer.add_tokenizer_model("llama")
    if vocab:
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_bos_token(True)
    if extra is not None:
        extra(writer)
    for name, w in state_dict.items():
        parts = name.split(".")
        key, i = (".".join(["layers", "{i}", *parts[2:]]), parts[1]) if parts[0] == "layers" else (name, None)
        data = w.float().numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(inverse[key].format(i=i), data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(inverse[key].format(i=i), data.astype(np.float16))
        else:
            writer.add_tensor(inverse[key].format(i=i), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# A checkpoint whose answer is known: Llama 2's real tokenizer, tiny sizes, and a hand-written bigram table

def fromage_state_dict(args, tokenizer, seed: int = 0) -> dict:
    """Weights (Meta's names and row order) whose greedy completion of FRENCH_PROMPT is ' fromage', then a new
    line and EOS, by construction. Every block's `wo` and `w2` are tiny (std 0.005), so the residual stream stays
    close to the current token's embedding and the logits are, up to a small perturbation, a bigram table:
    output @ norm(embedding). The table is written by hand: the prompt's last token ('▁=>') -> '▁from' -> 'age'
    -> '\\n' -> '</s>', and ']' (the end of a chat prompt's [/INST]) -> '▁from'. Each chain token's embedding is
    a basis vector, so its next token's logit is 16 and every other logit is below 2."""
    from llama2_edu.tokenizer import FRENCH_PROMPT
    state = random_state_dict(args, seed)
    prompt = tokenizer.encode(FRENCH_PROMPT, bos=True, eos=False)
    answer = tokenizer.encode(FRENCH_PROMPT + " fromage\n", bos=True, eos=False)[len(prompt):]
    inst_end = tokenizer.encode("[/INST]", bos=False, eos=False)[-1]
    chain = [(prompt[-1], answer[0]), (inst_end, answer[0]), *zip(answer, answer[1:]),
             (answer[-1], tokenizer.eos_id)]
    g = torch.Generator().manual_seed(seed + 1)
    for name in state:
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            state[name] = 0.005 * torch.randn(state[name].shape, generator=g)
    emb = 0.02 * torch.randn(state["tok_embeddings.weight"].shape, generator=g)
    out = 0.02 * torch.randn(state["output.weight"].shape, generator=g)
    for k, (before, after) in enumerate(chain):
        basis = torch.zeros(args.dim)
        basis[k] = 1.0
        emb[before] = basis
        out[after] += 2.0 * basis  # norm(basis) is sqrt(dim) * basis: a logit of 2 * sqrt(dim) = 16
    state["tok_embeddings.weight"], state["output.weight"] = emb, out
    state["norm.weight"] = torch.ones(args.dim)
    return state


def write_fromage(folder: Path, tokenizer_model: Path) -> dict:
    """The fromage checkpoint with Llama 2's tokenizer, in Meta's layout (`llama-2-7b/` with `tokenizer.model`
    beside it, as Meta's download.sh writes them) and in Hugging Face's (`hf/`, written by transformers).
    Returns {"meta": path, "hf": path, "state_dict": ..., "args": ...}."""
    from llama2_edu.tokenizer import load_tokenizer
    folder = Path(folder)
    tokenizer = load_tokenizer(tokenizer_model)
    args = tiny_args(vocab_size=tokenizer.n_words, max_seq_len=4096)  # as Llama 2 was trained
    state = fromage_state_dict(args, tokenizer)
    meta = write_meta(folder / "llama-2-7b", state)
    (folder / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    write_hf(folder / "hf", state, args, tokenizer_model=tokenizer_model)
    return {"meta": meta, "hf": folder / "hf", "state_dict": state, "args": args}
