"""Model sources: what a path holds, and reading/writing models of every source.

``model_source`` is the one place where sources are told apart:

- ``bit-axon``: a Bit-Axon model directory, ``config.json`` (``model_type`` ``"bit_axon"``) plus
  ``*.safetensors``. A quantized model records ``{"mode", "bits", "group_size"}`` under
  ``quantization`` in its ``config.json``; loading rebuilds that structure before the codes go in;
- ``hf``: a Hugging Face / mlx-lm directory (``config.json`` with another ``model_type``) of any
  architecture mlx-lm supports, float or MLX-quantized (``bit_axon.sources.load_hf_directory``);
- ``gguf``: a GGUF file (``bit_axon.sources.load_gguf``);
- ``hub``: a hub id ``org/name`` that is not a local path, downloaded (config, tokenizer and
  safetensors files) and read as an ``hf`` directory.

``load_model``/``load_tokenizer``/``save_model`` work for every source. This module knows models
only; adapters go on top in ``bit_axon.inference.load``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from bit_axon.config import BitAxonConfig
from bit_axon.io import atomic_save_safetensors, atomic_write_bytes
from bit_axon.model import BitAxonModel
from bit_axon.quantization import quantization_spec, quantize_model
from bit_axon.quantization.model import check_finite
from bit_axon.sources import ChatTokenizer, load_gguf, load_hf_directory, read_gguf_tokenizer, save_pretrained
from bit_axon.sources.pretrained import PretrainedLMMixin
from bit_axon.tokenizer import TOKENIZER_FILES, QwenTokenizerWrapper, hub_unreachable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
BIT_AXON, HF, GGUF, HUB = "bit-axon", "hf", "gguf", "hub"
BIT_AXON_MODEL_TYPE = "bit_axon"
EXPECTED = "expected a model directory with config.json, a .gguf file or a hub id (org/name)"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def load_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a model directory's safetensors files (shards merged)."""
    path = Path(path)
    # Hidden files are never weights: an interrupted write's temporary (bit_axon.io) starts with ".".
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
        tensors = mx.load(str(file))
        check_finite(tensors, str(file))
        weights.update(tensors)
    return weights


def _read_model_type(config_file: Path) -> str | None:
    import json

    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a readable model config ({err})") from err


def model_source(path: str | Path) -> str:
    """What kind of model ``path`` holds (see the module docstring).

    Raises ``FileNotFoundError`` with one line saying what was expected when ``path`` holds no
    model this package can read.
    """
    given = str(path)
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"No config.json in {path}: not a model directory ({EXPECTED})")
        return BIT_AXON if _read_model_type(path / "config.json") == BIT_AXON_MODEL_TYPE else HF
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return GGUF
        raise FileNotFoundError(f"{path} is a file but not a .gguf model ({EXPECTED})")
    if HUB_ID.match(given):
        return HUB
    raise FileNotFoundError(f"Model directory not found: {path} ({EXPECTED})")


