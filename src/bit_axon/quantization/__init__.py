"""Quantized base weights: true 4-bit NF4 (QLoRA) or MLX's native affine quantization.

``quantize_model`` is the one entry point (:mod:`~bit_axon.quantization.model`). The modules:

- ``base``: the one interface every base layer type meets (dimensions, dequantize, matmul, the
  fused head's row dequantizer) and the registries of layer types and formats;
- ``nf4``: :class:`NF4Linear`, :class:`NF4SwitchLinear` (MoE experts), :class:`NF4Embedding` (its
  ``as_linear`` is the tied head). 4-bit only;
- ``affine``: :class:`QuantizedLinear`, :class:`QuantizedSwitchLinear` (``mx.gather_qmm``),
  :class:`QuantizedEmbedding`, thin subclasses of MLX's layers; 2, 3, 4, 5, 6 or 8 bits;
- ``codes``: the formats' (de)quantization with MLX ops; ``cpu_kernels``: its compiled CPU version;
- ``fast_path``: dequantize-then-BLAS matmuls on the CPU, for any format.

The default is NF4, chosen on ``bench/quant_error.py``'s 4-bit reconstruction error: about equal
to affine's on Gaussian weights at lower storage, lower on heavy-tailed weights (bench/README.md).
Speed depends on the backend: affine uses MLX's fused quantized-matmul kernels on Metal and CUDA,
NF4 dequantizes and then runs an ordinary matmul; on the CPU both dequantize one layer into a float
matmul for inputs of a few rows or more (``fast_path``; ``BIT_AXON_CPU_DEQUANT=0`` restores MLX's
native kernels).

A new format is one module: its layer classes, a :class:`~bit_axon.quantization.base.BaseLayer`
registered for each (``register``) and a ``QuantFormat`` (``register_format``), imported in
``model``.
"""

from bit_axon.quantization import fast_path
from bit_axon.quantization.affine import (
    AFFINE_BITS,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedSwitchLinear,
)
from bit_axon.quantization.base import (
    BaseLayer,
    base_layer,
    dense_weight,
    is_linear_base,
    is_quantized,
    linear_dims,
    linear_matmul,
    linear_matmul_and_weight,
    quantize_like,
)
from bit_axon.quantization.model import (
    DEFAULT_MODE,
    GROUP_SIZES,
    QUANT_MODES,
    ROUTER_NAMES,
    SPEC_FIELDS,
    adopt_quantized,
    base_quantization,
    dequantize_model,
    layer_quantization,
    quantization_spec,
    quantize_model,
    summarize_quantization,
)
from bit_axon.quantization.nf4 import (
    NF4_CODEBOOK,
    NF4Embedding,
    NF4Linear,
    NF4SwitchLinear,
    nf4_dequantize,
    nf4_quantize,
)

__all__ = [
    "AFFINE_BITS",
    "DEFAULT_MODE",
    "GROUP_SIZES",
    "NF4_CODEBOOK",
    "QUANT_MODES",
    "ROUTER_NAMES",
    "SPEC_FIELDS",
    "BaseLayer",
    "NF4Embedding",
    "NF4Linear",
    "NF4SwitchLinear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedSwitchLinear",
    "adopt_quantized",
    "base_layer",
    "base_quantization",
    "dense_weight",
    "dequantize_model",
    "fast_path",
    "is_linear_base",
    "is_quantized",
    "layer_quantization",
    "linear_matmul",
    "linear_matmul_and_weight",
    "linear_dims",
    "nf4_dequantize",
    "nf4_quantize",
    "quantization_spec",
    "quantize_like",
    "quantize_model",
    "summarize_quantization",
]
