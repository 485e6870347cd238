"""Base weights from a Llama / Qwen2 checkpoint: a Bit-Axon model initialised from a pretrained one.

The source is anything ``bit_axon.loading.load_model`` reads whose architecture is Llama or Qwen2
(mlx-lm's ``llama`` / ``qwen2`` modules, so Mistral-style Llama variants too): a Hugging Face
directory (float or MLX-quantized), a GGUF file (SmolLM2-135M-Instruct, the offline default, is one)
or a hub id. Quantized layers are dequantized to float32 before anything is copied. Bit-Axon takes
the source's vocabulary and uses its hidden size as ``d_source_model``, so the embedding (and tied
head) carry over unchanged, and the output directory gets the source's tokenizer and chat template.
The layers differ (SSM / attention+MoE / SSM+MoE, no RoPE, no biases, no final norm, maybe another
width and depth), so the rest is a mapping, chosen so that at initialisation the Bit-Axon model
computes, as nearly as its structure allows, the source network (docs/porting.md has the details and
the measurements):

* Architecture (``bitaxon_config_for``, when no ``config`` is given): sized from the source, so the
  student costs about what the teacher does: hidden_dim = d_source_model = source hidden size S,
  num_layers = the largest multiple of 3 <= the source's layers, num_heads = the source's heads,
  moe_intermediate_dim = the source's intermediate size, 4 routed experts, top-1, no shared expert
  (one MLP per token, like the source), ssm_expand = ceil(heads * head_dim / S) (the SSM's inner
  width holds one channel per attention value coordinate), d_state 16, max_seq_len = the source's
  max_position_embeddings capped at 65,536, the attention window = min(4096, max_seq_len).
* Width. The source's residual stream (S) is embedded into Bit-Axon's (H = hidden_dim) by the
  identity-like map P = [I; 0] (H > S: extra coordinates start at zero; H < S: the first H
  coordinates are kept). ``input_proj = P``; every copied weight is placed through P.
* Depth (``layer_sources``). Identity start: only the MoE layers (zones 2 and 3) receive source
  layers, the k-th of them layer round(k * (n_src - 1) / (n_moe - 1)): evenly spaced, first and last
  included. Attention start: every Bit-Axon layer receives one, the same way over all layers; zone 1
  layers take only the source layer's attention (zone 1 has no MLP), zone 2 attention + MLP, zone 3
  the attention (as the SSM) + MLP. With fewer source layers than Bit-Axon layers, some repeat.
* SSM mixers, ``ssm_init="identity"``: Mamba's default init, except ``out_proj = 0``, so each starts
  as the identity (its residual adds nothing) and the ported layers see source-like inputs.
  ``ssm_init="attention"`` ("The Mamba in the Llama", Wang et al. 2024): the mixer starts as a linear
  attention built from the source layer's attention, x <- V, B <- K, C <- Q, out_proj <- O, with
  scales fitted on calibration tokens (``bit_axon.porting_ssm``).
* Attention (zone 2): the source's q/k/v/o, GQA k/v heads repeated to one per query head. Each source
  head (head_dim_q) is split over ceil(head_dim_q / head_dim) consecutive Bit-Axon heads when they fit
  (e.g. 16 x 128 -> 32 x 80: dims 0-79 and 80-127 of a head become two heads), else the inner
  coordinates are laid out flat. Not reproduced: RoPE (Bit-Axon has no positional encoding), the q and
  v biases of Qwen2 (Bit-Axon has none; the k bias adds a per-query constant to every score, so
  dropping it changes nothing), and each split head's softmax, taken over a part of the dot product.
  Unused inner coordinates get q = 0 and o = 0 with k, v random, so they contribute nothing yet learn.
  GGUF files store Llama's q/k rows permuted for interleaved RoPE; they are put back in the Hugging
  Face order first, so a port from a GGUF equals a port from the same model's HF directory.
* MLP -> MoE (zones 2 and 3): gate/up/down go into the shared expert (if any) and, with
  multiplicative noise (``expert_noise``, so experts can diverge), into every routed expert. With
  F = moe_intermediate_dim < the source's intermediate size, the F channels with the largest
  ||gate_j||·||up_j||·||down_j|| are kept; with F larger, extra channels get random gate/up and zero
  down. The router starts nearly uniform (N(0, 1e-3)) and ``shared_expert_gate`` at 0 (sigmoid 0.5),
  so the MoE output is about ((0.5 if shared) + top_k / experts) times one expert's; the copied
  down_proj weights are divided by that.
* Norms: the source's RMSNorm weights, times sqrt(S / H) when H > S (the zero extra coordinates
  shrink the RMS by that factor). input_layernorm -> ``input_norm`` of attention layers (and of SSM
  layers started from attention); post_attention_layernorm -> ``post_attention_norm`` /
  ``post_ssm_norm``; identity-start SSM blocks' ``input_norm`` = 1.
* Final norm: Bit-Axon has none. The source's final norm weight is folded into ``output_proj =
  diag(g / r) P^T``, where r is the median RMS of the last hidden states over ``calibration_tokens``
  random tokens, measured on the ported model itself.
* Head: tied to the embedding when the source ties it, else the source's ``lm_head`` copied.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bit_axon.config import BitAxonConfig
from bit_axon.io import atomic_write_text
from bit_axon.layers.blocks import AxonSSMBlock, AxonSSMMoEBlock, AxonSWAMoEBlock
from bit_axon.loading import HF, HUB, hub_directory, load_model, load_tokenizer, model_source, save_model
from bit_axon.model import BitAxonModel
from bit_axon.porting_ssm import SSM_INITS, AttentionSSMFit, SourceCalibration, attention_to_ssm

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

# mlx-lm architecture modules whose layers this mapping knows (model_types that mlx-lm remaps to
# them, such as "mistral" -> llama, are accepted too).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
QWEN_MODEL_TYPES = ("qwen2",)
ROUTER_INIT_STD = 1e-3
# Token ids below this are ordinary text tokens in every Qwen2.5 vocabulary (specials start at 151643).
_CALIBRATION_ID_LIMIT = 151_643
# Copied from a Hugging Face source directory as they are (a GGUF's tokenizer is rebuilt and saved).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# Defaults of the source-sized architecture (module docstring, docs/porting.md).
DEFAULT_EXPERTS, DEFAULT_TOP_K = 4, 1
# Which Bit-Axon layers take a source layer (``layer_sources``).
DEPTH_MAPS = ("moe", "all")
DEFAULT_WINDOW, MAX_SEQ_LEN_CAP, FALLBACK_SEQ_LEN = 4096, 65_536, 4096


class UnsupportedSourceError(ValueError):
    """A source model of an architecture the port does not map; the message names it."""


@dataclass(frozen=True)
class SourceConfig:
    """The fields of a Llama / Qwen2 source model the port needs (from its mlx-lm ``ModelArgs``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool | None  # None: not stated; decided by whether lm_head.weight exists
    model_type: str = "qwen2"
    max_position_embeddings: int | None = None
    attention_bias: bool = False  # q/k/v (and for Llama o) biases present
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> SourceConfig:
        """From a Hugging Face / mlx-lm config dict (``config.json`` or ``ModelArgs``' fields)."""
        model_type = data.get("model_type")
        check_supported(model_type, where)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if data.get(k) is None]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        heads = data["num_attention_heads"]
        kv = data.get("num_key_value_heads") or heads
        if heads % kv:
            raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        qwen = architecture_of(model_type) == "qwen2"
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=data.get("head_dim") or data["hidden_size"] // heads,
            # GGUF stores the epsilon as float32 (1e-5 -> 9.99999975e-06): 6 significant digits undo that.
            rms_norm_eps=float(f"{data.get('rms_norm_eps', 1e-6):.6g}"),
            tie_word_embeddings=data.get("tie_word_embeddings"),
            model_type=model_type,
            max_position_embeddings=data.get("max_position_embeddings"),
            attention_bias=True if qwen else bool(data.get("attention_bias", False)),
            mlp_bias=bool(data.get("mlp_bias", False)),
        )

    @classmethod
    def load(cls, path: str | Path) -> SourceConfig:
        """From a Hugging Face directory's ``config.json``."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"No config.json in {path} (expected a Hugging Face checkpoint directory)")
        return cls.from_dict(json.loads(file.read_text()), str(file))

    @classmethod
    def from_model(cls, model: nn.Module, where: str) -> SourceConfig:
        """From a loaded mlx-lm model's ``args`` (its ModelArgs)."""
        args = getattr(model, "args", None)
        if args is None:
            raise UnsupportedSourceError(f"{where}: not an mlx-lm Llama/Qwen2 model (no ModelArgs)")
        data = {f.name: getattr(args, f.name) for f in fields(args)}
        return cls.from_dict(data, where)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def family(self) -> str:
        return architecture_of(self.model_type) or self.model_type