def hub_directory(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id``: from the cache, else downloaded (config,
    tokenizer and safetensors files). Fails within seconds when the hub cannot be reached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, HFValidationError):
        pass  # not cached: download below
    # snapshot_download retries a dead connection for a long time; a short probe fails fast instead.
    if why := hub_unreachable():
        raise FileNotFoundError(
            f"{repo_id} is not a local path, and as a hub id it cannot be downloaded: "
            f"the Hugging Face hub at {constants.ENDPOINT} cannot be reached ({why})"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (OSError, HFValidationError) as err:  # hub HTTP errors are OSErrors
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(f"Could not download model {repo_id} from the hub: {message}") from err


def load_bit_axon(path: Path) -> BitAxonModel:
    """Build the Bit-Axon model described by ``path/config.json`` and load its weights (strict)."""
    config = BitAxonConfig.load(path)
    model = BitAxonModel(config)
    if config.quantization is not None:
        # Replacing the (lazy, never evaluated) random float layers costs no compute.
        quantize_model(model, **quantization_spec(config.quantization))
    weights = load_weights(path)
    if config.weight_tying:
        # Reference checkpoints store the tied head too; it is the embedding by definition.
        weights.pop("lm_head.weight", None)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Weights in {path} do not match its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape {expected[name].shape}")
    model.load_weights(list(weights.items()))
    return model


# Readers by source: the path (as given) -> model.
_READERS: dict[str, Callable[[str], nn.Module]] = {
    BIT_AXON: lambda path: load_bit_axon(Path(path)),
    HF: lambda path: load_hf_directory(path)[0],
    GGUF: lambda path: load_gguf(path)[0],
    HUB: lambda repo_id: load_hf_directory(hub_directory(repo_id))[0],
}


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (quantization scales and biases too) to ``dtype``."""
    model.update(tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))


def load_model(path: str | Path, dtype: mx.Dtype | None = None) -> nn.Module:
    """The model at ``path``, any source ``model_source`` knows; ``dtype`` casts the stored
    floating-point weights. ``model.source`` is ``path`` as given (adapter files record it).
    Weights holding NaN or Inf are refused (``NonFiniteWeightsError`` naming the tensor and file)."""
    source = str(path)
    model = _READERS[model_source(path)](source)  # every reader checks that the weights are finite
    if dtype is not None:
        cast_floats(model, dtype)
    mx.eval(model.parameters())
    model.source = source
    return model


def _directory_tokenizer(path: Path, model_source_kind: str):
    if model_source_kind == HF:
        return ChatTokenizer.from_hf_directory(path)
    if any((path / n).is_file() for n in TOKENIZER_FILES):
        return QwenTokenizerWrapper(path)
    logger.info("%s has no tokenizer.json: using the bundled Qwen2.5 tokenizer", path)
    return QwenTokenizerWrapper()


def load_tokenizer(path: str | Path | None = None, override=None):
    """The tokenizer of the model at ``path``: ``override`` when given (an object is used as is, a
    str/path is a tokenizer id, file or directory), else the model's own: a Bit-Axon directory's
    ``tokenizer.json`` (else the bundled Qwen2.5 one), an HF directory's tokenizer files, a GGUF
    file's metadata. ``path=None`` (a model without a source) means the bundled Qwen2.5 tokenizer."""
    if override is not None:
        return override if not isinstance(override, (str, Path)) else QwenTokenizerWrapper(override)
    if path is None:
        logger.info("Using the bundled Qwen2.5 tokenizer")
        return QwenTokenizerWrapper()
    kind = model_source(path)
    if kind == GGUF:
        return ChatTokenizer.from_gguf_metadata(read_gguf_tokenizer(path), str(path))
    if kind == HUB:
        return ChatTokenizer.from_hf_directory(hub_directory(str(path)))
    return _directory_tokenizer(Path(path), kind)


def _source_tokenizer(model: nn.Module):
    """The tokenizer of the model's source, or None (logged) when the source has none."""
    source = getattr(model, "source", None)
    try:
        return None if source is None else load_tokenizer(source)
    except (ValueError, OSError) as err:  # e.g. a GGUF file without tokenizer metadata
        logger.warning("%s has no usable tokenizer (%s); the model is saved without tokenizer files", source, err)
        return None


def save_model(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Save ``model`` into directory ``path`` (atomic writes).

    A ``BitAxonModel``: ``config.json`` and ``model.safetensors``. A pretrained model: the mlx-lm /
    Hugging Face layout (``bit_axon.sources.saving``) plus its tokenizer files (``tokenizer``, else
    the tokenizer of the model's source), so the directory is self-contained. Non-finite weights or
    scales are refused before anything is written (``NonFiniteWeightsError``).
    """
    path = Path(path)
    weights = dict(tree_flatten(model.parameters()))
    check_finite(weights, f"{path} not written",
                 "a model with non-finite weights or scales is never saved (did a merged adapter diverge?)")
    if isinstance(model, PretrainedLMMixin):
        save_pretrained(model, path)
        tokenizer = tokenizer if tokenizer is not None else _source_tokenizer(model)
        if tokenizer is not None:
            tokenizer.save(path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
    model.config.save(path / "config.json")
    _keep_source_tokenizer(model, path)
    return path


def _keep_source_tokenizer(model: nn.Module, path: Path) -> None:
    """A Bit-Axon model from a directory that carries tokenizer files (a port, a distilled model)
    keeps them wherever it is saved (``merge``, ``quantize``), so its tokenizer goes with it."""
    from bit_axon.porting import TOKENIZER_FILES as CARRIED  # porting imports this module

    source = getattr(model, "source", None)
    if source is None or not Path(source).is_dir() or Path(source).resolve() == path.resolve():
        return
    for name in CARRIED:
        if (Path(source) / name).is_file():
            atomic_write_bytes(path / name, (Path(source) / name).read_bytes())


def output_vocab_size(model: nn.Module) -> int:
    """The number of logits the model's output head gives (every head type stores the vocabulary first)."""
    return model.output_head["weight"].shape[0]


def check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """Raise ``ValueError`` when the tokenizer makes ids beyond the model's vocabulary."""
    vocab = output_vocab_size(model)
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has only {vocab}; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
