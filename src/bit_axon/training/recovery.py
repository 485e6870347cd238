"""What an interrupted run leaves in its output folder, checked before a resume or a save trusts it.

* A checkpoint is *intact* when its three files read back: both safetensors files load and
  ``training_state.json`` parses and has ``step``. Resuming skips a damaged one with a warning
  naming it and what is wrong, and moves it aside to a visible ``step_XXXXXXXX.damaged`` folder,
  so that a later save of the same step cannot overwrite it.
* A kill during a save leaves a hidden ``.step_XXXXXXXX.*.tmp`` folder (or the ``.stale`` copy of
  a step being saved again). An incomplete one is removed; a complete one is renamed into place when
  no folder of its step exists, else left where it is with a warning: it is never deleted. A
  ``.deleting`` folder (an old checkpoint the rotation was removing) is removed.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from bit_axon.training.checkpoint import ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE, read_training_state

import mlx.core as mx

logger = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"
# checkpoint.save_checkpoint's names: the folder of a step, and its temporary or stale copies.
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_UNFINISHED = re.compile(r"^\.(step_\d{8})\.(?:.*\.)?(tmp|stale|deleting)$")


class DamagedCheckpointError(ValueError):
    """A resume found checkpoints, none of them intact."""


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with the checkpoint in ``folder`` (a short phrase), or None when it is intact."""
    for name in (ADAPTERS_FILE, OPTIMIZER_FILE):
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            mx.eval(mx.load(str(file), format="safetensors"))
        except (RuntimeError, ValueError, OSError) as err:
            return f"{name} is unreadable ({err})"
    if not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = read_training_state(folder)
    except ValueError as err:
        return str(err)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step"
    return None


def step_folders(output_dir: Path) -> list[Path]:
    """Every ``step_XXXXXXXX`` folder of ``output_dir``, complete or not, newest step first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def set_aside(folder: Path, problem: str) -> Path:
    """Rename a damaged checkpoint to a free ``step_XXXXXXXX.damaged[-N]`` name beside it, with a warning."""
    target = folder.with_name(folder.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}-{n}")
    folder.rename(target)
    logger.warning("Checkpoint %s is damaged (%s); moved it aside to %s", folder, problem, target)
    return target


def recover_unfinished(output_dir: Path) -> None:
    """Deal with the temporary checkpoint folders a killed save left in ``output_dir`` (see the module doc)."""
    if not output_dir.is_dir():
        return
    for tmp in sorted(output_dir.iterdir()):
        match = _UNFINISHED.match(tmp.name)
        if not match or not tmp.is_dir():
            continue
        if match.group(2) == "deleting":
            logger.info("Removing %s, an old checkpoint whose deletion was interrupted", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        problem = checkpoint_problem(tmp)
        final = output_dir / match.group(1)
        if problem is not None:
            logger.info("Removing %s, left unfinished by an interrupted save (%s)", tmp, problem)
            shutil.rmtree(tmp, ignore_errors=True)
        elif not final.exists():
            tmp.rename(final)
            logger.warning("Recovered the complete checkpoint %s, left by an interrupted save, as %s", tmp, final)
        else:
            logger.warning(
                "%s holds a complete checkpoint left by an interrupted save, but %s exists: left as it is "
                "(delete it, or rename it over %s, yourself)", tmp, final, final,
            )


def newest_intact_checkpoint(output_dir: Path) -> Path | None:
    """The newest intact checkpoint of ``output_dir`` (None when there is no checkpoint at all).

    Damaged newer ones are moved aside with a warning. Raises ``DamagedCheckpointError`` when
    checkpoints exist but none is intact (they are left in place then).
    """
    recover_unfinished(output_dir)
    damaged: list[tuple[Path, str]] = []
    for folder in step_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            for bad, why in damaged:
                set_aside(bad, why)
            if damaged:
                logger.warning("Resuming from %s, the newest intact checkpoint", folder)
            return folder
        damaged.append((folder, problem))
    if damaged:
        listed = "; ".join(f"{folder.name}: {why}" for folder, why in damaged)
        raise DamagedCheckpointError(
            f"No intact checkpoint in {output_dir} to resume from ({listed}). Move those folders away to "
            "start afresh."
        )
    return None
