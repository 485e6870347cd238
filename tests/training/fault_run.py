"""A training run for the kill-and-resume test: toy's tiny model, a checkpoint every step, and a
model folder written at the start (as ``train --config-small`` writes ``base_model``).

``python fault_run.py OUTPUT_DIR``: prints ``READY`` once imported, then ``START <step>`` with the
step it resumed from, then trains (resuming) until killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bit_axon.io import atomic_save_safetensors
from bit_axon.training.callbacks import Callback
from bit_axon.training.trainer import Trainer
from toy import config, copy_task, tiny_model, trainer_kwargs

import mlx.core as mx
from mlx.utils import tree_flatten

MODEL_DIR = "base_model"


class _Announce(Callback):
    def on_train_begin(self, trainer: Trainer) -> None:
        print(f"START {trainer.step}", flush=True)


def main(output: Path) -> None:
    print("READY", flush=True)
    model = tiny_model()
    weights = {k: v for k, v in tree_flatten(model.parameters()) if "lora" not in k and not k.endswith(".m")}
    for shard in range(2):  # two shards: a kill can land between them, or inside either
        atomic_save_safetensors(output / MODEL_DIR / f"model-{shard}.safetensors", weights)
    mx.eval(model.parameters())
    cfg = config(output, max_steps=100_000, save_every=1)
    Trainer(model, cfg, copy_task(30), callbacks=[_Announce()], **trainer_kwargs()).train(resume=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
