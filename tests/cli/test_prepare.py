import csv
import json
import sys

from bit_axon.cli.main import app
from bit_axon.training.data import AlpacaDataset, ORPODataset, SFTDataset, load_dataset_file

import pytest
from typer.testing import CliRunner

runner = CliRunner()

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]


@pytest.fixture
def datasets_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # Keep the datasets cache (lock files) out of the home directory and the hub out of reach.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(*args):
    # A wide terminal keeps rich from wrapping long tmp paths inside error boxes.
    result = runner.invoke(app, ["prepare", *map(str, args)], env={"COLUMNS": "500"})
    return result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_messages_jsonl(tmp_path, datasets_offline, qwen_tokenizer):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT, "id": i} for i in range(3)])
    out = tmp_path / "out" / "train.jsonl"
    result = prepare(source, "-o", out)
    assert result.exit_code == 0, result.output
    assert "Wrote 3 messages records" in result.output
    assert read_jsonl(out) == [{"messages": CHAT}] * 3
    assert type(load_dataset_file(out, qwen_tokenizer)) is SFTDataset


def test_sharegpt_json_array(tmp_path, datasets_offline, qwen_tokenizer):
    conversations = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    source = tmp_path / "in.json"
    source.write_text(json.dumps([{"conversations": conversations}] * 2))
    out = tmp_path / "out.jsonl"
    result = prepare(source, "--output", out)
    assert result.exit_code == 0, result.output
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert read_jsonl(out) == [{"messages": expected}] * 2
    assert len(SFTDataset(out, qwen_tokenizer)) == 2


def test_alpaca_csv_with_limit(tmp_path, datasets_offline, qwen_tokenizer):
    source = tmp_path / "in.csv"
    with open(source, "w", newline="") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        for i in range(5):
            writer.writerow({"instruction": f"Add {i} and 1.", "input": "" if i % 2 else "numbers", "output": f"00{i + 1}"})
    out = tmp_path / "out.jsonl"
    result = prepare(source, "-o", out, "--limit", 3)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert records == [
        {"instruction": "Add 0 and 1.", "input": "numbers", "output": "001"},
        {"instruction": "Add 1 and 1.", "output": "002"},
        {"instruction": "Add 2 and 1.", "input": "numbers", "output": "003"},
    ]
    assert type(load_dataset_file(out, qwen_tokenizer)) is AlpacaDataset


def test_preferences_parquet(tmp_path, datasets_offline, qwen_tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"prompt": ["Q1", "Q2"], "chosen": ["good 1", "good 2"], "rejected": ["bad 1", "bad 2"]})
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    out = tmp_path / "out.jsonl"
    result = prepare(source, "-o", out)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert records[1] == {
        "prompt": [{"role": "user", "content": "Q2"}],
        "chosen": [{"role": "assistant", "content": "good 2"}],
        "rejected": [{"role": "assistant", "content": "bad 2"}],
    }
    data = load_dataset_file(out, qwen_tokenizer)
    assert type(data) is ORPODataset and len(data) == 2


def test_preference_conversations_jsonl(tmp_path, datasets_offline):
    record = {
        "prompt": "Q",
        "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
    }
    source = write_jsonl(tmp_path / "in.jsonl", [record])
    out = tmp_path / "out.jsonl"
    assert prepare(source, "-o", out).exit_code == 0
    assert read_jsonl(out)[0]["chosen"] == [{"role": "assistant", "content": "good"}]


def test_format_forces_shape(tmp_path, datasets_offline):
    # A record that looks like a preference pair but is forced through as a chat.
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT, "chosen": "x", "rejected": "y"}])
    out = tmp_path / "out.jsonl"
    result = prepare(source, "-o", out, "--format", "messages")
    assert result.exit_code == 0, result.output
    assert read_jsonl(out) == [{"messages": CHAT}]
    result = prepare(source, "-o", out, "--format", "sharegpt")
    assert result.exit_code == 1
    assert f"{source}:1:" in result.output and "'from'" in result.output


def test_bad_format_and_bad_source(tmp_path, datasets_offline):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}])
    out = tmp_path / "out.jsonl"
    assert prepare(source, "-o", out, "--format", "yaml").exit_code == 2
    (tmp_path / "in.txt").write_text("hello\n")
    result = prepare(tmp_path / "in.txt", "-o", out)
    assert result.exit_code == 2 and ".jsonl" in result.output
    assert not out.exists()


def test_unconvertible_record_names_it_and_writes_nothing(tmp_path, datasets_offline):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}, {"messages": CHAT[:1]}])
    out = tmp_path / "out.jsonl"
    result = prepare(source, "-o", out)
    assert result.exit_code == 1
    assert f"{source}:2: conversation has no assistant turn" in result.output  # file:line, 1-based
    assert not out.exists()


def test_missing_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    result = prepare(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1
    assert "pip install 'bit-axon[prepare]'" in result.output


def test_hub_id_offline_fails_fast_naming_it(tmp_path, datasets_offline, monkeypatch):
    import bit_axon.cli.prepare as prepare_module

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(prepare_module, "hub_reachable", lambda timeout: False)
    result = prepare("some-org/some-dataset", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1
    assert "some-org/some-dataset: cannot reach the Hugging Face hub" in result.output


def test_missing_local_file(tmp_path, datasets_offline):
    result = prepare(tmp_path / "nope.jsonl", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "no such file" in result.output


def test_malformed_local_file_is_a_clean_error(tmp_path, datasets_offline):
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": [}\n')
    result = prepare(source, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1
    assert f"{source}:1: invalid JSON" in result.output


# ---- bad input: one line naming the path (and line), what to do, exit 1 -------------------------


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_empty_file(tmp_path, datasets_offline, suffix):
    source = tmp_path / f"empty{suffix}"
    source.write_text("")
    result = prepare(source, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1
    assert one_line(result) == f"{source} is empty: there is nothing to convert; pass a file holding records."


def test_output_is_a_directory(tmp_path, datasets_offline):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}])
    folder = tmp_path / "out"
    folder.mkdir()
    result = prepare(source, "-o", folder)
    assert result.exit_code == 1
    assert one_line(result) == f"{folder} is a directory: pass the JSONL file to write, e.g. -o {folder / 'train.jsonl'}"


def test_a_malformed_line_is_named_by_its_line(tmp_path, datasets_offline):
    source = tmp_path / "in.jsonl"
    lines = [json.dumps({"messages": CHAT})] * 4
    lines.insert(2, '{"messages": [}')
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = prepare(source, "-o", out)
    assert result.exit_code == 1
    assert one_line(result).startswith(f"{source}:3: invalid JSON")
    assert not out.exists()


def test_a_bad_record_after_a_blank_line_is_named_by_its_line(tmp_path, datasets_offline):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": CHAT[:1]}) + "\n")
    result = prepare(source, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1
    assert one_line(result) == f"{source}:3: conversation has no assistant turn"


def test_output_that_is_the_source_is_refused_and_the_source_kept(tmp_path, datasets_offline):
    source = write_jsonl(tmp_path / "in.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    before = source.read_bytes()
    result = prepare(source, "-o", source)
    assert result.exit_code == 1
    assert one_line(result) == f"--output {source} is the source file: converting would replace it; choose another --output"
    assert source.read_bytes() == before
