from bit_axon.layers.attention import SlidingWindowAttention, sliding_window_mask
from bit_axon.layers.blocks import AxonSSMBlock, AxonSSMMoEBlock, AxonSWAMoEBlock
from bit_axon.layers.moe import SharedExpertMoE, SwiGLU, SwitchGLU, SwitchLinear
from bit_axon.layers.scan import selective_scan, sequential_scan
from bit_axon.layers.ssm import AxonSSM

from mlx.nn import RMSNorm

__all__ = [
    "AxonSSM",
    "AxonSSMBlock",
    "AxonSSMMoEBlock",
    "AxonSWAMoEBlock",
    "RMSNorm",
    "SharedExpertMoE",
    "SlidingWindowAttention",
    "SwiGLU",
    "SwitchGLU",
    "SwitchLinear",
    "selective_scan",
    "sequential_scan",
    "sliding_window_mask",
]
