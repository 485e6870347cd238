"""The training progress bar: step count, loss, learning rate, speed, memory, temperature."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


def progress_text(record: dict[str, Any], extra: str = "") -> str:
    """One step's metrics record as the bar's info text; ``extra`` is appended (the trainer's own fields)."""
    text = (
        f"loss {record['loss']:.4f} lr {record['learning_rate']:.2e} "
        f"{record['tokens_per_sec']:.0f} tok/s {record['peak_memory_gb']:.2f} GB"
    )
    if record.get("temperature") is not None:
        text += f" {record['temperature']:.0f}°C"
    if record.get("total_pause_time"):
        text += f" paused {record['total_pause_time']:.0f}s"
    if "val_loss" in record:
        text += f" val {record['val_loss']:.4f}"
    return f"{text} {extra}" if extra else text


class StepProgress:
    """A rich progress bar over training steps; ``fields(record)`` adds a trainer's own metrics."""

    def __init__(self, console: Console, enabled: bool, fields: Callable[[dict[str, Any]], str]):
        self.fields = fields
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
        )
        self.task: TaskID | None = None

    @contextmanager
    def shown(self, total: int, completed: int) -> Iterator[None]:
        with self.progress:
            self.task = self.progress.add_task("train", total=total, completed=completed, info="")
            yield

    def update(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record["step"], info=progress_text(record, self.fields(record)))
