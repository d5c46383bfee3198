"""llama2-edu: Meta's LLaMA 2 in PyTorch, built one idea per chapter.

Every module except this one is exported from the notebooks in `notebooks/`: edit those, then run `nbdev-export`.
The names below are imported on first use, so `import llama2_edu.model` loads only the model's own modules.
"""
__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "ModelArgs": "model_file", "Llama2EduError": "support", "Transformer": "model",
    "Tokenizer": "tokenizer", "SentencePieceTokenizer": "tokenizer", "BPETokenizer": "tokenizer",
    "load_tokenizer": "tokenizer", "fetch_llama2_vocab": "tokenizer",
    "load_checkpoint": "checkpoint", "default_device": "checkpoint", "default_dtype": "checkpoint",
    "Llama": "program", "load": "program", "sample_top_p": "generation",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama2_edu' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"llama2_edu.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
