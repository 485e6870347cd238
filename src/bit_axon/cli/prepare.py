"""``bit-axon prepare``: convert a Hugging Face dataset or a local data file into training JSONL."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from bit_axon.io import atomic_write_text
from bit_axon.tokenizer import HUB_PROBE_TIMEOUT_S, hub_reachable
from bit_axon.training.convert import SHAPES, ConversionError, convert_record, detect_shape
from bit_axon.training.records import DatasetError, iter_records

import typer

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


def _numbered(rows: Iterable[dict[str, Any]], source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((f"{source}: record {n}", row) for n, row in enumerate(rows, start=1))


def _csv_text_features(datasets, path: Path):
    # CSV cells are text: typed by inference, "007" would arrive as the number 7.
    with open(path, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in columns})


def _load_rows(source: str, split: str, subset: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The source's rows, each with where it is for messages (``file:line`` for JSON files)."""
    try:
        import datasets
    except ImportError:
        typer.echo(
            "bit-axon prepare needs the 'datasets' package: pip install 'bit-axon[prepare]'", err=True
        )
        raise typer.Exit(1) from None
    path = Path(source).expanduser()
    if path.exists():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None or not path.is_file():
            raise typer.BadParameter(
                f"{source}: local sources must be one {', '.join(LOCAL_BUILDERS)} file", param_hint="SOURCE"
            )
        if not path.read_bytes().strip():
            _fail(f"{source} is empty: there is nothing to convert; pass a file holding records.")
        if builder == "json":  # read here, so that every message names the record's file:line
            return ((record.where, record.data) for record in iter_records(path))
        options = {"features": _csv_text_features(datasets, path)} if builder == "csv" else {}
        # Streaming reads rows as they are needed and writes no Arrow cache.
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
        except StopIteration:  # the reader found no first row to infer columns from
            _fail(f"{source} holds no records: there is nothing to convert.")
        return _numbered(rows, source)
    if path.suffix.lower() in LOCAL_BUILDERS or source.startswith((".", "/", "~")):
        raise typer.BadParameter(f"{source}: no such file", param_hint="SOURCE")
    return _numbered(_load_hub_rows(datasets, source, split, subset), source)


def _load_hub_rows(datasets, source: str, split: str, subset: str | None):
    from huggingface_hub import constants

    # The hub client retries a dead connection for ~25 s; in offline mode datasets uses its cache.
    if not constants.HF_HUB_OFFLINE and not hub_reachable(HUB_PROBE_TIMEOUT_S):
        typer.echo(
            f"{source}: cannot reach the Hugging Face hub (offline?). Pass a local file, or set "
            "HF_HUB_OFFLINE=1 to use a cached copy of the dataset.",
            err=True,
        )
        raise typer.Exit(1)
    try:
        return datasets.load_dataset(source, subset, split=split, streaming=True)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        typer.echo(f"{source}: could not load the dataset: {e}", err=True)
        raise typer.Exit(1) from None


def prepare(
    source: str = typer.Argument(..., help="Hugging Face dataset id, or a local .json/.jsonl/.csv/.parquet file."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write."),
    split: str = typer.Option("train", help="Dataset split (hub datasets; a local file is one split)."),
    limit: int | None = typer.Option(None, min=1, help="Convert at most this many records."),
    format: str = typer.Option(
        "auto", "--format", "-f", help=f"Record shape: auto or one of {', '.join(SHAPES)}."
    ),
    subset: str | None = typer.Option(None, help="Dataset configuration name (hub datasets that have several)."),
) -> None:
    """Convert a dataset (chat messages, ShareGPT, Alpaca or preference pairs) into training JSONL."""
    if format != "auto" and format not in SHAPES:
        raise typer.BadParameter(f"expected auto or one of {', '.join(SHAPES)}", param_hint="--format")
    if output.is_dir():
        _fail(f"{output} is a directory: pass the JSONL file to write, e.g. -o {output / 'train.jsonl'}")
    if Path(source).expanduser().resolve() == output.expanduser().resolve():
        _fail(f"--output {output} is the source file: converting would replace it; choose another --output")
    rows = _load_rows(source, split, subset)
    shape = None if format == "auto" else format
    lines: list[str] = []
    try:
        for where, row in itertools.islice(rows, limit):
            try:
                shape = shape or detect_shape(row)
                lines.append(json.dumps(convert_record(row, shape), ensure_ascii=False))
            except ConversionError as e:
                _fail(f"{where}: {e}")
    except DatasetError as e:  # a local JSON file's own: names file:line
        _fail(str(e))
    except (ValueError, OSError) as e:  # the reader's own: malformed rows, an unreadable file, the network
        _fail(f"{source}: could not read record {len(lines) + 1}: {e}")
    if not lines:
        _fail(f"{source}: no records to convert")
    try:
        atomic_write_text(output, "\n".join(lines) + "\n")
    except OSError as e:
        _fail(f"Could not write {output}: {e.strerror or e}; choose another --output.")
    written = "messages" if shape == "sharegpt" else shape
    typer.echo(f"Wrote {len(lines)} {written} records to {output}")
