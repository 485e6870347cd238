"""Using a trained model: loading, sampling, streaming generation, chat and evaluation."""

from bit_axon.inference.chat import ChatSession
from bit_axon.inference.detokenizer import StreamingDetokenizer
from bit_axon.inference.evaluate import evaluate_model
from bit_axon.inference.generate import (
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    collect,
    generate,
    generate_step,
    stream_generate,
)
from bit_axon.inference.loader import load, load_for_inference
from bit_axon.inference.sampling import Sampler, top_k_filter, top_p_filter

__all__ = [
    "ChatSession",
    "GenerationChunk",
    "GenerationResult",
    "GenerationStats",
    "Sampler",
    "StreamingDetokenizer",
    "collect",
    "evaluate_model",
    "generate",
    "generate_step",
    "load",
    "load_for_inference",
    "stream_generate",
    "top_k_filter",
    "top_p_filter",
]
