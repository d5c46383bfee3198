__version__ = "0.1.0"
"""llama2-edu: Meta's LLaMA 2 in PyTorch, built one idea per chapter.

Every module except this one is exported from the notebooks in `notebooks/`: edit those, then run `nbdev-export`.
"""
from llama2_edu.model_file import ModelArgs
from llama2_edu.model import Transformer
from llama2_edu.tokenizer import Tokenizer, SentencePieceTokenizer, BPETokenizer, load_tokenizer, fetch_llama2_vocab
from llama2_edu.checkpoint import load_checkpoint, default_device, default_dtype
from llama2_edu.generation import Llama, load, sample_top_p
