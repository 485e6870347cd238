"""Model sources: standard pretrained models (mlx-lm architectures, GGUF files) as Bit-Axon models."""

from bit_axon.sources.default_model import default_model_path
from bit_axon.sources.gguf import GGUFError, load_gguf, read_gguf, read_gguf_tokenizer
from bit_axon.sources.pretrained import (
    PackedRowAttention,
    PretrainedLMMixin,
    build_pretrained,
    load_hf_directory,
    pretrained_class,
)
from bit_axon.sources.saving import save_pretrained
from bit_axon.sources.tokenizer import ChatTokenizer

__all__ = [
    "ChatTokenizer",
    "GGUFError",
    "PackedRowAttention",
    "PretrainedLMMixin",
    "build_pretrained",
    "default_model_path",
    "load_gguf",
    "load_hf_directory",
    "pretrained_class",
    "read_gguf",
    "read_gguf_tokenizer",
    "save_pretrained",
]
