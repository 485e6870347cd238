"""Rows decoded together equal each sequence decoded alone: Bit-Axon's caches (the attention window
drops keys while rows join and leave) and mlx-lm's, through ``batching.join`` / ``keep_rows``."""

from __future__ import annotations

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon import BitAxonConfig, BitAxonModel
from bit_axon.inference import generate_step
from bit_axon.serving import batching
from bit_axon.sources.pretrained import build_pretrained
from sources.tiny_lm import tiny_config, tiny_mlx_lm_model

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

PROMPTS = [[5, 17, 42, 8, 41, 3, 60], [1, 2], [9, 9, 9, 4, 4, 33, 21, 7, 70, 11], [30]]
STEPS = 10


def bit_axon_model():
    mx.random.seed(0)
    model = BitAxonModel(BitAxonConfig.small(vocab_size=80, hidden_dim=64, d_source_model=64,
                                             moe_intermediate_dim=128, swa_window_size=4))
    mx.eval(model.parameters())
    return model


def mlx_lm_model(kind):
    config = tiny_config(kind)
    return build_pretrained(config, dict(tree_flatten(tiny_mlx_lm_model(config).parameters())))


MODELS = {"bit-axon": bit_axon_model, "llama": lambda: mlx_lm_model("llama"), "qwen2": lambda: mlx_lm_model("qwen2")}


def prefill(model, prompt):
    cache = model.make_cache()
    if len(prompt) > 1:
        model(mx.array([prompt[:-1]]), cache=cache)
    logits, _ = model(mx.array([prompt[-1:]]), cache=cache)
    return mx.argmax(logits[0, -1]).item(), cache


@pytest.mark.parametrize("kind", list(MODELS))
def test_rows_joining_and_leaving_decode_as_each_alone(kind):
    model = MODELS[kind]()
    alone = [list(generate_step(model, p, max_tokens=STEPS)) for p in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(PROMPTS)  # distinct outputs: a mix-up would show

    # Rows 0 and 1 start together; row 2 joins after 3 steps, row 3 after 5; row 1 leaves after 6.
    outputs: dict[int, list[int]] = {}
    rows: list[int] = []
    batch = None
    for step in range(STEPS + 5):
        for row, joins_at in ((0, 0), (1, 0), (2, 3), (3, 5)):
            if step == joins_at:
                token, cache = prefill(model, PROMPTS[row])
                outputs[row] = [token]
                batch = batching.join(batch, cache)
                rows.append(row)
        if step == 6:
            keep = [i for i, r in enumerate(rows) if r != 1]
            batch, rows = batching.keep_rows(batch, keep), [rows[i] for i in keep]
        active = [r for r in rows if len(outputs[r]) < STEPS]
        if not active:
            break
        logits, _ = model(mx.array([[outputs[r][-1]] for r in rows]), cache=batch)
        for r, token in zip(rows, mx.argmax(logits[:, -1], axis=-1).tolist(), strict=True):
            if len(outputs[r]) < STEPS:
                outputs[r].append(token)
    assert outputs[1] == alone[1][: len(outputs[1])] and len(outputs[1]) == 7
    for r in (0, 2, 3):
        assert outputs[r] == alone[r], r


def test_a_cache_that_cannot_batch_is_named():
    class Odd:
        state = []

    with pytest.raises(TypeError, match="Odd cannot be batched"):
        batching.join(None, [Odd()])
