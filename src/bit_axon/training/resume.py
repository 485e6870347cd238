"""Resuming a run: its newest intact checkpoint back into the trainer, and what changed since it was written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bit_axon.training.checkpoint import load_checkpoint, read_training_state
from bit_axon.training.config import TrainingConfig
from bit_axon.training.recovery import newest_intact_checkpoint

if TYPE_CHECKING:
    from bit_axon.training.trainer import Trainer


def resume_latest(trainer: Trainer) -> None:
    """Load the newest intact checkpoint of ``trainer.output_dir`` into ``trainer`` (rank 0 only: the
    other ranks receive it from rank 0), and report what changed since it was written.

    Damaged newer checkpoints are moved aside with a warning (``recovery.newest_intact_checkpoint``).
    """
    latest = newest_intact_checkpoint(trainer.output_dir)
    if latest is None:
        trainer.console.print(f"No checkpoint in {trainer.output_dir}; starting from step 0.", soft_wrap=True)
        return
    trainer.step, _ = load_checkpoint(trainer.model, trainer.optimizer, latest)
    state = read_training_state(latest)
    trainer.batches_consumed = state.get("batches_consumed", 0)
    trainer.nonfinite_steps = state.get("nonfinite_steps", 0)
    trainer.empty_steps = state.get("empty_steps", 0)
    trainer.tokens_seen = state.get("tokens_seen", 0)
    for callback in trainer.callbacks:
        callback.restore_state(state)
    for message in describe_changes(latest, state, trainer.config, trainer.world_size, trainer.batches_consumed):
        trainer.console.print(message, highlight=False, soft_wrap=True)
    trainer.console.print(f"Resumed from {latest} (step {trainer.step}).", highlight=False, soft_wrap=True)


def describe_changes(
    checkpoint: Path, state: dict[str, Any], config: TrainingConfig, world_size: int, batches_consumed: int
) -> list[str]:
    """Messages (rich markup) on what differs between ``state`` (a checkpoint's) and this run."""
    messages = []
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        # batches_consumed counts global batches, so the data position carries over exactly; only
        # the number of rows per step changes.
        messages.append(
            f"[yellow]{checkpoint} was written by {saved_world} process(es), this run has {world_size}: "
            f"continuing from the same data position, but each step now takes {world_size} x "
            f"{config.grad_accum_steps} batches of {config.batch_size} instead of {saved_world} x "
            f"{config.grad_accum_steps}.[/yellow]"
        )
    batching = [
        f"{name} {state[key]} -> {value}"
        for key, name, value in (
            ("batch_size", "batch size", config.batch_size),
            ("max_seq_len", "max sequence length", config.max_seq_len),
            ("seed", "seed", config.seed),
        )
        if key in state and state[key] != value
    ]
    if batching:
        # The packed batches, and their shuffled order, depend on all three: batch
        # ``batches_consumed`` of the new order is not where the old run stopped.
        messages.append(
            f"[yellow]{checkpoint} was written with a different {', '.join(batching)}: the batches are "
            f"made differently now, so resuming after {batches_consumed} of them repeats some "
            f"examples and skips others.[/yellow]"
        )
    saved, current = state.get("config") or {}, config.to_dict()
    # Plain words, one "name old -> new" per setting: "lora_rank 8 -> 16".
    settings = [f"{k} {saved[k]} -> {v}" for k, v in current.items() if k in saved and saved[k] != v]
    if settings:
        messages.append(f"Settings changed since {checkpoint.name}: {', '.join(settings)}.")
    return messages
