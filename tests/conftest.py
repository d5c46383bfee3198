"Shared test fixtures (the notebooks' environment is set by the root conftest.py)."
import pytest


@pytest.fixture(scope="session")
def embedded_reader():
    "The embedded model's GGUF file (SmolLM2-135M-Instruct, Q4_1), opened once per test session."
    from llama2_edu.model_file import embedded_model_path, open_gguf
    return open_gguf(embedded_model_path())


@pytest.fixture(scope="session")
def embedded_model(embedded_reader):
    "Our Transformer with the embedded model's weights, fp32 on the CPU (a KV cache of 4 x 512 positions)."
    from llama2_edu.model import Transformer
    from llama2_edu.model_file import args_from_gguf, gguf_state_dict
    model = Transformer(args_from_gguf(embedded_reader, max_seq_len=512, max_batch_size=4))
    model.load_state_dict(dict(gguf_state_dict(embedded_reader)))
    return model.eval()


@pytest.fixture(scope="session")
def hf_embedded():
    "transformers' own LlamaForCausalLM and tokenizer, loaded from the same GGUF file: the reference implementation."
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llama2_edu.model_file import embedded_model_path
    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer
