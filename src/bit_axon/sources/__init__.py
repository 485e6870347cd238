"""Model sources: standard pretrained models (mlx-lm architectures, GGUF files) as Bit-Axon models."""

from bit_axon.sources.gguf import GGUFError, load_gguf, read_gguf
from bit_axon.sources.pretrained import (
    PackedRowAttention,
    PretrainedLMMixin,
    build_pretrained,
    load_hf_directory,
    pretrained_class,
)
from bit_axon.sources.tokenizer import ChatTokenizer

__all__ = [
    "ChatTokenizer",
    "GGUFError",
    "PackedRowAttention",
    "PretrainedLMMixin",
    "build_pretrained",
    "load_gguf",
    "load_hf_directory",
    "pretrained_class",
    "read_gguf",
]
