"""GGUF files (llama.cpp's format) as mlx-lm models with the Bit-Axon model interface.

``mx.load`` reads a GGUF file: F16/F32 tensors come back as float arrays, Q4_0/Q4_1/Q8_0 ones as
MLX affine triples (``weight`` uint32, ``scales``, ``biases``), which stay quantized here with the
bits and group size read from their shapes. The metadata becomes an mlx-lm config dict and the
tensors are renamed to mlx-lm's parameter paths; the model is built by ``build_pretrained``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bit_axon.sources.pretrained import build_pretrained

import mlx.core as mx
import mlx.nn as nn

# llama.cpp stores Llama's q/k rows permuted for its interleaved RoPE, so the mlx-lm model runs
# them with traditional (interleaved) RoPE; Qwen2 uses NeoX-style RoPE and is stored unpermuted.
ROPE_TRADITIONAL = {"llama": True, "qwen2": False}
SUPPORTED_ARCHITECTURES = tuple(ROPE_TRADITIONAL)
DEFAULT_ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0}

GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# "bias" is a layer's own bias (Qwen2's q/k/v); "scales"/"biases" are the affine quantization's.
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias|scales|biases)$")
FLOAT_DTYPES = (mx.float16, mx.float32, mx.bfloat16)


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded as a model; the message names the file."""


def _scalar(metadata: dict, key: str, path: Path, default: Any = None) -> Any:
    if key not in metadata:
        if default is None:
            raise GGUFError(f"{path}: metadata key {key!r} is missing")
        return default
    value = metadata[key]
    return value.item() if isinstance(value, mx.array) else value


def gguf_config(metadata: dict, tensors: dict[str, mx.array], path: Path) -> dict:
    """The mlx-lm config dict that a GGUF file's metadata describes (no quantization entries)."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return _scalar(metadata, f"{arch}.{key}", path, default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab = int(get("vocab_size", tensors["token_embd.weight"].shape[0]))
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", DEFAULT_ROPE_THETA[arch])),
        "rope_traditional": ROPE_TRADITIONAL[arch],
        "vocab_size": vocab,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported (only 'linear')")
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    return config


def mlx_lm_name(gguf_name: str, path: Path) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` and so on."""
    match = _TENSOR_NAME.match(gguf_name)
    base = None
    if match:
        block, layer, suffix = match.groups()
        base = BLOCK_TENSORS.get(layer) if block is not None else GLOBAL_TENSORS.get(layer)
    if base is None:
        raise GGUFError(f"{path}: unexpected tensor {gguf_name!r} (not a Llama/Qwen2 tensor this loader knows)")
    return f"model.layers.{block}.{base}.{suffix}" if block is not None else f"{base}.{suffix}"


def check_tensor_types(weights: dict[str, mx.array], path: Path) -> None:
    """Float tensors, or MLX affine triples (uint32 ``weight`` with ``scales`` and ``biases``)."""
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        layer = name.rsplit(".", 1)[0]
        quantized = value.dtype == mx.uint32 and f"{layer}.scales" in weights and f"{layer}.biases" in weights
        if value.dtype not in FLOAT_DTYPES and not quantized:
            raise GGUFError(f"{path}: tensor {name!r} has an unsupported type ({value.dtype})")


def _read(path: Path) -> tuple[dict[str, mx.array], dict]:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e


def read_gguf(path: str | Path) -> tuple[dict, dict[str, mx.array], dict]:
    """A GGUF file's mlx-lm config dict, its weights under mlx-lm's names, and its tokenizer
    metadata (the ``tokenizer.*`` keys, maybe empty)."""
    path = Path(path)
    tensors, metadata = _read(path)
    config = gguf_config(metadata, tensors, path)
    weights = {mlx_lm_name(name, path): value for name, value in tensors.items()}
    layers = config["num_hidden_layers"]
    expected = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(layers) for t in BLOCK_TENSORS
    ]
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise GGUFError(f"{path}: tensors missing: {shown}")
    check_tensor_types(weights, path)
    return config, weights, {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def read_gguf_tokenizer(path: str | Path) -> dict:
    """The ``tokenizer.*`` metadata of a GGUF file (maybe empty)."""
    _, metadata = _read(Path(path))
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}


def load_gguf(path: str | Path) -> tuple[nn.Module, dict]:
    """The model in a GGUF file (quantized tensors kept in their format) and its tokenizer metadata."""
    config, weights, tokenizer_data = read_gguf(path)
    return build_pretrained(config, weights, source=str(path)), tokenizer_data
