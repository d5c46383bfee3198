"""Bad inputs, round two (issue 24): other models' files, malformed metadata and configs, generation arguments, the
command line's environment, torchrun and hostile files. Each ends in one line naming the problem and the fix.

The damaged files are written here, from one set of tiny random weights (tests/checkpoints.py). The command line runs
in a subprocess where the exit code and stderr matter (one `error:` line, no traceback); the rest is checked through
the API, which raises the same errors. Every chat-template test runs under a memory limit (RLIMIT_AS)."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from checkpoints import random_state_dict, tiny_args, train_tokenizer, write_gguf, write_hf, write_meta
from llama2_edu.checkpoint import load_checkpoint
from llama2_edu.model_file import CheckpointError, ConfigError, InputError, InputTypeError, MissingFileError
from test_bad_input import PROMPT, assert_one_error, cli, main_in_process

TESTS = Path(__file__).parent
SIZES = dict(device="cpu", dtype=torch.float32, max_seq_len=32, max_batch_size=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A tiny model in every layout: Meta (2 shards, tokenizer.model beside it), Hugging Face, GGUF."
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(root / "tokenizer.model")
    args = tiny_args()
    state_dict = random_state_dict(args)
    write_hf(root / "hf", state_dict, args, tokenizer)
    write_meta(root / "meta", state_dict, n_shards=2)
    return dict(root=root, tokenizer=tokenizer, args=args, state_dict=state_dict, hf=root / "hf",
                meta=root / "meta", gguf=write_gguf(root / "tiny.gguf", state_dict, args, tokenizer))


def tiny_gguf(tiny, path, **kw) -> Path:
    "The tiny model as a GGUF file, with write_gguf's `extra`, `vocab` and `context` options."
    return write_gguf(path, tiny["state_dict"], tiny["args"], tiny["tokenizer"], **kw)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> Path:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


# --- silent wrong answers: refused, naming the key --------------------------------------------------------------

def rope_scaling(writer):
    writer.add_string("llama.rope.scaling.type", "linear")
    writer.add_float32("llama.rope.scaling.factor", 4.0)


def rope_freqs(writer):
    writer.add_tensor("rope_freqs.weight", np.full(4, 2.0, np.float32))


def rope_dims(writer):
    writer.add_uint32("llama.rope.dimension_count", 4)  # head_dim is 8


def test_cli_gguf_rope_scaling_is_refused(tiny, tmp_path):
    path = tiny_gguf(tiny, tmp_path / "linear.gguf", extra=rope_scaling)
    assert_one_error(cli("--ckpt", str(path), "--device", "cpu", PROMPT),
                     "linear.gguf", "llama.rope.scaling.type='linear' (factor 4.0)", "plain RoPE")


@pytest.mark.parametrize("extra, needles", [
    (rope_freqs, ["rope_freqs.weight", "per-frequency RoPE scaling factors", "plain RoPE"]),
    (rope_dims, ["llama.rope.dimension_count=4, but head_dim is 8"]),
    (lambda w: w.add_float32("llama.rope.freq_base", float("inf")), ["llama.rope.freq_base=inf is invalid", "> 0"]),
])
def test_gguf_rope_variants_are_refused(tiny, tmp_path, extra, needles):
    path = tiny_gguf(tiny, tmp_path / "m.gguf", extra=extra)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(path, **SIZES)
    assert "m.gguf" in str(e.value) and all(n in str(e.value) for n in needles), e.value


def test_cli_hf_rope_scaling_without_a_type(tiny, tmp_path):
    ckpt = copy_dir(tiny["hf"], tmp_path / "hf")
    edit_json(ckpt / "config.json", rope_scaling={"factor": 4.0}, rope_parameters=...)
    assert_one_error(cli("--ckpt", str(ckpt), "--device", "cpu", PROMPT),
                     "config.json", "RoPE scaling {'factor': 4.0}", "plain RoPE")


@pytest.mark.parametrize("changes, error, needle", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "factor": 4.0}), ConfigError,
     "RoPE scaling"),
    (dict(hidden_act="gelu"), ConfigError, "hidden_act='gelu' in config.json"),
    (dict(rope_theta=0, rope_parameters=...), ConfigError, "rope_theta=0 is invalid"),
    (dict(hidden_size="64"), ConfigError, "hidden_size='64' is invalid: it must be an integer"),
    (dict(rms_norm_eps="1e-5"), ConfigError, "rms_norm_eps='1e-5' is invalid"),
    (dict(rope_theta="10000", rope_parameters=...), ConfigError, "rope_theta='10000' is invalid"),
    (dict(head_dim=16), ConfigError, "head_dim=16 in config.json, but hidden_size // num_attention_heads is 8"),
    (dict(max_position_embeddings="64"), ConfigError, "max_position_embeddings='64' is invalid"),
])
def test_hf_config_values(tiny, tmp_path, changes, error, needle):
    ckpt = copy_dir(tiny["hf"], tmp_path / "hf")
    edit_json(ckpt / "config.json", **changes)
    with pytest.raises(error) as e:
        load_checkpoint(ckpt, **SIZES)
    assert needle in str(e.value) and "config.json" in str(e.value), e.value


def test_hf_head_dim_null_is_accepted(tiny, tmp_path):
    "transformers writes head_dim: null for 'hidden_size // num_attention_heads'."
    ckpt = copy_dir(tiny["hf"], tmp_path / "hf")
    edit_json(ckpt / "config.json", head_dim=None)
    model, _ = load_checkpoint(ckpt, **SIZES)
    assert model.params.head_dim == 8


def test_int8_weights_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    ckpt = copy_dir(tiny["hf"], tmp_path / "hf")
    (weights,) = ckpt.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.ones_like(
        tensors["model.layers.0.self_attn.q_proj.weight"], dtype=torch.int8)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.attention.wq.weight' is stored as torch.int8"):
        load_checkpoint(ckpt, **SIZES)


def test_hf_directory_never_takes_its_neighbours_tokenizer(tiny, tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(tiny["tokenizer"], tmp_path / "models" / "tokenizer.model")  # another model's, one level up
    ckpt = copy_dir(tiny["hf"], tmp_path / "models" / "hf")
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.json").write_text("{}")
    with pytest.raises(MissingFileError, match="has tokenizer.json .* but no tokenizer.model.*--tokenizer"):
        load_checkpoint(ckpt, **SIZES)


def test_cli_system_without_chat(capsys):
    assert_one_error(main_in_process("--system", "Be brief.", PROMPT, capsys=capsys), "--system", "add --chat")


# --- security -----------------------------------------------------------------------------------------------------

def test_cli_index_pointing_at_etc_passwd(tiny, tmp_path):
    ckpt = copy_dir(tiny["hf"], tmp_path / "hf")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "/etc/passwd"}}))
    assert_one_error(cli("--ckpt", str(ckpt), "--device", "cpu", PROMPT),
                     "model.safetensors.index.json points at '/etc/passwd', outside the checkpoint directory")


@pytest.mark.parametrize("weight_map, error, needle", [
    ({"lm_head.weight": "../other/model.safetensors"}, CheckpointError, "'../other/model.safetensors', outside"),
    (["model.safetensors"], ConfigError, "weight_map must map each tensor name to a file name"),
])
def test_index_entries_stay_inside(tiny, tmp_path, weight_map, error, needle):
    (tmp_path / "other").mkdir()
    shutil.copy(next(tiny["hf"].glob("*.safetensors")), tmp_path / "other" / "model.safetensors")
    ckpt = copy_dir(tiny["hf"], tmp_path / "hf")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(error, match=needle):
        load_checkpoint(ckpt, **SIZES)


def test_fifos_named_like_weights_are_refused_not_read(tiny, tmp_path):
    "A FIFO blocks whoever opens it: each load runs in a thread that must finish within seconds."
    hf = copy_dir(tiny["hf"], tmp_path / "hf")
    (weights,) = hf.glob("*.safetensors")
    weights.unlink()
    os.mkfifo(weights)
    meta = copy_dir(tiny["meta"], tmp_path / "meta")
    shutil.copy(tiny["tokenizer"], tmp_path / "tokenizer.model")
    (meta / "consolidated.01.pth").unlink()
    os.mkfifo(meta / "consolidated.01.pth")
    for ckpt, name in [(hf, weights.name), (meta, "consolidated.01.pth")]:
        errors = []
        worker = threading.Thread(target=lambda: errors.append(pytest.raises(CheckpointError, load_checkpoint,
                                                                             ckpt, **SIZES).value), daemon=True)
        worker.start()
        worker.join(60)
        assert errors and f"{name} is not a regular file" in str(errors[0]), errors


# --- chat templates: bounded, under a memory limit ----------------------------------------------------------------

def rlimit(gigabytes: int):
    "preexec_fn: the process may map at most `gigabytes` GB (a runaway template would otherwise eat the machine)."
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (gigabytes << 30, gigabytes << 30))


HOSTILE = {
    "huge string": ("{{ 'a' * 10**9 }}", "TemplateBoundError: its '*' would build a value of more than"),
    "100 x 100 MB": ("{% for i in range(100) %}{{ 'b' * 10**8 }}{% endfor %}", "its '*' would build"),
    "doubling": ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s|length }}", "MemoryError: out of memory"),
    "center": ("{{ 'a'|center(10**9) }}", "MemoryError: out of memory"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "TemplateBoundError: it ran for more than 1 s"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "range": ("{{ range(10**9)|list }}", "OverflowError: Range too big"),
    "syntax": ("{% for %}", "TemplateSyntaxError"),
    "escape": ("{{ ''.__class__.__mro__ }}", "SecurityError"),
}
REAL = {  # the shapes of real templates: loop controls, Llama 3's date, refusals, {% generation %}
    "continue": ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}"
                 "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}", "hi"),
    "strftime_now": ("Today: {{ strftime_now('%Y') }}", f"Today: {time.strftime('%Y')}"),
    "generation": ("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}", "[hi]"),
}


def test_chat_templates_under_a_memory_limit(tmp_path):
    "Every template renders in a subprocess limited to 4 GB of address space; the hostile ones end in one error each."
    code = textwrap.dedent(f"""
        import json, time
        import llama2_edu.generation as g
        import llama2_edu.support
        llama2_edu.support.TEMPLATE_SECONDS = 1.0  # the sandbox's deadline (the appendix)
        out = {{}}
        for name, template in json.loads({json.dumps(json.dumps({k: v[0] for k, v in {**HOSTILE, **REAL}.items()}))}).items():
            start = time.monotonic()
            try:
                text = g.render_chat_template(template, [{{"role": "user", "content": "hi"}}], source="t.gguf")
                out[name] = ["ok", text, time.monotonic() - start]
            except Exception as e:
                out[name] = [type(e).__name__, str(e), time.monotonic() - start]
        try:
            g.render_chat_template("{{{{ raise_exception('only user and assistant roles') }}}}", [])
        except Exception as e:
            out["raise_exception"] = [type(e).__name__, str(e), 0]
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         preexec_fn=rlimit(4), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    for name, (_, needle) in HOSTILE.items():
        kind, message, seconds = out[name]
        assert kind == "CheckpointError" and needle in message, (name, kind, message)
        assert message.startswith("The chat template of t.gguf (tokenizer.chat_template) cannot be rendered")
        assert "\n" not in message and seconds < 20, (name, seconds)
    for name, (_, expected) in REAL.items():
        assert out[name][:2] == ["ok", expected], (name, out[name])
    assert out["raise_exception"][:2] == ["InputError",
                                          "The chat template refused the dialog: only user and assistant roles"]


