"""Checkpoints: adapter-only files (below) and full training checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bit_axon.io import atomic_save_safetensors
from bit_axon.training.base_record import base_metadata, bind_to_base
from bit_axon.training.lora import (
    ADAPTER_KINDS,
    AdapterConfig,
    adapter_config,
    adapter_layers,
    apply_adapters,
    lora_target,
)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Adapter-only files: save_adapter_only / load_adapter
#
# A file holds ``{layer path}.{name}`` for every adapted layer and each of its kind's
# ``parameter_names`` (``lora_a``, ``lora_b``, and DoRA's ``m``), plus the safetensors metadata of
# ``AdapterConfig.metadata()``: ``adapter_kind``, ``lora_rank``, ``lora_scale``, ``lora_dropout`` and
# ``use_dora`` (strings), so loading rebuilds the same adapters without guessing, and the record of
# the base it was trained on (``base_record``: source, quantization, fingerprint), so loading refuses
# another base. Files written before ``adapter_kind`` was recorded still load: their kind is inferred
# from the tensors.
# ---------------------------------------------------------------------------------------------------


def save_adapter_only(model: nn.Module, path: str | Path) -> Path:
    """Write only the adapter weights (``lora_a``, ``lora_b``, DoRA ``m``) of ``model`` to ``path``."""
    path = Path(path)
    config = adapter_config(model)  # also refuses models without adapters or with mixed settings
    weights = {
        f"{layer_path}.{name}": layer[name]
        for layer_path, layer in adapter_layers(model)
        for name in layer.parameter_names
    }
    metadata = {"format": "mlx", **config.metadata(), **base_metadata(model)}
    atomic_save_safetensors(path, weights, metadata=metadata)
    return path


def save_trainable(model: nn.Module, path: str | Path) -> Path:
    """Write every trainable parameter of ``model`` to ``path``, with the adapter metadata when it has adapters.

    In a fine-tuning run only the adapters train, so this is ``save_adapter_only``'s file; a
    distillation run (``bit_axon.training.distill``) also trains SSM mixers and norms in full, and
    its checkpoints and best weights carry them too.
    """
    path = Path(path)
    weights = dict(tree_flatten(model.trainable_parameters()))
    if not weights:
        raise ValueError("The model has no trainable parameters to save")
    adapters = adapter_config(model).metadata() if adapter_layers(model) else {}
    atomic_save_safetensors(path, weights, metadata={"format": "mlx", **adapters, **base_metadata(model)})
    return path


def _adapter_parameter_names() -> set[str]:
    return {name for cls in ADAPTER_KINDS.values() for name in cls.parameter_names}


def check_adapter_file(path: str | Path) -> Path:
    """``path`` as a Path when it is a file; a clear ``FileNotFoundError`` (missing, or a directory) else."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory: pass the adapter file (*.safetensors) inside it")
    if not path.is_file():
        raise FileNotFoundError(f"Adapter file not found: {path}")
    return path


def _read_adapter_tensors(path: Path) -> tuple[dict[str, dict[str, mx.array]], dict[str, str]]:
    """``{layer path: {parameter name: tensor}}`` and the metadata of the adapter file at ``path``."""
    check_adapter_file(path)
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    names = _adapter_parameter_names()
    adapters: dict[str, dict[str, mx.array]] = {}
    for key, value in tensors.items():
        layer_path, _, name = key.rpartition(".")
        if layer_path and name in names:
            adapters.setdefault(layer_path, {})[name] = value
    if not adapters:
        listed = " / ".join(f"*.{name}" for name in sorted(names))
        raise ValueError(f"{path} holds no adapter weights (no {listed} tensors)")
    ignored = len(tensors) - sum(len(v) for v in adapters.values())
    if ignored:
        logger.info("%s: ignoring %d non-adapter tensors", path, ignored)
    return adapters, metadata