QwenConfig = SourceConfig  # the name of this class before the port took Llama checkpoints too


def architecture_of(model_type: str | None) -> str | None:
    """The mlx-lm architecture module name a ``model_type`` loads with (None: unknown to mlx-lm)."""
    if not isinstance(model_type, str):
        return None
    from mlx_lm.utils import MODEL_REMAPPING

    return MODEL_REMAPPING.get(model_type, model_type)


def check_supported(model_type: str | None, where: str) -> None:
    if architecture_of(model_type) not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedSourceError(
            f"{where}: model_type {model_type!r} is not supported by port-weights; supported: Llama and Qwen2 "
            f"families (model_type {', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)}, or one mlx-lm maps "
            "to them such as 'mistral')"
        )


@dataclass
class PortReport:
    """What the port did, written to ``porting.json`` next to the model."""

    source: str
    source_config: dict[str, Any]
    layer_sources: dict[int, int]  # Bit-Axon layer -> source layer
    attention_layout: str  # "head-split" or "flat"
    mlp_channels: str  # "all" or "top-F of I"
    calibration_rms: float
    expert_noise: float
    seed: int
    dtype: str
    ssm_init: str = "identity"
    depth: str = "moe"
    ssm_fits: dict[int, dict[str, Any]] = field(default_factory=dict)  # attention start: per SSM layer
    notes: list[str] = field(default_factory=list)