def test_cli_hostile_template_in_a_gguf(tiny, tmp_path):
    path = tiny_gguf(tiny, tmp_path / "hostile.gguf", extra=lambda w: w.add_chat_template("{{ 'a' * 10**9 }}"))
    run = subprocess.run([sys.executable, "-m", "llama2_edu", "--ckpt", str(path), "--device", "cpu", "--chat", "hi"],
                         capture_output=True, preexec_fn=rlimit(8), timeout=300,
                         env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    result = run.returncode, run.stdout.decode(), run.stderr.decode()
    assert_one_error(result, "The chat template of", "hostile.gguf", "TemplateBoundError", "Drop --chat")


# --- GGUF metadata ------------------------------------------------------------------------------------------------

def test_cli_gguf_without_tokens(tiny, tmp_path):
    path = tiny_gguf(tiny, tmp_path / "notokens.gguf", vocab=False)
    assert_one_error(cli("--ckpt", str(path), "--device", "cpu", PROMPT),
                     "no tokenizer.ggml.tokens", "--tokenizer")


def bpe_gguf(path: Path, merges=None, **ids) -> Path:
    "A vocabulary-only GGUF with a byte-level BPE (gpt2) tokenizer."
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<|end|>"])
    if merges is not None:
        writer.add_token_merges(merges)
    for key, value in ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("merges, ids, needle", [
    (None, {}, "tokenizer.ggml.merges is missing"),
    (["a b c"], {}, "tokenizer.ggml.merges is missing or holds a merge that is not two pieces"),
    (["a b"], dict(eos_token_id=7), "tokenizer.ggml.eos_token_id=7 is not a token of the file's 4-piece vocabulary"),
])
def test_gguf_tokenizer_metadata(tmp_path, merges, ids, needle):
    from llama2_edu.tokenizer import tokenizer_from_gguf
    with pytest.raises(CheckpointError, match=needle):
        tokenizer_from_gguf(bpe_gguf(tmp_path / "bpe.gguf", merges, **ids))


def test_sentencepiece_bos_out_of_range(tiny, tmp_path):
    path = tiny_gguf(tiny, tmp_path / "bos.gguf", extra=lambda w: w.add_uint32("tokenizer.ggml.bos_token_id", 999))
    with pytest.raises(CheckpointError, match="bos.gguf.*tokenizer.ggml.bos_token_id=999 is not a token"):
        load_checkpoint(path, **SIZES)


def test_a_million_pieces_are_refused_from_the_header(tiny, tmp_path):
    "The vocabulary disagrees with the weights: refused from the header, without parsing a million strings twice."
    path = tiny_gguf(tiny, tmp_path / "million.gguf", vocab=False, extra=lambda w: w.add_token_list(
        [f"t{i}" for i in range(1_000_000)]))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="tokenizer.ggml.tokens has 1,000,000 pieces but the model has 384"):
        load_checkpoint(path, **SIZES)
    assert time.monotonic() - start < 15