def _recorded_config(
    path: Path, adapters: dict[str, dict[str, mx.array]], metadata: dict[str, str]
) -> AdapterConfig:
    """The adapters' settings from the file's metadata, checked against its tensors."""
    ranks = {params["lora_a"].shape[-1] for params in adapters.values() if "lora_a" in params}
    if len(ranks) > 1:
        raise ValueError(f"{path}: adapters of different ranks {sorted(ranks)}")
    recorded = dict(metadata)
    if "adapter_kind" not in recorded:
        # Files from before the kind was recorded held LoRA or DoRA, told apart by DoRA's magnitudes.
        kind = "dora" if any("m" in params for params in adapters.values()) else "lora"
        recorded["adapter_kind"] = kind
        logger.warning("%s does not record adapter_kind; inferred %r from its tensors", path, kind)
    if "lora_scale" not in recorded:
        logger.warning("%s does not record lora_scale; assuming the default %s", path, AdapterConfig.scale)
    if ranks:
        rank = ranks.pop()
        if int(recorded.setdefault("lora_rank", str(rank))) != rank:
            recorded_rank = recorded["lora_rank"]
            raise ValueError(f"{path}: metadata says rank {recorded_rank} but the tensors have rank {rank}")
    try:
        config = AdapterConfig.from_metadata(recorded)
    except ValueError as err:
        raise ValueError(f"Adapter file {path}: {err}") from err
    if "use_dora" in recorded and (recorded["use_dora"] == "true") != config.use_dora:
        raise ValueError(
            f"{path}: metadata use_dora={recorded['use_dora']} disagrees with adapter kind {config.kind!r}"
        )
    expected = set(config.layer_class.parameter_names)
    incomplete = sorted(p for p, params in adapters.items() if set(params) != expected)
    if incomplete:
        raise ValueError(
            f"{path}: incomplete adapter tensors for {', '.join(incomplete[:5])} "
            f"(a {config.kind} adapter has {', '.join(sorted(expected))})"
        )
    return config


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Wrap ``model``'s target layers in adapters of the kind and settings stored in ``path``, then load them.

    ``model`` must not have adapters yet. The file may also hold non-adapter tensors (a full training
    checkpoint); those are ignored. When the file records its base (``base_record.bind_to_base``),
    a float ``model`` is first quantized the way that base was, and a different base is refused.
    Returns the wrapped layer paths. Raises ``ValueError`` when the file's base, adapted layers or
    shapes do not match the model, or its adapter kind is not registered.
    """
    path = Path(path)
    adapters, metadata = _read_adapter_tensors(path)
    config = _recorded_config(path, adapters, metadata)

    if adapter_layers(model):
        raise ValueError("The model already has adapters; load_adapter needs a model without them")
    targets = {p for p, _ in model.named_modules() if lora_target(p)}
    missing, unexpected = sorted(targets - set(adapters)), sorted(set(adapters) - targets)
    if missing or unexpected:
        raise ValueError(
            f"Adapter {path} does not match the model: "
            f"{len(missing)} target layers have no adapter {missing[:3]}, "
            f"{len(unexpected)} adapters have no target layer {unexpected[:3]}"
        )
    bind_to_base(model, path, metadata)

    wrapped = apply_adapters(model, config)
    expected = dict(tree_flatten(model.trainable_parameters()))
    weights = {f"{p}.{name}": v for p, params in adapters.items() for name, v in params.items()}
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"Adapter {path} does not match the model: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.trainable_parameters())
    return wrapped


# ---------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Training checkpoints: save_checkpoint / load_checkpoint / get_latest_checkpoint
#
# ``output_dir/step_%08d/`` holds ``adapters.safetensors`` (the trainable parameters, in the
# adapter-file format above, so any checkpoint can be merged or run directly),
# ``optimizer_state.safetensors`` (AdamW moments, step count, learning rate) and
# ``training_state.json`` (``step``, ``loss``, what exact resume needs: the data position and
# counters, and the run's resolved settings under ``config``, ``TrainingConfig.to_dict()``).
# A checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-save
# never leaves a half-written ``step_*`` folder behind.
# ---------------------------------------------------------------------------------------------------

ADAPTERS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer_state.safetensors"
STATE_FILE = "training_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    model: nn.Module,
    optimizer: optim.Optimizer,
    step: int,
    loss: float,
    output_dir: str | Path,
    extra_state: dict[str, Any] | None = None,
    keep: int = 3,
    protect: int | None = None,
) -> Path:
    """Write ``output_dir/step_{step:08d}/`` atomically and keep only the ``keep`` newest checkpoints,
    plus the checkpoint of step ``protect`` (the best evaluation's) when there is one."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in trainable.items() if not mx.all(mx.isfinite(v)).item()]
    if bad:
        raise ValueError(f"Refusing to save a checkpoint with non-finite weights in {', '.join(bad[:5])}")
    final = output_dir / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=output_dir))
    try:
        save_trainable(model, tmp / ADAPTERS_FILE)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        state = {"step": step, "loss": _finite_or_none(float(loss)), **(extra_state or {})}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out first
            stale = final.with_name(f".{final.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _rotate(output_dir, keep, protect)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p for p in output_dir.iterdir()
        if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a ``step_%08d`` checkpoint folder."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step_NNNNNNNN checkpoint folder")
    return int(match.group(1))


def _rotate(output_dir: Path, keep: int, protect: int | None = None) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        if checkpoint_step(old) == protect:
            continue
        # Hidden first, so a kill mid-delete leaves no half-deleted step_* folder behind.
        doomed = old.with_name(f".{old.name}.deleting")
        os.rename(old, doomed)
        shutil.rmtree(doomed)


def get_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint in ``output_dir``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def read_training_state(path: str | Path) -> dict[str, Any]:
    state_file = Path(path) / STATE_FILE
    try:
        return json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Unreadable checkpoint state {state_file}: {err}") from err


def load_checkpoint(model: nn.Module, optimizer: optim.Optimizer, path: str | Path) -> tuple[int, float]:
    """Restore adapter weights and optimizer state from a checkpoint folder; return (step, loss)."""
    path = Path(path)
    state = read_training_state(path)
    weights = mx.load(str(path / ADAPTERS_FILE))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        unexpected = sorted(set(weights) - set(expected))[:3]
        raise ValueError(
            f"Checkpoint {path} does not match the model's adapters (missing {missing}, unexpected {unexpected}); "
            "were the LoRA/DoRA settings changed since it was written?"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"Checkpoint {path}: {key} has shape {value.shape}, the model expects {expected[key].shape}")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    loss = state.get("loss")
    return int(state["step"]), float("nan") if loss is None else float(loss)
