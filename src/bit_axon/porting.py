"""Base weights from Qwen2.5: a Bit-Axon model initialised from a local Qwen2.5 checkpoint.

Bit-Axon shares Qwen2.5's vocabulary and uses its hidden size as ``d_source_model``, so the
embedding (and tied head) carry over unchanged. The layers differ (SSM / attention+MoE / SSM+MoE,
no RoPE, no biases, no final norm, another width and depth), so the rest is a mapping, chosen so
that at initialisation the Bit-Axon model computes, as nearly as its structure allows, a Qwen
network with some of its layers dropped:

* Width. Qwen's residual stream (S = its hidden size) is embedded into Bit-Axon's (H = hidden_dim)
  by the identity-like map P = [I; 0] (H > S: extra coordinates start at zero; H < S: the first H
  coordinates are kept). ``input_proj = P``; every copied weight is placed through P.
* Depth. Only the MoE layers (zones 2 and 3) receive Qwen weights. The k-th of them takes Qwen layer
  round(k * (n_qwen - 1) / (n_ported - 1)): evenly spaced, first and last Qwen layers included.
* SSM mixers (all of zone 1, and zone 3's) are new: Mamba's default init, except ``out_proj = 0``,
  so each starts as the identity (its residual adds nothing) and the ported layers see Qwen-like
  inputs from step 0. ``out_proj`` gets gradients at once, the rest of the mixer a step later.
* Attention (zone 2): Qwen's q/k/v/o, GQA k/v heads repeated to one per query head. Each Qwen head
  (head_dim_q) is split over ceil(head_dim_q / head_dim) consecutive Bit-Axon heads when they fit
  (e.g. 16 x 128 -> 32 x 80: dims 0-79 and 80-127 of a Qwen head become two heads), else Qwen's
  inner coordinates are laid out flat. Not reproduced: RoPE (Bit-Axon has no positional encoding),
  the q and v biases (Bit-Axon has none; the k bias adds a per-query constant to every score, so
  dropping it changes nothing), and each split head's softmax, taken over a part of the dot product.
  Unused inner coordinates get q = 0 and o = 0 with k, v random, so they contribute nothing yet learn.
* MLP -> MoE (zones 2 and 3): gate/up/down go into the shared expert and, with multiplicative noise
  (``expert_noise``, so experts can diverge), into every routed expert. With F = moe_intermediate_dim
  < Qwen's intermediate size, the F channels with the largest ||gate_j||·||up_j||·||down_j|| are
  kept; with F larger, extra channels get random gate/up and zero down. The router starts nearly
  uniform (N(0, 1e-3)) and ``shared_expert_gate`` at 0 (sigmoid 0.5), so the MoE output is about
  (0.5 + top_k / experts) times one expert's; the copied down_proj weights are divided by that.
* Norms: Qwen's RMSNorm weights, times sqrt(S / H) when H > S (the zero extra coordinates shrink the
  RMS by that factor). input_layernorm -> ``input_norm`` of attention layers; post_attention_layernorm
  -> ``post_attention_norm`` / ``post_ssm_norm``; new SSM blocks' ``input_norm`` = 1.
* Final norm: Bit-Axon has none. Qwen's final norm weight is folded into ``output_proj = diag(g / r)
  P^T``, where r is the median RMS of the last hidden states over ``calibration_tokens`` random
  tokens, measured on the ported model itself.
* Head: tied to the embedding when Qwen ties it (3B and smaller), else Qwen's ``lm_head`` copied.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bit_axon.config import BitAxonConfig
from bit_axon.io import atomic_write_text
from bit_axon.layers.blocks import AxonSSMBlock, AxonSSMMoEBlock, AxonSWAMoEBlock
from bit_axon.loading import load_weights, save_model
from bit_axon.model import BitAxonModel

import mlx.core as mx
import numpy as np

QWEN_MODEL_TYPES = ("qwen2",)
ROUTER_INIT_STD = 1e-3
# Token ids below this are ordinary text tokens in every Qwen2.5 vocabulary (specials start at 151643).
_CALIBRATION_ID_LIMIT = 151_643
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class QwenConfig:
    """The fields of a Hugging Face Qwen2 ``config.json`` the port needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool | None  # None: not stated; decided by whether lm_head.weight exists

    @classmethod
    def load(cls, path: str | Path) -> QwenConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"No config.json in {path} (expected a Hugging Face Qwen2.5 checkpoint directory)"
            )
        data = json.loads(file.read_text())
        if data.get("model_type") not in QWEN_MODEL_TYPES:
            raise ValueError(
                f"{file}: model_type {data.get('model_type')!r} is not a Qwen2/Qwen2.5 checkpoint (expected 'qwen2')"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{file} lacks {', '.join(missing)}")
        heads = data["num_attention_heads"]
        config = cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=data.get("num_key_value_heads", heads),
            head_dim=data.get("head_dim") or data["hidden_size"] // heads,
            rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=data.get("tie_word_embeddings"),
        )
        if heads % config.num_key_value_heads:
            raise ValueError(f"{file}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
        return config

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.head_dim


@dataclass
class PortReport:
    """What the port did, written to ``porting.json`` next to the model."""

    source: str
    qwen_config: dict[str, Any]
    layer_sources: dict[int, int]  # Bit-Axon layer -> Qwen layer
    attention_layout: str  # "head-split" or "flat"
    mlp_channels: str  # "all" or "top-F of I"
    calibration_rms: float
    expert_noise: float
    seed: int
    dtype: str
    notes: list[str] = field(default_factory=list)


def bitaxon_config_for(qwen: QwenConfig, base: BitAxonConfig | None = None, tied: bool = True) -> BitAxonConfig:
    """``base`` (default: the full ``BitAxonConfig()``) with the fields the Qwen checkpoint fixes:
    vocabulary, ``d_source_model`` (= Qwen's hidden size), RMSNorm epsilon and head tying."""
    base = base or BitAxonConfig()
    if base.quantization is not None:
        raise ValueError("port into a float model; quantize it afterwards with `bit-axon quantize`")
    return replace(
        base,
        vocab_size=qwen.vocab_size,
        d_source_model=qwen.hidden_size,
        rms_norm_eps=qwen.rms_norm_eps,
        weight_tying=tied,
    )


def layer_sources(config: BitAxonConfig, n_qwen: int) -> dict[int, int]:
    """Bit-Axon layer -> Qwen layer for the layers that receive Qwen weights (zones 2 and 3)."""
    ported = list(range(config.zone_boundaries[0], config.num_layers))
    if len(ported) == 1:
        return {ported[0]: 0}
    return {i: math.floor(k * (n_qwen - 1) / (len(ported) - 1) + 0.5) for k, i in enumerate(ported)}


def attention_index(q_heads: int, q_head_dim: int, heads: int, head_dim: int) -> tuple[np.ndarray, str]:
    """Bit-Axon attention coordinate of each Qwen inner coordinate (-1: dropped), and the layout name."""
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


class _Porter:
    def __init__(
        self, qwen: QwenConfig, weights: dict[str, mx.array], model: BitAxonModel, expert_noise: float, seed: int
    ):
        self.qwen = qwen
        self.weights = weights
        self.model = model
        self.config = model.config
        self.rng = np.random.default_rng(seed)
        self.expert_noise = expert_noise
        S, H = qwen.hidden_size, self.config.hidden_dim
        self.residual_index = _prefix_index(S, H)  # Qwen residual coordinate -> Bit-Axon residual coordinate
        self.norm_scale = math.sqrt(S / H) if H > S else 1.0
        self.inner, self.attention_layout = attention_index(
            qwen.num_attention_heads, qwen.head_dim, self.config.num_heads, self.config.head_dim
        )
        self.channels, self.mlp_channels = None, ""
        routed = self.config.moe_top_k / self.config.moe_num_experts
        self.moe_scale = 1.0 / ((0.5 if self.config.moe_shared_expert else 0.0) + routed)

    def get(self, key: str) -> np.ndarray:
        if key not in self.weights:
            raise ValueError(f"Qwen checkpoint has no tensor {key!r}")
        return _np(self.weights[key])

    def attention(self, block: AxonSWAMoEBlock, j: int) -> None:
        q, H = self.qwen, self.config.hidden_dim
        p = f"model.layers.{j}.self_attn."
        group = q.num_attention_heads // q.num_key_value_heads

        def repeat_kv(w: np.ndarray) -> np.ndarray:
            # Query head h reads kv head h // group.
            heads = w.reshape(q.num_key_value_heads, q.head_dim, -1)
            return np.repeat(heads, group, axis=0).reshape(q.inner_dim, -1)

        attn = block.attention
        wq = _place(np.zeros((H, H), np.float32), self.get(p + "q_proj.weight"), self.inner, self.residual_index)
        wk = _place(_np(attn.k_proj.weight), repeat_kv(self.get(p + "k_proj.weight")), self.inner, self.residual_index)
        wv = _place(_np(attn.v_proj.weight), repeat_kv(self.get(p + "v_proj.weight")), self.inner, self.residual_index)
        wo = _place(np.zeros((H, H), np.float32), self.get(p + "o_proj.weight"), self.residual_index, self.inner)
        attn.q_proj.weight, attn.k_proj.weight = mx.array(wq), mx.array(wk)
        attn.v_proj.weight, attn.o_proj.weight = mx.array(wv), mx.array(wo)
        block.input_norm.weight = self._norm(f"model.layers.{j}.input_layernorm.weight")

    def _norm(self, key: str) -> mx.array:
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
            block.post_attention_norm.weight = self._norm(post)
        else:
            block.post_ssm_norm.weight = self._norm(post)


def _new_ssm_is_identity(block: AxonSSMBlock | AxonSSMMoEBlock) -> None:
    block.ssm.out_proj.weight = mx.zeros_like(block.ssm.out_proj.weight)


def calibration_ids(config: BitAxonConfig, n: int, seed: int) -> mx.array:
    """The (1, n) random text-token ids the final-norm calibration runs on."""
    high = min(config.vocab_size, _CALIBRATION_ID_LIMIT)
    return mx.random.randint(0, high, (1, n), key=mx.random.key(seed))


def _typical_rms(x: mx.array, width: int) -> float:
    """Median over tokens of the RMS of the first ``width`` coordinates.

    The median, because a few tokens (Qwen's attention-sink first token) can have hidden states
    far larger than the rest; dividing by their RMS would shrink every other token's logits.
    """
    rms = mx.sqrt(mx.mean(mx.square(x[..., :width].astype(mx.float32)), axis=-1))
    return float(np.median(np.array(rms)))


def port_qwen(
    qwen_dir: str | Path,
    config: BitAxonConfig | None = None,
    *,
    expert_noise: float = 0.01,
    seed: int = 0,
    calibration_tokens: int = 64,
    dtype: mx.Dtype | None = None,
) -> tuple[BitAxonModel, PortReport]:
    """A Bit-Axon model initialised from the Qwen2/Qwen2.5 checkpoint in ``qwen_dir`` (module docstring).

    ``config`` gives the architecture (default ``BitAxonConfig()``); its vocabulary, ``d_source_model``,
    ``rms_norm_eps`` and ``weight_tying`` are taken from the checkpoint. ``dtype`` is the weights'
    dtype (default: the checkpoint's). Work happens in float32 one layer at a time. ``seed`` seeds
    MLX's global generator (new weights) and the expert noise and router init.
    """
    qwen_dir = Path(qwen_dir)
    if not qwen_dir.is_dir():
        raise FileNotFoundError(f"Qwen checkpoint directory not found: {qwen_dir}")
    if expert_noise < 0:
        raise ValueError(f"expert_noise must be >= 0, got {expert_noise}")
    if calibration_tokens < 1:
        raise ValueError(f"calibration_tokens must be >= 1, got {calibration_tokens}")
    qwen = QwenConfig.load(qwen_dir)
    weights = load_weights(qwen_dir)
    embed = weights.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{qwen_dir}: no model.embed_tokens.weight in its safetensors files")
    if tuple(embed.shape) != (qwen.vocab_size, qwen.hidden_size):
        raise ValueError(
            f"{qwen_dir}: embedding shape {tuple(embed.shape)} != (vocab_size, hidden_size) "
            f"{(qwen.vocab_size, qwen.hidden_size)} of its config.json"
        )
    tied = qwen.tie_word_embeddings if qwen.tie_word_embeddings is not None else "lm_head.weight" not in weights
    if not tied and "lm_head.weight" not in weights:
        raise ValueError(f"{qwen_dir}: config.json says the head is untied but there is no lm_head.weight")
    config = bitaxon_config_for(qwen, config, tied=tied)
    if dtype is None:
        dtype = embed.dtype

    mx.random.seed(seed)
    model = BitAxonModel(config)
    porter = _Porter(qwen, weights, model, expert_noise, seed)
    S, H = qwen.hidden_size, config.hidden_dim
    width = min(S, H)

    model.embed_tokens.weight = embed.astype(mx.float32)
    p = _place(np.zeros((H, S), np.float32), np.eye(S, dtype=np.float32), porter.residual_index, np.arange(S))
    model.input_proj.weight = mx.array(p)
    ids = calibration_ids(config, calibration_tokens, seed)
    x = model.input_proj(model.embed_tokens(ids))
    mx.eval(x)
    _finish(model.embed_tokens, dtype)
    _finish(model.input_proj, dtype)

    sources = layer_sources(config, qwen.num_hidden_layers)
    for i, block in enumerate(model.blocks):
        if isinstance(block, (AxonSSMBlock, AxonSSMMoEBlock)):
            _new_ssm_is_identity(block)
        if isinstance(block, AxonSWAMoEBlock):
            porter.attention(block, sources[i])
        if i in sources:
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
        model.lm_head.weight = weights["lm_head.weight"]
        _finish(model.lm_head, dtype)

    notes = [
        "q and v biases dropped (Bit-Axon attention has no biases)",
        "RoPE not reproduced (no positional encoding)",
    ]
    if H < S:
        notes.append(f"hidden_dim {H} < Qwen hidden size {S}: only the first {H} residual coordinates are kept")
    report = PortReport(
        source=str(qwen_dir.resolve()),
        qwen_config=asdict(qwen),
        layer_sources=sources,
        attention_layout=porter.attention_layout,
        mlp_channels=porter.mlp_channels,
        calibration_rms=rms,
        expert_noise=expert_noise,
        seed=seed,
        dtype=str(dtype).removeprefix("mlx.core."),
        notes=notes,
    )
    return model, report


def _finish(module, dtype: mx.Dtype) -> None:
    module.set_dtype(dtype)
    mx.eval(module.parameters())


def port_weights(
    qwen_dir: str | Path, output_dir: str | Path, config: BitAxonConfig | None = None, **options: Any
) -> Path:
    """``port_qwen`` and save: a model directory (``config.json`` + ``model.safetensors``) with
    ``porting.json`` (the report) and the checkpoint's tokenizer files. ``output_dir`` must not
    exist yet or be empty."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"Output directory {output_dir} already exists and is not empty")
    model, report = port_qwen(qwen_dir, config, **options)
    save_model(model, output_dir)
    atomic_write_text(output_dir / "porting.json", json.dumps(asdict(report), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        source = Path(qwen_dir) / name
        if source.is_file():
            shutil.copyfile(source, output_dir / name)
    return output_dir