def test_gguf_of_another_architecture_is_refused_from_the_header(tmp_path):
    path = tmp_path / "gemma3.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_token_list([f"t{i}" for i in range(200_000)])
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
    writer.close()
    from llama2_edu.program import load
    with pytest.raises(ConfigError, match="gemma3.gguf: Unsupported GGUF architecture 'gemma3'"):
        load(path, device="cpu")


def test_gguf_is_opened_once_per_load(tiny, monkeypatch):
    import llama2_edu.support as tokenizer  # open_gguf's module (the appendix)
    from llama2_edu.program import load
    opened = []
    reader = tokenizer._checked_reader()
    monkeypatch.setattr(tokenizer, "_checked_reader", lambda: lambda path: opened.append(path) or reader(path))
    tokenizer._open_readers.clear()
    load(tiny["gguf"], device="cpu", max_seq_len=32, max_batch_size=1)  # quantize='auto': GGUF blocks kept
    assert len(opened) == 1, opened


# --- unbounded allocations ------------------------------------------------------------------------------------------

def test_cli_huge_cache_without_context_length(tiny, tmp_path):
    path = tiny_gguf(tiny, tmp_path / "nocontext.gguf", context=False)
    line = assert_one_error(cli("--ckpt", str(path), "--device", "cpu", "--max-seq-len", "100000000", PROMPT),
                            "max_seq_len=100000000 positions needs", "GB of memory available on cpu",
                            "--max-seq-len")
    assert "GB, more than the" in line


