"""What ``bit-axon upload`` puts in a hub repository: the files of a run or model directory, and a model card.

Two kinds of directory are published:

* a training run's output directory (``bit-axon train -o DIR``): its adapter files
  (``best_adapter.safetensors`` and/or ``final_adapter.safetensors``), ``metrics.jsonl`` and
  ``loss.png``; and ``base_model/`` when the adapter's base is that folder (a ``--config-small``
  run), so the upload is usable on its own. Checkpoints (optimizer state) stay home.
* a model directory (``config.json`` + ``*.safetensors``, e.g. from ``bit-axon merge``): its
  top-level files.

The card (README.md) names the base model (from the adapter file's record of it,
``training.base_record``), the data, the settings (from ``train_config.yaml``, else the newest
checkpoint's), the final metrics (from ``metrics.jsonl``) and the exact ``bit-axon`` commands to
run it. Local paths appear by file name only: a public card should not show the uploader's
folders (which is also why ``train_config.yaml`` is not uploaded; the card holds its settings).
Nothing here writes to the directory; a ``README.md`` already in it is uploaded instead of the card.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bit_axon.loading import HUB_ID
from bit_axon.tokenizer import DEFAULT_TOKENIZER
from bit_axon.training.base_record import QUANTIZATION_KEY, SOURCE_KEY
from bit_axon.training.callbacks import BEST_ADAPTER, FINAL_ADAPTER, LOSS_PLOT, METRICS_FILE, read_metrics
from bit_axon.training.checkpoint import get_latest_checkpoint, read_training_state

import yaml

CARD = "README.md"
RUN_SETTINGS = "train_config.yaml"  # what `bit-axon train` writes in its output directory
BASE_MODEL_DIR = "base_model"  # a --config-small run's base, inside its output directory
ADAPTER, MODEL = "adapter", "model"
PATH_SETTINGS = ("data", "val_data", "model_weights", "tokenizer", "eval_prompts", "output_dir")
PROMPT = "Hello"
KIND_NAMES = {"lora": "LoRA", "dora": "DoRA"}


class UploadError(ValueError):
    """A directory that cannot be published; the message says what it lacks."""


@dataclass
class UploadPlan:
    """The repository's files (path in the repository -> local file) and its README.md text
    (uploaded from memory: the directory itself is never written)."""

    kind: str  # ADAPTER or MODEL
    files: dict[str, Path]
    card: str
    card_is_users: bool = False  # the directory's own README.md is uploaded instead of ours

    def listing(self) -> list[str]:
        lines = [f"{name}  <- {path}" for name, path in sorted(self.files.items())]
        card = f"{CARD}  <- the directory's own README.md" if self.card_is_users else f"{CARD}  (model card, below)"
        return [*lines, card]


def _top_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _adapter_metadata(path: Path) -> dict[str, str]:
    import mlx.core as mx

    _, metadata = mx.load(str(path), return_metadata=True)
    return metadata


def _settings(directory: Path) -> dict[str, Any]:
    """The run's settings: ``train_config.yaml`` (with the command's own options), else the newest checkpoint's."""
    path = directory / RUN_SETTINGS
    if path.is_file():
        try:
            settings = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise UploadError(f"{path}: not readable YAML ({err}); fix or delete it") from None
        return settings if isinstance(settings, dict) else {}
    latest = get_latest_checkpoint(directory)
    return dict(read_training_state(latest).get("config", {})) if latest else {}


def _shown(value: Any) -> Any:
    """A local path by its name (the uploader's folders stay private); a hub id as it is."""
    if isinstance(value, str) and (Path(value).is_absolute() or Path(value).exists()):
        return Path(value).name
    return value


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and HUB_ID.match(source) is not None and not Path(source).exists()


def _metrics_summary(directory: Path) -> list[str]:
    path = directory / METRICS_FILE
    if not path.is_file():
        return []
    records = read_metrics(path)
    train = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    val = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    lines = []
    if records:
        lines.append(f"| steps | {records[-1]['step']} |")
    if train:
        lines.append(f"| final train loss | {train[-1]['loss']:.4f} (step {train[-1]['step']}) |")
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        lines.append(f"| final validation loss | {val[-1]['val_loss']:.4f} (step {val[-1]['step']}) |")
        lines.append(f"| best validation loss | {best['val_loss']:.4f} (step {best['step']}) |")
    return ["| metric | value |", "|---|---|", *lines] if lines else []


def _quantization_text(spec: Any) -> str:
    if spec is None:
        return "float"
    if isinstance(spec, dict) and {"mode", "bits", "group_size"} <= set(spec):
        return f"{spec['mode']} {spec['bits']}-bit, group size {spec['group_size']}"
    return f"mixed formats {json.dumps(spec, sort_keys=True)}"


def _front_matter(tags: list[str], base: str | None) -> list[str]:
    lines = ["---", "tags:", *(f"- {t}" for t in tags)]
    if _is_hub_id(base):
        lines.append(f"base_model: {base}")
    return [*lines, "---", ""]


def _settings_block(settings: dict[str, Any]) -> list[str]:
    if not settings:
        return ["No settings were recorded (no train_config.yaml or checkpoint in the directory).", ""]
    shown = {k: _shown(v) if k in PATH_SETTINGS else v for k, v in settings.items() if k != "output_dir"}
    return [
        "The run's resolved settings (a `bit-axon train --config` file, once `data` points at your copy):", "",
        "```yaml", yaml.safe_dump(shown, sort_keys=False, allow_unicode=True).rstrip(), "```", "",
    ]


