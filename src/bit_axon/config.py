"""Model configuration: the fields, defaults and derived sizes of the Bit-Axon architecture (README, "The model")."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bit_axon.io import atomic_write_text


@dataclass
class BitAxonConfig:
    vocab_size: int = 151_936
    hidden_dim: int = 2_560
    num_layers: int = 24
    num_heads: int = 32
    d_source_model: int = 2_048
    ssm_d_state: int = 16
    ssm_d_conv: int = 4
    ssm_expand: int = 3
    ssm_dt_rank: int = 1
    swa_window_size: int = 4_096
    moe_num_experts: int = 8
    moe_top_k: int = 2
    moe_intermediate_dim: int = 4_096
    moe_shared_expert: bool = True
    weight_tying: bool = True
    max_seq_len: int = 65_536
    rms_norm_eps: float = 1e-6
    # Set when the base weights are stored quantized: {"mode": "nf4"|"affine", "bits": 4, "group_size": 64}.
    quantization: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def ssm_intermediate_dim(self) -> int:
        return self.hidden_dim * self.ssm_expand

    @property
    def zone_boundaries(self) -> tuple[int, int]:
        """First layer of zone 2 and of zone 3 (zone 1 starts at 0)."""
        return self.num_layers // 3, 2 * self.num_layers // 3

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_dim", "num_layers", "num_heads", "d_source_model", "ssm_d_state",
            "ssm_d_conv", "ssm_expand", "ssm_dt_rank", "swa_window_size", "moe_num_experts",
            "moe_top_k", "moe_intermediate_dim", "max_seq_len",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BitAxonConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_layers < 3:
            raise ValueError(f"num_layers must be at least 3 (one per sandwich zone), got {self.num_layers}")
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(
                f"moe_top_k ({self.moe_top_k}) cannot exceed moe_num_experts ({self.moe_num_experts})"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @classmethod
    def small(cls, **overrides: Any) -> BitAxonConfig:
        """A configuration for tests and demos; its vocabulary still covers the Qwen2.5 tokenizer."""
        values: dict[str, Any] = dict(
            hidden_dim=256, num_layers=4, num_heads=4, d_source_model=128, max_seq_len=2048,
            ssm_d_state=4, ssm_expand=2, swa_window_size=64,
            moe_num_experts=4, moe_top_k=2, moe_intermediate_dim=512,
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["quantization"] is None:
            del data["quantization"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitAxonConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"Unknown BitAxonConfig fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` (``path`` is the file or the model directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        data = {"model_type": "bit_axon", **self.to_dict()}
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BitAxonConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"No config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)