def test_api_huge_batch_is_refused_before_allocating():
    from llama2_edu.program import load
    with pytest.raises(InputError, match=r"max_batch_size=100000 x max_seq_len=512 positions needs [\d,.]+ GB"):
        load(device="cpu", max_batch_size=100000)


# --- config types and ranges: one place, naming the file and key --------------------------------------------------

@pytest.mark.parametrize("changes, needle", [
    (dict(norm_eps="1e-5"), "norm_eps='1e-5' is invalid: it must be a finite number > 0"),
    (dict(rope_theta="10000"), "rope_theta='10000' is invalid"),
    (dict(multiple_of=0), "multiple_of=0 is invalid: it must be an integer >= 1"),
    (dict(ffn_dim_multiplier=-1), "ffn_dim_multiplier=-1 is invalid"),
    (dict(ffn_dim_multiplier="1.3"), "ffn_dim_multiplier='1.3' is invalid"),
    (dict(dim="64"), "dim='64' is invalid"),
])
def test_params_json_values(tiny, tmp_path, changes, needle):
    ckpt = copy_dir(tiny["meta"], tmp_path / "meta")
    shutil.copy(tiny["tokenizer"], tmp_path / "tokenizer.model")
    edit_json(ckpt / "params.json", **changes)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(ckpt, **SIZES)
    assert "params.json" in str(e.value) and needle in str(e.value), e.value


