"""Served models for the server's tests: a tiny Llama GGUF file (mlx-lm's model class), its Bit-Axon
port, and a LoRA adapter on the Llama; and a live server on localhost."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import bit_axon  # noqa: F401  (BLAS before mlx)
from bit_axon.inference import load
from bit_axon.porting import port_weights
from bit_axon.serving.app import create_app
from bit_axon.serving.engine import Engine
from bit_axon.serving.models import load_served
from bit_axon.training.checkpoint import save_adapter_only
from bit_axon.training.lora import adapter_layers, apply_lora_to_model
from sources.tiny_lm import gguf_metadata, tiny_config, tokenizer_metadata, write_gguf

import mlx.core as mx
import numpy as np
import pytest
import uvicorn

VOCAB = 80


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    config = tiny_config("llama", vocab_size=VOCAB, max_position_embeddings=96)
    path = tmp_path_factory.mktemp("served") / "tiny-llama.gguf"
    metadata = {**gguf_metadata(config), **tokenizer_metadata(VOCAB)}
    metadata["llama.context_length"] = mx.array(96, dtype=mx.uint32)
    return write_gguf(path, config, metadata=metadata)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_gguf) -> Path:
    """A LoRA adapter that changes the tiny model's greedy answers (random, not trained)."""
    model, _ = load(tiny_gguf)
    apply_lora_to_model(model, rank=4, scale=20.0, use_dora=False)
    rng = np.random.default_rng(1)
    for _, layer in adapter_layers(model):
        layer.lora_b = mx.array(rng.normal(0, 0.5, layer.lora_b.shape).astype(np.float32))
    return save_adapter_only(model, tiny_gguf.parent / "adapter.safetensors")


@pytest.fixture(scope="session")
def tiny_bitaxon(tiny_gguf) -> Path:
    out = tiny_gguf.parent / "tiny-bitaxon"
    port_weights(tiny_gguf, out)
    return out


@pytest.fixture(scope="session")
def served(tiny_gguf, tiny_adapter, tiny_bitaxon):
    """{id: ServedModel}: ``tiny-llama`` (the base), ``ticket`` (base + adapter), ``tiny-bitaxon``."""
    models = load_served(tiny_gguf, {"ticket": tiny_adapter}) + load_served(tiny_bitaxon)
    return {m.name: m for m in models}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def live_server(served, runs_root):
    """A server on localhost for all three models, watching ``runs_root``: ``.url``, ``.engine``."""
    with Engine(list(served.values()), max_batch=16) as engine, LiveServer(
        create_app(engine, runs_dir=runs_root), _free_port()
    ) as server:
        server.engine = engine
        yield server