def default_config(source: SourceConfig) -> BitAxonConfig:
    """The Bit-Axon architecture sized from the source (module docstring)."""
    S, heads = source.hidden_size, source.num_attention_heads
    if S % heads:
        raise ValueError(
            f"the source's hidden size {S} is not divisible by its {heads} heads, so Bit-Axon's default "
            "num_heads cannot be the source's; pass --config with hidden_dim and num_heads"
        )
    max_seq = min(source.max_position_embeddings or FALLBACK_SEQ_LEN, MAX_SEQ_LEN_CAP)
    return BitAxonConfig(
        vocab_size=source.vocab_size,
        hidden_dim=S,
        num_layers=max(3, source.num_hidden_layers // 3 * 3),
        num_heads=heads,
        d_source_model=S,
        ssm_d_state=16,
        ssm_expand=max(1, -(-source.inner_dim // S)),
        swa_window_size=min(DEFAULT_WINDOW, max_seq),
        moe_num_experts=DEFAULT_EXPERTS,
        moe_top_k=DEFAULT_TOP_K,
        moe_intermediate_dim=source.intermediate_size,
        moe_shared_expert=False,
        max_seq_len=max_seq,
        rms_norm_eps=source.rms_norm_eps,
    )


def bitaxon_config_for(
    source: SourceConfig, base: BitAxonConfig | None = None, tied: bool | None = None
) -> BitAxonConfig:
    """``base`` (default: ``default_config(source)``, sized from the source) with the fields the source
    fixes: vocabulary, ``d_source_model`` (= its hidden size), RMSNorm epsilon and head tying."""
    base = base or default_config(source)
    if base.quantization is not None:
        raise ValueError("port into a float model; quantize it afterwards with `bit-axon quantize`")
    if tied is None:
        tied = source.tie_word_embeddings is not False
    return replace(
        base,
        vocab_size=source.vocab_size,
        d_source_model=source.hidden_size,
        rms_norm_eps=source.rms_norm_eps,
        weight_tying=tied,
    )


def _spread(targets: list[int], n_source: int) -> dict[int, int]:
    if len(targets) == 1:
        return {targets[0]: 0}
    return {i: math.floor(k * (n_source - 1) / (len(targets) - 1) + 0.5) for k, i in enumerate(targets)}


def layer_sources(config: BitAxonConfig, n_source: int, depth: str = "moe") -> dict[int, int]:
    """Bit-Axon layer -> source layer for the layers that receive source weights, evenly spaced over
    the source's layers: the MoE layers (zones 2 and 3) for ``depth="moe"``, every layer for "all"."""
    if depth not in DEPTH_MAPS:
        raise ValueError(f"depth must be one of {', '.join(DEPTH_MAPS)}, got {depth!r}")
    first = 0 if depth == "all" else config.zone_boundaries[0]
    return _spread(list(range(first, config.num_layers)), n_source)


def attention_index(q_heads: int, q_head_dim: int, heads: int, head_dim: int) -> tuple[np.ndarray, str]:
    """Bit-Axon attention coordinate of each source inner coordinate (-1: dropped), and the layout name."""
    per = -(-q_head_dim // head_dim)
    coords = np.arange(q_heads * q_head_dim)
    if q_heads * per <= heads:
        head, dim = np.divmod(coords, q_head_dim)
        return (head * per + dim // head_dim) * head_dim + dim % head_dim, "head-split"
    return np.where(coords < heads * head_dim, coords, -1), "flat"


def _prefix_index(n: int, limit: int) -> np.ndarray:
    """The identity-like map: coordinate c -> c while c < limit, else dropped."""
    coords = np.arange(n)
    return np.where(coords < limit, coords, -1)


def _place(target: np.ndarray, source: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``target[rows[i], cols[j]] = source[i, j]`` wherever both indices are >= 0."""
    r, c = np.nonzero(rows >= 0)[0], np.nonzero(cols >= 0)[0]
    target[np.ix_(rows[r], cols[c])] = source[np.ix_(r, c)]
    return target


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _norm_weight(g: np.ndarray, width: int, scale: float) -> mx.array:
    out = np.full(width, scale, dtype=np.float32)
    m = min(width, g.size)
    out[:m] = scale * g[:m]
    return mx.array(out)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order of a Llama q/k weight (or bias): back to HF order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Porter:
    def __init__(
        self,
        source: SourceConfig,
        weights: dict[str, mx.array],
        model: BitAxonModel,
        expert_noise: float,
        seed: int,
        interleaved_qk: bool = False,
    ):
        self.source = source
        self.weights = weights
        self.model = model
        self.config = model.config
        self.rng = np.random.default_rng(seed)
        self.expert_noise = expert_noise
        self.interleaved_qk = interleaved_qk
        S, H = source.hidden_size, self.config.hidden_dim
        self.residual_index = _prefix_index(S, H)  # source residual coordinate -> Bit-Axon residual coordinate
        self.norm_scale = math.sqrt(S / H) if H > S else 1.0
        self.inner, self.attention_layout = attention_index(
            source.num_attention_heads, source.head_dim, self.config.num_heads, self.config.head_dim
        )
        self.channels, self.mlp_channels = None, ""
        routed = self.config.moe_top_k / self.config.moe_num_experts
        self.moe_scale = 1.0 / ((0.5 if self.config.moe_shared_expert else 0.0) + routed)

    def get(self, key: str) -> np.ndarray:
        if key not in self.weights:
            raise ValueError(f"the source model has no tensor {key!r}")
        w = _np(self.weights[key])
        if self.interleaved_qk and key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = self.source.num_attention_heads if ".q_proj." in key else self.source.num_key_value_heads
            w = unpermute_rows(w, heads)
        return w

    def repeat_kv(self, w: np.ndarray) -> np.ndarray:
        """(kv_heads * head_dim, ...) -> (heads * head_dim, ...): query head h reads kv head h // group."""
        q = self.source
        group = q.num_attention_heads // q.num_key_value_heads
        heads = w.reshape(q.num_key_value_heads, q.head_dim, -1)
        return np.repeat(heads, group, axis=0).reshape(q.inner_dim, -1)

    def attention_weights(self, j: int) -> dict[str, np.ndarray]:
        """Layer j's q, k, v (k/v repeated to one head per query head) and o, in HF row order."""
        p = f"model.layers.{j}.self_attn."
        return {
            "q": self.get(p + "q_proj.weight"),
            "k": self.repeat_kv(self.get(p + "k_proj.weight")),
            "v": self.repeat_kv(self.get(p + "v_proj.weight")),
            "o": self.get(p + "o_proj.weight"),
        }

    def attention(self, block: AxonSWAMoEBlock, j: int) -> None:
        H = self.config.hidden_dim
        w = self.attention_weights(j)
        attn = block.attention
        wq = _place(np.zeros((H, H), np.float32), w["q"], self.inner, self.residual_index)
        wk = _place(_np(attn.k_proj.weight), w["k"], self.inner, self.residual_index)
        wv = _place(_np(attn.v_proj.weight), w["v"], self.inner, self.residual_index)
        wo = _place(np.zeros((H, H), np.float32), w["o"], self.residual_index, self.inner)
        attn.q_proj.weight, attn.k_proj.weight = mx.array(wq), mx.array(wk)
        attn.v_proj.weight, attn.o_proj.weight = mx.array(wv), mx.array(wo)
        block.input_norm.weight = self.norm(f"model.layers.{j}.input_layernorm.weight")

    def norm(self, key: str) -> mx.array:
        return _norm_weight(self.get(key), self.config.hidden_dim, self.norm_scale)

    def _select_channels(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
        inter, F = gate.shape[0], self.config.moe_intermediate_dim
        if inter <= F:
            self.mlp_channels = "all"
            return np.arange(inter)
        self.mlp_channels = f"top-{F} of {inter}"
        score = np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=0)
        keep = np.sort(np.argsort(-score, kind="stable")[:F])
        index = np.full(inter, -1)
        index[keep] = np.arange(F)
        return index

    def moe(self, block: AxonSWAMoEBlock | AxonSSMMoEBlock, j: int) -> None:
        p = f"model.layers.{j}.mlp."
        gate, up, down = (self.get(p + f"{n}_proj.weight") for n in ("gate", "up", "down"))
        channels = self._select_channels(gate, up, down)
        moe, H, F = block.moe, self.config.hidden_dim, self.config.moe_intermediate_dim
        down = down * self.moe_scale

        def expert(fresh_gate: np.ndarray, fresh_up: np.ndarray, noise: float) -> tuple[np.ndarray, ...]:
            g = _place(fresh_gate, gate, channels, self.residual_index)
            u = _place(fresh_up, up, channels, self.residual_index)
            d = _place(np.zeros((H, F), np.float32), down, self.residual_index, channels)
            if noise:
                g, u, d = (w * (1 + noise * self.rng.standard_normal(w.shape, dtype=np.float32)) for w in (g, u, d))
            return g, u, d

        if self.config.moe_shared_expert:
            shared = moe.shared_expert
            g, u, d = expert(_np(shared.gate_proj.weight), _np(shared.up_proj.weight), 0.0)
            shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight = map(mx.array, (g, u, d))
            moe.shared_expert_gate.weight = mx.zeros((1, H))
        mlp = moe.switch_mlp
        fresh_g, fresh_u = _np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)
        stacked = [expert(fresh_g[e], fresh_u[e], self.expert_noise) for e in range(self.config.moe_num_experts)]
        mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight = (
            mx.array(np.stack(ws)) for ws in zip(*stacked, strict=True)
        )
        router = self.rng.normal(0, ROUTER_INIT_STD, (self.config.moe_num_experts, H))
        moe.gate.weight = mx.array(router.astype(np.float32))
        post = f"model.layers.{j}.post_attention_layernorm.weight"
        if isinstance(block, AxonSWAMoEBlock):
            block.post_attention_norm.weight = self.norm(post)
        else:
            block.post_ssm_norm.weight = self.norm(post)

    def ssm_from_attention(self, block: AxonSSMBlock, j: int, calibration: SourceCalibration) -> AttentionSSMFit:
        block.input_norm.weight = self.norm(f"model.layers.{j}.input_layernorm.weight")
        return attention_to_ssm(
            block.ssm, self.attention_weights(j), self.source, calibration, self.residual_index, self.rng, j
        )


def _new_ssm_is_identity(block: AxonSSMBlock | AxonSSMMoEBlock) -> None:
    block.ssm.out_proj.weight = mx.zeros_like(block.ssm.out_proj.weight)


def calibration_ids(config: BitAxonConfig, n: int, seed: int) -> mx.array:
    """The (1, n) random text-token ids the final-norm calibration runs on."""
    high = min(config.vocab_size, _CALIBRATION_ID_LIMIT)
    return mx.random.randint(0, high, (1, n), key=mx.random.key(seed))


def _typical_rms(x: mx.array, width: int) -> float:
    """Median over tokens of the RMS of the first ``width`` coordinates.

    The median, because a few tokens (the attention-sink first token) can have hidden states far
    larger than the rest; dividing by their RMS would shrink every other token's logits.
    """
    rms = mx.sqrt(mx.mean(mx.square(x[..., :width].astype(mx.float32)), axis=-1))
    return float(np.median(np.array(rms)))


@dataclass
class LoadedSource:
    """A source model read through our loader: its config, float weights (mlx-lm names), origin."""

    model: nn.Module
    config: SourceConfig
    weights: dict[str, mx.array]
    path: str
    kind: str  # loading.model_source: "hf", "gguf", "hub"
    quantized: bool
    interleaved_qk: bool


def read_source(path: str | Path) -> LoadedSource:
    """Load a Llama / Qwen2 model with ``bit_axon.loading.load_model`` and dequantize it."""
    from bit_axon.quantization import dequantize_model
    from bit_axon.quantization.model import layer_quantization

    given = str(path)
    kind = model_source(path)
    if kind == HF or kind == "bit-axon":
        file = Path(path) / "config.json"
        data = json.loads(file.read_text())
        check_supported(data.get("model_type"), str(file))  # before the (possibly long) load
    model = load_model(path)
    source = SourceConfig.from_model(model, given)
    quantized = bool(layer_quantization(model))
    if quantized:
        dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    # The loader runs a GGUF Llama with traditional RoPE because llama.cpp permuted its q/k rows.
    interleaved = source.family == "llama" and bool(getattr(model.args, "rope_traditional", False))
    return LoadedSource(model, source, weights, given, kind, quantized, interleaved)


def port_model(
    source_path: str | Path,
    config: BitAxonConfig | None = None,
    *,
    ssm_init: str = "identity",
    depth: str = "moe",
    expert_noise: float = 0.01,
    seed: int = 0,
    calibration_tokens: int = 64,
    ssm_calibration_tokens: int = 2048,
    dtype: mx.Dtype | None = None,
    loaded: LoadedSource | None = None,
) -> tuple[BitAxonModel, PortReport]:
    """A Bit-Axon model initialised from the Llama / Qwen2 model at ``source_path`` (module docstring).

    ``config`` gives the architecture (default: sized from the source, ``default_config``); its
    vocabulary, ``d_source_model``, ``rms_norm_eps`` and ``weight_tying`` are taken from the source.
    ``ssm_init`` is ``"attention"`` (default: on SmolLM2 its step-0 KL to the source is 0.8-0.9 nats
    below the identity start's, docs/porting.md) or ``"identity"``; ``depth`` is ``"moe"`` or ``"all"``
    (``layer_sources``). ``dtype`` is the weights' dtype (default: the
    source's float dtype; float32 for a quantized source). Work happens in float32 one layer at a
    time. ``seed`` seeds MLX's global generator (new weights), the expert noise, router init and the
    calibration tokens. ``loaded`` reuses a ``read_source`` result (ports of one source in one process).
    """
    if ssm_init not in SSM_INITS:
        raise ValueError(f"ssm_init must be one of {', '.join(SSM_INITS)}, got {ssm_init!r}")
    if expert_noise < 0:
        raise ValueError(f"expert_noise must be >= 0, got {expert_noise}")
    if calibration_tokens < 1:
        raise ValueError(f"calibration_tokens must be >= 1, got {calibration_tokens}")
    if ssm_calibration_tokens < 64:
        raise ValueError(f"ssm_calibration_tokens must be >= 64, got {ssm_calibration_tokens}")
    src = loaded if loaded is not None else read_source(source_path)
    source, weights = src.config, src.weights
    embed = weights.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{src.path}: the model has no model.embed_tokens.weight")
    if tuple(embed.shape) != (source.vocab_size, source.hidden_size):
        raise ValueError(
            f"{src.path}: embedding shape {tuple(embed.shape)} != (vocab_size, hidden_size) "
            f"{(source.vocab_size, source.hidden_size)} of its config"
        )
    tied = "lm_head.weight" not in weights
    config = bitaxon_config_for(source, config, tied=tied)
    if dtype is None:
        dtype = mx.float32 if src.quantized else embed.dtype

    mx.random.seed(seed)
    model = BitAxonModel(config)
    porter = _Porter(source, weights, model, expert_noise, seed, interleaved_qk=src.interleaved_qk)
    S, H = source.hidden_size, config.hidden_dim
    width = min(S, H)

    model.embed_tokens.weight = embed.astype(mx.float32)
    p = _place(np.zeros((H, S), np.float32), np.eye(S, dtype=np.float32), porter.residual_index, np.arange(S))
    model.input_proj.weight = mx.array(p)
    ids = calibration_ids(config, calibration_tokens, seed)
    x = model.input_proj(model.embed_tokens(ids))
    mx.eval(x)
    _finish(model.embed_tokens, dtype)
    _finish(model.input_proj, dtype)

    if depth not in DEPTH_MAPS:
        raise ValueError(f"depth must be one of {', '.join(DEPTH_MAPS)}, got {depth!r}")
    if depth == "all" and ssm_init == "identity":
        raise ValueError("depth 'all' gives zone 1's SSM layers a source attention: use it with ssm_init 'attention'")
    sources = layer_sources(config, source.num_hidden_layers, depth)
    fits: dict[int, AttentionSSMFit] = {}
    if ssm_init == "attention":
        calibration = SourceCalibration(src.model, ssm_calibration_tokens, seed, config.vocab_size)
        ssm_layers = {
            i: j for i, j in sources.items() if isinstance(model.blocks[i], (AxonSSMBlock, AxonSSMMoEBlock))
        }
        # The source is run once, layer by layer; each SSM is fitted when its source layer comes.
        for j in calibration.layers(sorted(set(ssm_layers.values()))):
            for i in (i for i, k in ssm_layers.items() if k == j):
                fits[i] = porter.ssm_from_attention(model.blocks[i], j, calibration)
                mx.eval(model.blocks[i].parameters())
    for i, block in enumerate(model.blocks):
        if isinstance(block, (AxonSSMBlock, AxonSSMMoEBlock)) and i not in fits:
            _new_ssm_is_identity(block)
        if isinstance(block, AxonSWAMoEBlock):
            porter.attention(block, sources[i])
        if i in sources and isinstance(block, (AxonSWAMoEBlock, AxonSSMMoEBlock)):
            porter.moe(block, sources[i])
        x = block(x)  # calibration pass: this block in float32, before casting it
        mx.eval(x)
        _finish(block, dtype)

    rms = _typical_rms(x, width)
    final = porter.get("model.norm.weight")
    out = np.zeros((S, H), np.float32)
    out[np.arange(width), np.arange(width)] = final[:width] / rms
    model.output_proj.weight = mx.array(out)
    _finish(model.output_proj, dtype)
    if not tied:
        model.lm_head.weight = weights["lm_head.weight"].astype(mx.float32)
        _finish(model.lm_head, dtype)

    notes = ["RoPE not reproduced (no positional encoding)"]
    if source.attention_bias:
        notes.append("attention biases dropped (Bit-Axon attention has no biases)")
    if source.mlp_bias:
        notes.append("MLP biases dropped (Bit-Axon experts have no biases)")
    if src.quantized:
        notes.append("quantized source layers dequantized to float32 before copying")
    if src.interleaved_qk:
        notes.append("GGUF q/k rows put back from llama.cpp's interleaved-RoPE order")
    if H < S:
        notes.append(f"hidden_dim {H} < source hidden size {S}: only the first {H} residual coordinates are kept")
    if source.num_hidden_layers < len(sources):
        notes.append(f"{len(sources)} Bit-Axon layers take {source.num_hidden_layers} source layers: some repeat")
    report = PortReport(
        source=str(Path(src.path).resolve()) if Path(src.path).exists() else src.path,
        source_config=asdict(source),
        layer_sources=sources,
        attention_layout=porter.attention_layout,
        mlp_channels=porter.mlp_channels,
        calibration_rms=rms,
        expert_noise=expert_noise,
        seed=seed,
        dtype=str(dtype).removeprefix("mlx.core."),
        ssm_init=ssm_init,
        depth=depth,
        ssm_fits={i: asdict(fit) for i, fit in sorted(fits.items())},
        notes=notes,
    )
    return model, report


def port_qwen(
    qwen_dir: str | Path, config: BitAxonConfig | None = None, **options: Any
) -> tuple[BitAxonModel, PortReport]:
    """``port_model`` for a Qwen2/Qwen2.5 directory (the name this function had first)."""
    if not Path(qwen_dir).is_dir():
        raise FileNotFoundError(f"Qwen checkpoint directory not found: {qwen_dir}")
    return port_model(qwen_dir, config, **options)


def _finish(module: nn.Module, dtype: mx.Dtype) -> None:
    module.set_dtype(dtype)
    mx.eval(module.parameters())


def write_tokenizer(src: LoadedSource, output_dir: Path) -> list[str]:
    """The source's tokenizer into ``output_dir``: a Hugging Face directory's files copied as they are,
    a GGUF file's tokenizer rebuilt from its metadata and saved (tokenizer.json + tokenizer_config.json
    with the chat template and special tokens). Returns the file names written."""
    directory = None
    if src.kind == HF:
        directory = Path(src.path)
    elif src.kind == HUB:
        directory = hub_directory(src.path)
    if directory is not None:
        written = []
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, output_dir / name)
                written.append(name)
        return written
    load_tokenizer(src.path).save(output_dir)
    return ["tokenizer.json", "tokenizer_config.json"]


def port_weights(
    source_path: str | Path, output_dir: str | Path, config: BitAxonConfig | None = None, **options: Any
) -> Path:
    """``port_model`` and save: a model directory (``config.json`` + ``model.safetensors``) with
    ``porting.json`` (the report) and the source's tokenizer files. ``output_dir`` must not exist yet
    or be empty."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"Output directory {output_dir} already exists and is not empty")
    loaded = options.pop("loaded", None) or read_source(source_path)
    model, report = port_model(source_path, config, loaded=loaded, **options)
    save_model(model, output_dir)
    atomic_write_text(output_dir / "porting.json", json.dumps(asdict(report), indent=2) + "\n")
    write_tokenizer(loaded, output_dir)
    return output_dir