def test_cli_meta_directory_missing_a_shard(tiny, tmp_path):
    ckpt = copy_dir(tiny["meta"], tmp_path / "meta")
    shutil.copy(tiny["tokenizer"], tmp_path / "tokenizer.model")
    (ckpt / "consolidated.01.pth").unlink()
    assert_one_error(cli("--ckpt", str(ckpt), "--device", "cpu", PROMPT),
                     "saved in 2 shards, and 1 are here", "A shard is missing", "consolidated.01.pth")
    shutil.move(ckpt / "consolidated.00.pth", ckpt / "consolidated.01.pth")  # the first one gone
    with pytest.raises(CheckpointError, match="numbers them from consolidated.00.pth without a gap"):
        load_checkpoint(ckpt, **SIZES)


# --- the API: generation arguments --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(embedded_model, embedded_reader):
    from llama2_edu.generation import Llama
    from llama2_edu.tokenizer import tokenizer_from_gguf
    return Llama(embedded_model, tokenizer_from_gguf(embedded_reader))


def test_api_generate_with_max_gen_len_none(tiny):
    "None means what text_completion means by it: as many tokens as the KV cache holds after the prompt."
    from llama2_edu.generation import Llama
    llama = Llama(*load_checkpoint(tiny["meta"], **{**SIZES, "max_seq_len": 12}))
    ids = llama.encode_prompt("cheese")
    (out,), _ = llama.generate([ids], None, temperature=0, ignore_eos=True)
    assert len(out) == 12 - len(ids)


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, "7", True])
def test_api_seeds(llama, seed):
    with pytest.raises(InputError, match=f"seed={seed!r} is invalid"):
        llama.text_completion([PROMPT], max_gen_len=1, seed=seed)


def test_cli_seed_is_checked_before_loading(capsys):
    start = time.monotonic()
    assert_one_error(main_in_process("--seed", str(2**64), PROMPT, capsys=capsys),
                     "seed=18446744073709551616 is invalid", "2**64 - 1")
    assert time.monotonic() - start < 2  # nothing was loaded


def test_api_integer_like_ids(llama):
    ids = llama.encode_prompt(PROMPT)
    (expected,), _ = llama.generate([ids], 3, temperature=0)
    for prompts in ([np.array(ids)], [[np.int64(i) for i in ids]], torch.tensor([ids]), [torch.tensor(ids)]):
        (out,), _ = llama.generate(prompts, 3, temperature=0)
        assert out == expected
    for bad in ([1.0], [True], [torch.tensor(True)]):
        with pytest.raises(InputError, match="at position 0 is not in the vocabulary"):
            llama.generate([bad], 1)


def test_api_prompts_from_a_generator(llama):
    (a,) = llama.text_completion((p for p in [PROMPT]), temperature=0, max_gen_len=2)
    (b,) = llama.text_completion([PROMPT], temperature=0, max_gen_len=2)
    assert a == b
    (c,) = llama.chat_completion(([{"role": "user", "content": "hi"}] for _ in range(1)), temperature=0,
                                 max_gen_len=2)
    assert c["generation"]["role"] == "assistant"
    with pytest.raises(InputTypeError, match="prompts must be a list of strings"):
        llama.text_completion(None)


# --- the command line's environment -------------------------------------------------------------------------------

def test_cli_closed_streams():
    "`>&-` and `<&-`: the shell starts the program with that descriptor closed."
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for fd, args, needle, code in [(1, [PROMPT], "standard output is closed", 1), (0, [], "no prompt", 2)]:
        run = subprocess.run([sys.executable, "-m", "llama2_edu", *args], capture_output=True, env=env,
                             preexec_fn=lambda fd=fd: os.close(fd), timeout=120)
        assert_one_error((run.returncode, "", run.stderr.decode()), needle, code=code)


