"""How a training command (``train``, ``distill``) ends on an error it expects: one message, one exit code.

A thermal stop exits 2 and says the last checkpoint is intact; bad input (a missing file, a bad
setting or dataset line) and a failed run exit 1 with ``Error: ...`` on stderr. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bit_axon.training.callbacks import TrainingError
from bit_axon.training.cooling import ThermalShutdownError
from bit_axon.training.data import DatasetError

import typer
from rich.console import Console

THERMAL_STOP_EXIT = 2


@dataclass
class RunErrors:
    """``with RunErrors(console, output_dir):`` around a run; set ``output_dir`` once it is known."""

    console: Console
    output_dir: Path | None = None

    def __enter__(self) -> RunErrors:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, ThermalShutdownError):
            where = f" in {self.output_dir}" if self.output_dir is not None else ""
            self.console.print(f"[red]Thermal stop: {error}[/red]\nThe last checkpoint{where} is intact; "
                               "let the machine cool, then rerun with --resume.", soft_wrap=True)
            raise typer.Exit(THERMAL_STOP_EXIT) from None
        if isinstance(error, (FileNotFoundError, ValueError, DatasetError, TrainingError)):
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(1) from None