def _adapter_card(directory: Path, repo_id: str, adapter: str, files: dict[str, Path]) -> str:
    metadata = _adapter_metadata(directory / adapter)
    settings = _settings(directory)
    source = metadata.get(SOURCE_KEY)
    quantization = json.loads(metadata.get(QUANTIZATION_KEY, "null"))
    local = repo_id.rsplit("/", 1)[-1]
    base_in_upload = f"{BASE_MODEL_DIR}/config.json" in files
    if base_in_upload:
        base_arg, base_text = f"{local}/{BASE_MODEL_DIR}", f"`{BASE_MODEL_DIR}/` in this repository (the run's own base model)"
    elif _is_hub_id(source):
        base_arg, base_text = source, f"[{source}](https://huggingface.co/{source})"
    else:
        name = Path(source).name if source else "BASE_MODEL"
        base_arg = name
        base_text = (f"a local model `{name}` (not on the hub: use your copy of it)" if source
                     else "not recorded in the adapter file")
    kind = metadata.get("adapter_kind", "lora")
    mode = settings.get("training_mode", "sft")
    run = ["bit-axon", "run", "-m", base_arg, "--adapter", f"{local}/{adapter}"]
    tokenizer = settings.get("tokenizer")
    if tokenizer and tokenizer != DEFAULT_TOKENIZER:
        run += ["--tokenizer", str(_shown(tokenizer))]
    data = [f"- training data: `{_shown(settings['data'])}`"] if settings.get("data") else ["- training data: not recorded"]
    if settings.get("val_data"):
        data.append(f"- validation data: `{_shown(settings['val_data'])}`")
    adapters = [f"- `{name}`: {what}" for name, what in (
        (BEST_ADAPTER, "the adapters of the evaluation with the lowest validation loss"),
        (FINAL_ADAPTER, "the adapters at the end of the run"),
    ) if name in files]
    lines = [
        *_front_matter(["bit-axon", "mlx", kind, mode, "adapter"], source),
        f"# {local}", "",
        f"A {KIND_NAMES.get(kind, kind)} adapter (rank {metadata.get('lora_rank', '?')}, {mode.upper()}) trained with "
        "Bit-Axon on a frozen base model.", "",
        f"- base model: {base_text}",
        f"- base weights during training: {_quantization_text(quantization)}",
        *data, "", *adapters, "",
        "## How to run it", "",
        "```bash",
        shlex.join(["bit-axon", "download", repo_id, "--dir", local]),
        shlex.join([*run, PROMPT]),
        shlex.join([*run, "--chat"]) + "   # a conversation",
        "```", "",
        "Or fold it into the base weights: "
        f"`{shlex.join(['bit-axon', 'merge', base_arg, '--adapter', f'{local}/{adapter}', '-o', local + '-merged'])}`.", "",
        "## Final metrics", "",
        *(_metrics_summary(directory) or ["No metrics.jsonl was found."]), "",
        *([f"![loss]({LOSS_PLOT})", ""] if LOSS_PLOT in files else []),
        "## Settings", "",
        *_settings_block(settings),
    ]
    return "\n".join(lines)


def _model_card(directory: Path, repo_id: str) -> str:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UploadError(f"{directory / 'config.json'}: not readable JSON ({err})") from None
    model_type = config.get("model_type", "unknown")
    quantization = config.get("quantization")
    local = repo_id.rsplit("/", 1)[-1]
    metrics = _metrics_summary(directory)
    lines = [
        *_front_matter(["bit-axon", "mlx", model_type], None),
        f"# {local}", "",
        f"A `{model_type}` model directory saved by Bit-Axon "
        "(e.g. an adapter merged into its base with `bit-axon merge`).", "",
        f"- weights: {_quantization_text(quantization or None)}", "",
        "## How to run it", "",
        "```bash",
        shlex.join(["bit-axon", "run", "-m", repo_id, PROMPT]) + "   # downloads it on first use",
        shlex.join(["bit-axon", "run", "-m", repo_id, "--chat"]),
        "```", "",
        *(["## Final metrics", "", *metrics, ""] if metrics else []),
        "## Settings", "",
        *_settings_block(_settings(directory)),
    ]
    return "\n".join(lines)


def plan_upload(directory: str | Path, repo_id: str) -> UploadPlan:
    """The files and model card ``bit-axon upload`` publishes from ``directory`` (see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UploadError(f"{directory} is not a directory; pass a training output directory or a model directory")
    top = _top_files(directory)
    adapters = [name for name in (BEST_ADAPTER, FINAL_ADAPTER) if name in top]
    if adapters:
        files = {name: top[name] for name in (*adapters, METRICS_FILE, LOSS_PLOT) if name in top}
        source = _adapter_metadata(top[adapters[0]]).get(SOURCE_KEY)
        base = directory / BASE_MODEL_DIR
        if source and base.is_dir() and Path(source).resolve() == base.resolve():
            files.update({f"{BASE_MODEL_DIR}/{name}": path for name, path in _top_files(base).items()})
        card = _adapter_card(directory, repo_id, adapters[0], files)
        kind = ADAPTER
    elif "config.json" in top and any(name.endswith(".safetensors") for name in top):
        files = {name: path for name, path in top.items() if name != CARD}
        card, kind = _model_card(directory, repo_id), MODEL
    else:
        hint = ""
        if get_latest_checkpoint(directory) is not None:
            hint = (f"; it has checkpoints but no final adapter (an interrupted run?): finish it with "
                    f"`bit-axon train --resume -o {directory}`")
        raise UploadError(
            f"{directory} holds neither a trained adapter ({BEST_ADAPTER} or {FINAL_ADAPTER}) nor a model "
            f"(config.json + *.safetensors){hint}"
        )
    users = directory / CARD
    if users.is_file():
        return UploadPlan(kind, files, users.read_text(encoding="utf-8"), card_is_users=True)
    return UploadPlan(kind, files, card)
