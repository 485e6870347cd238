"""Bit-Axon: a hybrid SSM / sliding-window attention / MoE language model and its fine-tuning pipeline."""

from bit_axon.blas import load_fast_blas

# Must run before mlx.core is first imported anywhere (see bit_axon.blas).
load_fast_blas()

from bit_axon.config import BitAxonConfig  # noqa: E402
from bit_axon.model import BitAxonModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BitAxonConfig", "BitAxonModel", "__version__"]
