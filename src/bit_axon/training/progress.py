"""Training progress: a rich bar in a terminal, plain lines otherwise.

A rich bar on a non-terminal (a pipe, a log file, CI) prints once, when the run ends, so a logged
run looked frozen for its whole length. There, one plain line is printed instead every
``log_every`` steps or every ``PLAIN_LINE_SECONDS``, whichever comes first, plus the run's first
and last steps:

    step 12/300 epoch 0.40 loss 2.3141 lr 1.2e-04 812 tok/s 1.20 GB val 2.1000 eta 4m10s

In a terminal the step counter comes first and never shrinks: at 80 columns the info text is cut
(with an ellipsis), not the counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

PLAIN_LINE_SECONDS = 30.0  # the longest a non-terminal goes without a progress line


def progress_text(record: dict[str, Any], extra: str = "") -> str:
    """One step's metrics record as the progress info; ``extra`` is appended (the trainer's own fields)."""
    parts = []
    if record.get("epoch") is not None:
        parts.append(f"epoch {record['epoch']:.2f}")
    parts.append(
        f"loss {record['loss']:.4f} lr {record['learning_rate']:.1e} "
        f"{record['tokens_per_sec']:.0f} tok/s {record['peak_memory_gb']:.2f} GB"
    )
    if record.get("temperature") is not None:
        parts.append(f"{record['temperature']:.0f}°C")
    if record.get("total_pause_time"):
        parts.append(f"paused {record['total_pause_time']:.0f}s")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def format_duration(seconds: float) -> str:
    """``12s``, ``4m10s``, ``2h05m``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _StepCount(ProgressColumn):
    """``step M/N``, never wrapped or shrunk."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{task.total:.0f}"
        return Text(f"step {task.completed:.0f}/{total}", style="bold")


class StepProgress:
    """Progress over training steps: a rich bar on a terminal, plain lines elsewhere.

    ``fields(record)`` adds a trainer's own metrics (ORPO's margin and accuracy); ``clock`` is
    injectable so tests can run the every-30-seconds rule without waiting.
    """

    def __init__(
        self,
        console: Console,
        enabled: bool,
        fields: Callable[[dict[str, Any]], str],
        log_every: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console, self.fields, self.log_every, self.clock = console, fields, log_every, clock
        self.plain = enabled and not console.is_terminal
        # expand + ratio: the info column gets exactly the width the others leave, and is cut there.
        info = Column(no_wrap=True, overflow="ellipsis", ratio=1)
        self.progress = Progress(
            _StepCount(), BarColumn(bar_width=20), TimeRemainingColumn(), TextColumn("{task.fields[info]}", table_column=info),
            console=console, disable=not enabled or self.plain, transient=False, expand=True,
        )
        self.task: TaskID | None = None
        self.total = self.start_step = 0
        self.start_time = self.last_line_time = 0.0
        self.unprinted: dict[str, Any] | None = None  # the newest record without a plain line yet

    @contextmanager
    def shown(self, total: int, completed: int) -> Iterator[None]:
        self.total, self.start_step = total, completed
        self.start_time = self.last_line_time = self.clock()
        self.unprinted = None
        with self.progress:
            self.task = self.progress.add_task("train", total=total, completed=completed, info="")
            try:
                yield
            finally:
                if self.unprinted is not None:  # a run that stopped early: its last step still gets a line
                    self._print_line(self.unprinted)

    def update(self, record: dict[str, Any]) -> None:
        info = progress_text(record, self.fields(record))
        self.progress.update(self.task, completed=record["step"], info=info)
        if not self.plain:
            return
        step = record["step"]
        due = (
            step == self.start_step + 1 or step % self.log_every == 0 or step >= self.total
            or self.clock() - self.last_line_time >= PLAIN_LINE_SECONDS
        )
        if due:
            self._print_line(record, info)
        else:
            self.unprinted = record

    def line(self, record: dict[str, Any], info: str | None = None) -> str:
        """The plain progress line of ``record``, with the time left at the run's speed so far."""
        info = progress_text(record, self.fields(record)) if info is None else info
        done = record["step"] - self.start_step
        elapsed = self.clock() - self.start_time
        text = f"step {record['step']}/{self.total} {info}"
        if done > 0 and record["step"] < self.total:
            text += f" eta {format_duration(elapsed / done * (self.total - record['step']))}"
        return text

    def _print_line(self, record: dict[str, Any], info: str | None = None) -> None:
        # soft_wrap: a log line is never cut or broken at the console width.
        self.console.print(self.line(record, info), markup=False, highlight=False, soft_wrap=True)
        self.last_line_time = self.clock()
        self.unprinted = None
