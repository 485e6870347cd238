"""Training runs for the dashboard: which directories are runs, and the new lines of their metrics.

A run directory is one that holds ``metrics.jsonl`` (``bit-axon train``, ``distill``, ORPO). The
page asks for the records after a byte offset it got last time and receives only the complete
lines written since, so a growing file is read once, a line at a time, however long the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bit_axon.training.checkpoint import checkpoint_step, list_checkpoints

import yaml

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SETTINGS_FILES = ("train_config.yaml", "distill_config.json")


def list_runs(root: Path) -> list[str]:
    """Names (relative to ``root``, with ``/``) of the run directories at or under ``root``, newest first."""
    found = sorted(root.rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.parent.relative_to(root).as_posix() or "." for p in found]


def run_directory(root: Path, name: str) -> Path:
    """The run ``name`` under ``root``; ``ValueError`` for a name outside it or not a run."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"run {name!r} is outside the runs directory")
    if not (path / METRICS_FILE).is_file():
        raise ValueError(f"{name!r} is not a run directory (no {METRICS_FILE}) under {root}")
    return path


def read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The records of the complete lines of ``path`` from byte ``offset`` on, and the offset after them.

    A line still being written (no newline yet) is left for the next call. A line that is not JSON
    is skipped with a warning naming its file and byte offset, so one bad line cannot stop the page.
    """
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = []
    position = offset
    for line in data[:end].splitlines(keepends=True):
        text = line.strip()
        if text:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                logger.warning("%s: byte %d: not a JSON line (%s); skipped", path, position, error)
            else:
                if isinstance(record, dict):
                    records.append(record)
        position += len(line)
    return records, offset + end


def run_summary(path: Path) -> dict:
    """What the dashboard shows beside the curves: checkpoints, settings file, finished model files."""
    checkpoints = [{"step": checkpoint_step(p), "name": p.name} for p in list_checkpoints(path)]
    settings = next((name for name in SETTINGS_FILES if (path / name).is_file()), None)
    outputs = [name for name in ("best_adapter.safetensors", "final_adapter.safetensors", "model")
               if (path / name).exists()]
    text = (path / settings).read_text() if settings else None
    return {"checkpoints": checkpoints, "settings_file": settings, "outputs": outputs, "settings": text,
            "max_steps": _max_steps(text, settings)}


def _max_steps(text: str | None, name: str | None) -> int | None:
    """The run's step count from its settings file (for the ETA), or None."""
    if text is None:
        return None
    try:
        settings = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        logger.warning("%s: cannot read its settings (%s): no ETA", name, error)
        return None
    if isinstance(settings, dict) and isinstance(settings.get("settings"), dict):
        settings = settings["settings"]  # distill_config.json: {"inputs": ..., "settings": ...}
    value = settings.get("max_steps") if isinstance(settings, dict) else None
    return value if isinstance(value, int) and value > 0 else None