def test_file_reads_fifos_with_a_limit(tmp_path, monkeypatch):
    import llama2_edu.program as cli_main
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    parser = cli_main.build_parser()

    def feed(data):
        threading.Thread(target=lambda: Path(fifo).write_bytes(data), daemon=True).start()

    feed(b"The capital of France is\n")
    assert cli_main.read_prompt(parser.parse_args(["--file", str(fifo)]), parser) == "The capital of France is"
    import llama2_edu.support as support  # read_prompt's module (the appendix)
    monkeypatch.setattr(support, "MAX_PROMPT_BYTES", 16)
    feed(b"x" * 100)
    with pytest.raises(InputError, match="The prompt is longer than"):
        cli_main.read_prompt(parser.parse_args(["--file", str(fifo)]), parser)


def test_cli_stdin_under_torchrun(tiny):
    "`echo ... | torchrun --nproc_per_node 2 -m llama2_edu`: rank 0 reads the prompt and sends it to rank 1."
    from llama2_edu import load
    args = ["--temperature", "0", "--max-gen-len", "4", "--device", "cpu", "--max-seq-len", "32"]
    expected = load(tiny["meta"], **{**SIZES, "max_batch_size": 1}).text_completion(
        [PROMPT], temperature=0, max_gen_len=4)[0]["generation"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "llama2_edu", "--ckpt", str(tiny["meta"]), "--dtype", "fp32", *args],
                         input=PROMPT + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected + "\n"


# --- fetch-tokenizer ----------------------------------------------------------------------------------------------

def test_cli_fetch_tokenizer_unwritable_cache_fails_before_downloading():
    start = time.monotonic()
    assert_one_error(cli("fetch-tokenizer", "--cache", "/proc/llama2_edu_cache"), "is not writable", "--cache")
    assert time.monotonic() - start < 60


def test_fetch_tokenizer_sigterm_ends_pip_and_removes_its_download(tmp_path):
    """`llama2-edu fetch-tokenizer` killed with SIGTERM ends pip and removes the download. A fake pip (a slow
    child writing into the download folder) stands in for the real one: no network."""
    marker = tmp_path / "child.json"
    code = textwrap.dedent(f"""
        import sys
        import llama2_edu.support as s
        from llama2_edu.__main__ import run
        child = ("import json, os, sys, time; d = sys.argv[1]; open(os.path.join(d, 'part.tar.gz'), 'wb').write(b'x');"
                 "json.dump({{'pid': os.getpid(), 'dir': d}}, open({str(marker)!r}, 'w')); time.sleep(600)")
        s._pip_download_command = lambda requirement, dest: [sys.executable, "-c", child, str(dest)]
        sys.argv = ["llama2-edu", "fetch-tokenizer", "--cache", {str(tmp_path / 'cache')!r}]
        sys.exit(run())
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, parent.stderr.read()
        time.sleep(0.2)
    time.sleep(0.2)
    child = json.loads(marker.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(60) == 128 + 15
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(child["pid"], 0)
    assert not Path(child["dir"]).exists()


def test_a_killed_process_leaves_no_pip_behind_and_the_library_sets_no_signal_handler(tmp_path):
    """Called from Python, the download changes no signal handler; if its process is killed outright (SIGKILL,
    no cleanup possible), Linux ends the pip child with it (PR_SET_PDEATHSIG)."""
    marker = tmp_path / "child.json"
    code = textwrap.dedent(f"""
        import signal, sys
        import llama2_edu.support as s
        child = ("import json, os, sys, time; json.dump({{'pid': os.getpid()}}, open({str(marker)!r}, 'w'));"
                 "time.sleep(600)")
        s._pip_download_command = lambda requirement, dest: [sys.executable, "-c", child, str(dest)]
        before = signal.getsignal(signal.SIGTERM)
        import threading
        threading.Thread(target=lambda: s.download_llama2_vocab(s.Path({str(tmp_path / 'cache')!r})),
                         daemon=True).start()
        import time
        while True:
            assert signal.getsignal(signal.SIGTERM) is before, "the download changed SIGTERM's handler"
            time.sleep(0.05)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, parent.stderr.read()
        time.sleep(0.2)
    child = json.loads(marker.read_text())
    time.sleep(0.5)
    assert parent.poll() is None, parent.stderr.read()  # the handler never changed
    parent.kill()
    parent.wait(60)
    deadline = time.monotonic() + 10
    stat = Path(f"/proc/{child['pid']}/stat")
    # gone, or a zombie waiting for init to reap it: either way no longer running
    while stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, "pip outlived its killed parent"
        time.sleep(0.1)
