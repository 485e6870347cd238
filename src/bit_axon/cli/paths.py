"""The one check of a command's output directory, before any work is done.

Every command that writes a directory (``quantize``, ``merge``, ``port-weights``, ``train``) asks
``check_output_dir`` first, so a bad ``--output`` is a one-line error naming the path and what to
do, never a traceback at the end of the work, and never a write over the input's own weights.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Iterator
from pathlib import Path

import typer

OVERWRITE_FLAG = "--overwrite"


class OutputPathError(ValueError):
    """An output path a command must not write to; the message names it and what to do."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output: Path,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    option: str = "--output",
    can_overwrite: bool = True,
) -> None:
    """Refuse ``output`` when it is an existing file, or is (or lies inside) one of the local model
    directories ``inputs``, unless ``overwrite`` (the user's explicit ``--overwrite``; a command
    without that flag passes ``can_overwrite=False``, and the message does not offer it).

    Writing into a model's own directory replaces the weights being converted (``quantize X -o X``
    loses the float weights), or adds ``*.safetensors`` files that make it unloadable (``train -w X
    -o X``). An input file (a .gguf model) is only hit by being the output, which the first check
    refuses; an input that is not a local path (a hub id) is never hit.
    """
    if output.exists() and not output.is_dir():
        raise OutputPathError(
            f"{output} is an existing file, but {option} names a directory to write into; "
            "pass a new directory path (or an existing directory)"
        )
    resolved = output.resolve()
    for given in inputs:
        source = Path(given)
        if overwrite or not source.is_dir():
            continue
        folder = source.resolve()
        if _within(resolved, folder):
            harm = ("is the input model {}: writing there would replace or spoil its weights" if resolved == folder
                    else "is inside the input model {}: the output would be mixed into its folder").format(given)
            anyway = f", or pass {OVERWRITE_FLAG} to write there anyway" if can_overwrite else ""
            raise OutputPathError(f"{option} {output} {harm}; choose another {option}{anyway}")


def write_error(err: OSError, output: Path) -> str:
    """The one-line message for an OS error while writing a command's output."""
    cause = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return f"Error: could not write {output} ({cause}); free some space or choose another --output"


@contextlib.contextmanager
def one_line_errors(output: Path) -> Iterator[None]:
    """A command body whose expected failures end in one ``Error: ...`` line and exit status 1:
    bad input (``FileNotFoundError``, ``ValueError``) as its message, an OS error as a write error."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    except OSError as err:  # the write: a full disk, no permission
        typer.echo(write_error(err, output), err=True)
        raise typer.Exit(1) from None


def check_run_dir(output: Path, *, resume: bool, option: str = "--output-dir") -> None:
    """``--resume`` needs a checkpoint in ``output``; a new run must not go into another run's.

    Without the first check a typo in the path silently starts over from step 0; without the
    second a new run's checkpoints replace and rotate away the old run's under the same names.
    """
    from bit_axon.training.recovery import step_folders

    found = step_folders(output)
    if resume and not found:
        raise OutputPathError(f"--resume: no checkpoint in {output}. Check the path, or drop --resume to start a new run")
    if not resume and found:
        raise OutputPathError(
            f"{option} {output} already holds checkpoints of a run (the newest: {found[0].name}): pass --resume "
            f"to continue that run, or choose another {option} to start a new one"
        )
