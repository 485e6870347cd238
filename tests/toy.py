"""Tiny models and toy data shared by the trainer tests."""

from __future__ import annotations

from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.training.config import TrainingConfig
from bit_axon.training.lora import apply_lora_to_model

import mlx.core as mx
import numpy as np

VOCAB = 40
PAD, EOS, SEP = 0, 1, 2


def tiny_model(seed: int = 0, dropout: float = 0.0, use_dora: bool = True) -> BitAxonModel:
    mx.random.seed(seed)
    config = BitAxonConfig(
        vocab_size=VOCAB, hidden_dim=32, num_layers=3, num_heads=2, d_source_model=16, ssm_d_state=4,
        ssm_expand=2, swa_window_size=16, moe_num_experts=4, moe_top_k=2, moe_intermediate_dim=32,
    )
    model = BitAxonModel(config)
    apply_lora_to_model(model, rank=4, dropout=dropout, scale=2.0, use_dora=use_dora)
    mx.eval(model.parameters())
    return model


def _successor(token: int) -> int:
    return 3 + (token - 3 + 1) % (VOCAB - 3)


def copy_task(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``x1..xk SEP y1..ym`` with y1 = x1 + 1 and each next y the successor of the one before.

    Every target is a function of the token just before it, so adapters on a tiny random model learn
    it in a few dozen steps; lengths vary so packing has work to do.
    """
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        k, m = int(rng.integers(1, 5)), int(rng.integers(2, 6))
        xs = rng.integers(3, VOCAB, k).tolist()
        ys = [_successor(xs[0])]
        for _ in range(m - 1):
            ys.append(_successor(ys[-1]))
        examples.append((xs + [SEP] + ys, [0] * (k + 1) + [1] * m))
    return examples


def config(tmp_path, **kw) -> TrainingConfig:
    values = dict(
        learning_rate=3e-3, warmup_steps=2, max_steps=6, grad_accum_steps=2, batch_size=2, max_seq_len=24,
        save_every=100, eval_every=100, output_dir=str(tmp_path / "run"), lora_rank=4, lora_scale=2.0,
    )
    values.update(kw)
    return TrainingConfig(**values)


def trainer_kwargs() -> dict:
    return dict(show_progress=False, eos_token_id=EOS, pad_token_id=PAD)


def preference_task(n: int, seed: int = 0):
    """Pairs whose chosen response continues the successor chain and whose rejected one does not."""
    from bit_axon.training.data import PreferencePair

    rng = np.random.default_rng(seed)
    pairs = []
    for prompt_ids, mask in copy_task(n, seed):
        k = mask.index(1)
        prompt, chosen = prompt_ids[:k], prompt_ids[k:]
        rejected = rng.integers(3, VOCAB, len(chosen)).tolist()
        pairs.append(PreferencePair(
            prompt + chosen, [0] * k + [1] * len(chosen), prompt + rejected, [0] * k + [1] * len(rejected)
        ))
    return pairs


class SignalAt:
    """A cooling-scheduler stand-in that sends this process SIGINT before a given step (a Ctrl-C)."""

    def __init__(self, step: int):
        self.step = step

    def check_before_step(self, step: int) -> None:
        if step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    def after_step(self, seconds: float) -> float:
        return 0.0

    def status(self) -> dict:
        return {}


class HotAt(SignalAt):
    """A cooling-scheduler stand-in that reaches the critical temperature before a given step."""

    def check_before_step(self, step: int) -> None:
        if step == self.step:
            from bit_axon.training.cooling import ThermalShutdownError

            raise ThermalShutdownError(97.0, 95.0, step)


def peak_memory(fn):
    """``fn()`` evaluated, and the peak memory it took above what was allocated before the call."""
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return out, mx.get_peak_memory() - base


# The (input, output) dimensions of the adapter tests' base layers (conftest's make_base / inputs).
LINEAR_IN, LINEAR_OUT = 128, 48


def small_config(**overrides) -> BitAxonConfig:
    """``BitAxonConfig.small`` cut down for fast tests; it has 21 adapter target layers."""
    values = dict(vocab_size=512, hidden_dim=64, d_source_model=64, moe_intermediate_dim=128, num_heads=4)
    values.update(overrides)
    return BitAxonConfig.small(**values)


def small_model(seed: int = 0, **overrides) -> BitAxonModel:
    """A seeded ``small_config`` model without adapters, evaluated."""
    mx.random.seed(seed)
    model = BitAxonModel(small_config(**overrides))
    mx.eval(model.parameters())
    return model
