import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from bit_axon.training.data import (
    AlpacaDataset,
    CacheDataset,
    DatasetError,
    ORPODataset,
    PreferencePair,
    SFTDataset,
    detect_format,
    load_dataset_file,
    read_records,
)

import pytest

REPO = Path(__file__).resolve().parents[2]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain quantum entanglement."},
        {"role": "assistant", "content": "Quantum entanglement is a phenomenon..."},
    ],
    [
        {"role": "user", "content": "What is 23 + 41?"},
        {"role": "assistant", "content": "23 + 41 = 64."},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4.\nEasy!"},
    ],
    [
        {"role": "user", "content": "Write 'cat' in capital letters."},
        {"role": "assistant", "content": "CAT"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": ""},
    ],
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mask_runs(ids, mask):
    """Contiguous runs of ids where mask == 1."""
    runs, current = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.fixture(scope="module")
def sft(tmp_path_factory, qwen_tokenizer):
    path = write_jsonl(tmp_path_factory.mktemp("sft") / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    return SFTDataset(path, qwen_tokenizer)


def test_sft_tokens_equal_whole_template(sft, qwen_tokenizer):
    assert len(sft) == len(CONVERSATIONS)
    for (ids, mask), conversation in zip(sft, CONVERSATIONS, strict=True):
        assert ids == qwen_tokenizer.apply_chat_template(conversation)
        assert len(mask) == len(ids)
        assert set(mask) <= {0, 1}


def test_sft_mask_exactly_on_assistant_content_and_im_end(sft, qwen_tokenizer):
    for (ids, mask), conversation in zip(sft, CONVERSATIONS, strict=True):
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        runs = mask_runs(ids, mask)
        assert [qwen_tokenizer.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
        # The rest is the prompt side: headers, system/user turns and the newlines between turns.
        unmasked = qwen_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert "<|im_start|>assistant\n" in unmasked
        assert ids[-1] == qwen_tokenizer.encode("\n")[0] and mask[-1] == 0


def test_sft_mask_first_target_follows_assistant_header(sft, qwen_tokenizer):
    ids, mask = sft[0]
    header = qwen_tokenizer.encode("<|im_start|>assistant\n")
    start = mask.index(1)
    assert ids[start - len(header) : start] == header


def test_indexing_and_iteration(sft):
    assert sft[-1] == sft[len(sft) - 1]
    assert list(sft) == [sft[i] for i in range(len(sft))]
    with pytest.raises(IndexError):
        sft[len(sft)]


def test_json_array_file_works_like_jsonl(tmp_path, sft, qwen_tokenizer):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": c} for c in CONVERSATIONS], indent=2))
    assert list(SFTDataset(path, qwen_tokenizer)) == list(sft)


def test_alpaca(tmp_path, qwen_tokenizer):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Summarize the following text.", "input": "Long text here...", "output": "Short summary."},
            {"instruction": "Name a color.", "output": "Blue."},
            {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
        ],
    )
    data = AlpacaDataset(path, qwen_tokenizer)
    expected_users = ["Summarize the following text.\n\nLong text here...", "Name a color.", "Name a fruit."]
    for (ids, mask), user, answer in zip(data, expected_users, ["Short summary.", "Blue.", "Apple."], strict=True):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        assert ids == qwen_tokenizer.apply_chat_template(messages)
        assert [qwen_tokenizer.decode(r) for r in mask_runs(ids, mask)] == [answer + "<|im_end|>"]


ORPO_MESSAGES = {
    "prompt": [{"role": "user", "content": "Write a haiku about debugging."}],
    "chosen": [{"role": "assistant", "content": "Silent cursor blinks / Stack trace scrolls / Bug found"}],
    "rejected": [{"role": "assistant", "content": "Debugging is when you fix bugs in your code."}],
}
ORPO_STRINGS = {
    "prompt": "Write a haiku about debugging.",
    "chosen": "Silent cursor blinks / Stack trace scrolls / Bug found",
    "rejected": "Debugging is when you fix bugs in your code.",
}


def test_orpo_both_forms(tmp_path, qwen_tokenizer):
    with_system = {**ORPO_MESSAGES, "prompt": [{"role": "system", "content": "Be poetic."}, *ORPO_MESSAGES["prompt"]]}
    data = ORPODataset(write_jsonl(tmp_path / "p.jsonl", [ORPO_MESSAGES, ORPO_STRINGS, with_system]), qwen_tokenizer)
    assert len(data) == 3
    assert all(isinstance(p, PreferencePair) for p in data)
    assert data[0] == data[1]  # the string form is shorthand for one user / one assistant message

    for pair, record in zip(data, [ORPO_MESSAGES, ORPO_MESSAGES, with_system], strict=True):
        prompt = qwen_tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True)
        for ids, mask, key in [(pair.chosen_ids, pair.chosen_mask, "chosen"), (pair.rejected_ids, pair.rejected_mask, "rejected")]:
            assert ids[: len(prompt)] == prompt
            assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
            response = record[key][0]["content"]
            assert qwen_tokenizer.decode(ids[len(prompt) :]) == response + "<|im_end|>"
            assert ids == qwen_tokenizer.apply_chat_template(record["prompt"] + record[key])[:-1]


def test_detect_format_and_load(tmp_path, qwen_tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])
    orpo = write_jsonl(tmp_path / "orpo.jsonl", [ORPO_STRINGS])
    assert [detect_format(p) for p in (chat, alpaca, orpo)] == ["messages", "alpaca", "orpo"]
    assert type(load_dataset_file(chat, qwen_tokenizer, 64)) is SFTDataset
    assert type(load_dataset_file(alpaca, qwen_tokenizer, 64)) is AlpacaDataset
    assert type(load_dataset_file(orpo, qwen_tokenizer, 64)) is ORPODataset
    assert type(load_dataset_file(alpaca, qwen_tokenizer, 64, format="alpaca")) is AlpacaDataset
    with pytest.raises(DatasetError, match="missing field 'messages'"):
        load_dataset_file(alpaca, qwen_tokenizer, 64, format="messages")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset_file(alpaca, qwen_tokenizer, 64, format="csv")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "hello"}])
    with pytest.raises(DatasetError, match=r"unknown\.jsonl:1: unknown record format"):
        detect_format(unknown)


GOOD = json.dumps({"messages": CONVERSATIONS[1]})


@pytest.mark.parametrize(
    ("cls", "lines", "line", "message"),
    [
        (SFTDataset, [GOOD, '{"messages": [', GOOD], 2, "invalid JSON"),
        (SFTDataset, [GOOD, "", GOOD, json.dumps({"conversation": []})], 4, "missing field 'messages'"),
        (SFTDataset, [json.dumps({"messages": [{"role": "user"}]})], 1, "missing field 'content'"),
        (SFTDataset, [GOOD, json.dumps({"messages": [{"role": "robot", "content": "x"}]})], 2, "unknown role 'robot'"),
        (SFTDataset, [json.dumps({"messages": [{"role": "user", "content": "Hi"}]})], 1, "no assistant turn"),
        (SFTDataset, [json.dumps({"messages": [{"role": "user", "content": 3}]})], 1, "must be a string"),
        (SFTDataset, [json.dumps({"messages": []})], 1, "non-empty list"),
        (SFTDataset, ["[1, 2]"], 1, "expected a JSON object"),
        (AlpacaDataset, [json.dumps({"instruction": "x", "output": "y"}), json.dumps({"instruction": "x"})], 2, "missing field 'output'"),
        (ORPODataset, [json.dumps({"prompt": "x", "chosen": "y"})], 1, "missing field 'rejected'"),
        (ORPODataset, [json.dumps({**ORPO_STRINGS, "chosen": [{"role": "user", "content": "y"}]})], 1, "exactly one assistant"),
        (ORPODataset, [json.dumps({**ORPO_STRINGS, "prompt": [{"role": "bot", "content": "y"}]})], 1, "unknown role 'bot'"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, qwen_tokenizer, cls, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        cls(path, qwen_tokenizer)
    assert f"{path}:{line}:" in str(info.value)


def test_bad_record_in_json_array_names_its_line(tmp_path, qwen_tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},\n'
                    '  {"messages": [{"role": "user", "content": "no answer"}]}\n]\n')
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: conversation has no assistant turn")):
        SFTDataset(path, qwen_tokenizer)
    path.write_text('[\n  {"messages": []},\n  {"messages": \n]')
    with pytest.raises(DatasetError, match=re.escape(f"{path}:4: invalid JSON")):
        read_records(path)


@pytest.mark.parametrize("text", ["", "\n\n", "[]"])
def test_empty_file(tmp_path, qwen_tokenizer, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DatasetError, match=re.escape(f"{path}: no records")):
        SFTDataset(path, qwen_tokenizer)
    with pytest.raises(DatasetError, match="no records"):
        detect_format(path)


def test_missing_file(tmp_path, qwen_tokenizer):
    with pytest.raises(DatasetError, match="file not found"):
        SFTDataset(tmp_path / "nope.jsonl", qwen_tokenizer)


def test_too_long_examples_truncated_with_one_warning(tmp_path, qwen_tokenizer, caplog):
    long = {"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 60)}]}
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": CONVERSATIONS[2][:2]}, long, long])
    with caplog.at_level(logging.WARNING, logger="bit_axon.training.data"):
        data = SFTDataset(path, qwen_tokenizer, max_seq_len=32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 3 examples" in warnings[0] and f"{path}:2" in warnings[0]
    assert data.num_truncated == 2
    assert all(len(ids) <= 32 and len(mask) == len(ids) for ids, mask in data)
    full = qwen_tokenizer.apply_chat_template(long["messages"])
    # Cut once, to max_seq_len - 1: room for the EOS that packing appends, so packing never cuts.
    assert data[1][0] == full[:31]
    assert "max_seq_len - 1" in warnings[0]


def test_example_of_max_seq_len_minus_one_tokens_is_packed_whole(tmp_path, qwen_tokenizer, caplog):
    from bit_axon.training.collate import iterate_batches

    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three"}]
    length = len(qwen_tokenizer.apply_chat_template(messages))
    path = write_jsonl(tmp_path / "exact.jsonl", [{"messages": messages}])
    with caplog.at_level(logging.WARNING):
        data = SFTDataset(path, qwen_tokenizer, max_seq_len=length + 1)
        [batch] = iterate_batches(data, 1, length + 1, shuffle=False)
    assert not caplog.records and data.num_truncated == 0
    assert batch.token_ids[0].tolist() == data[0][0] + [data.eos_token_id]


@pytest.mark.parametrize("cls", [SFTDataset, AlpacaDataset, ORPODataset])
def test_datasets_carry_their_tokenizers_special_ids(tmp_path, qwen_tokenizer, cls):
    record = {"messages": CONVERSATIONS[0], **ORPO_STRINGS, "instruction": "a", "output": "b"}
    data = cls(write_jsonl(tmp_path / "d.jsonl", [record]), qwen_tokenizer)
    assert (data.eos_token_id, data.pad_token_id) == (qwen_tokenizer.eos_token_id, qwen_tokenizer.pad_token_id)
    assert (data.eos_token_id, data.pad_token_id) == (151645, 151643)


@pytest.mark.parametrize("max_seq_len", [1, 0, 2.5, True])
def test_bad_max_seq_len(tmp_path, qwen_tokenizer, max_seq_len):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 2"):
        SFTDataset(path, qwen_tokenizer, max_seq_len=max_seq_len)


def test_orpo_truncation_and_prompt_too_long(tmp_path, qwen_tokenizer, caplog):
    long_answer = {**ORPO_STRINGS, "chosen": " ".join(["word"] * 80)}
    path = write_jsonl(tmp_path / "p.jsonl", [ORPO_STRINGS, long_answer])
    with caplog.at_level(logging.WARNING, logger="bit_axon.training.data"):
        data = ORPODataset(path, qwen_tokenizer, max_seq_len=40)
    assert data.num_truncated == 1 and f"{path}:2" in caplog.text
    assert len(data[1].chosen_ids) == 40 and any(data[1].chosen_mask)

    long_prompt = {**ORPO_STRINGS, "prompt": " ".join(["word"] * 80)}
    path = write_jsonl(tmp_path / "q.jsonl", [ORPO_STRINGS, long_prompt])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: the prompt fills")):
        ORPODataset(path, qwen_tokenizer, max_seq_len=40)


def test_cache_dataset_builds_each_item_once():
    class Counting:
        def __init__(self):
            self.calls = []

        def __len__(self):
            return 3

        def __getitem__(self, i):
            self.calls.append(i)
            return ([i], [1])

    inner = Counting()
    cached = CacheDataset(inner)
    assert list(cached) == list(cached) == [([0], [1]), ([1], [1]), ([2], [1])]
    assert cached[-1] == ([2], [1])
    assert sorted(inner.calls) == [0, 1, 2]


EXAMPLES = {
    "sft.jsonl": (SFTDataset, 400),
    "sft_val.jsonl": (SFTDataset, 50),
    "alpaca.jsonl": (AlpacaDataset, 200),
    "orpo.jsonl": (ORPODataset, 200),
    "orpo_val.jsonl": (ORPODataset, 40),
}


def test_example_files_are_the_generator_output(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_examples.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in EXAMPLES:
        assert (tmp_path / name).read_text() == (REPO / "examples" / name).read_text(), name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_files_load(name, qwen_tokenizer):
    cls, count = EXAMPLES[name]
    data = load_dataset_file(REPO / "examples" / name, qwen_tokenizer, max_seq_len=128)
    assert type(data) is cls and len(data) == count and data.num_truncated == 0
    lengths = [len(item[0]) for item in data]
    assert max(lengths) <= 80 and len(set(lengths)) > 5


# --- a model's own chat template (SmolLM2: ChatML with a default system prompt) ------------------


def test_smollm2_sft_mask_exactly_on_assistant_contents_and_end_tokens(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    data = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS]), tok)
    for (ids, mask), conversation in zip(data, CONVERSATIONS, strict=True):
        assert ids == tok.apply_chat_template(conversation)
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        assert [tok.decode(r) for r in mask_runs(ids, mask)] == [a + "<|im_end|>" for a in answers]
        assert sum(mask) == sum(len(tok.encode(a)) + 1 for a in answers)  # every end token trained
    # Without a system message the template adds its own, which is prompt, never a target.
    ids, mask = data[1]
    default_system = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert ids[: len(default_system)] == default_system and not any(mask[: mask.index(1)])


def test_smollm2_alpaca_and_orpo_share_the_templated_prompt(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    alpaca = AlpacaDataset(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name a color.", "output": "Blue."}]), tok)
    ids, mask = alpaca[0]
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    assert ids == tok.apply_chat_template(messages)
    assert [tok.decode(r) for r in mask_runs(ids, mask)] == ["Blue.<|im_end|>"]

    multi_turn = {**ORPO_MESSAGES, "prompt": [*CONVERSATIONS[1][:2], {"role": "user", "content": "And a haiku?"}]}
    data = ORPODataset(write_jsonl(tmp_path / "p.jsonl", [ORPO_MESSAGES, ORPO_STRINGS, multi_turn]), tok)
    assert data[0] == data[1]
    for pair, record in zip(data, [ORPO_MESSAGES, ORPO_MESSAGES, multi_turn], strict=True):
        prompt = tok.apply_chat_template(record["prompt"], add_generation_prompt=True)
        assert pair.chosen_ids[: len(prompt)] == pair.rejected_ids[: len(prompt)] == prompt
        for ids, mask, key in [(pair.chosen_ids, pair.chosen_mask, "chosen"), (pair.rejected_ids, pair.rejected_mask, "rejected")]:
            # The prompt's own assistant turn is not a target: only the response and its end token.
            assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
            assert tok.decode(ids[len(prompt) :]) == record[key][0]["content"] + "<|im_end|>"
            assert ids == tok.apply_chat_template(record["prompt"] + record[key])[:-1]  # all but the final "\n"
    assert (data.eos_token_id, data.pad_token_id) == (2, 0)


# --- input that cannot teach anything, and files that are not data ------------------------------


def test_non_utf8_bytes_name_file_line_and_column(tmp_path, qwen_tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    message = re.escape(f"{path}:2: not UTF-8 text (byte 0xe9 at column 47)")
    with pytest.raises(DatasetError, match=message):
        SFTDataset(path, qwen_tokenizer)
    with pytest.raises(DatasetError, match=message):
        detect_format(path)


def test_a_directory_is_not_a_data_file(tmp_path, qwen_tokenizer):
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path} is a directory: pass a data file")):
        load_dataset_file(tmp_path, qwen_tokenizer)


def test_empty_assistant_replies_are_counted_and_a_file_of_only_those_refused(tmp_path, qwen_tokenizer, caplog):
    empty = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
    path = write_jsonl(tmp_path / "some.jsonl", [{"messages": CONVERSATIONS[1]}, empty, empty])
    with caplog.at_level(logging.WARNING, logger="bit_axon.training.data"):
        data = SFTDataset(path, qwen_tokenizer)
    assert len(data) == 3  # kept: the end-of-turn token is still a target
    [warning] = [r.getMessage() for r in caplog.records]
    assert "2 of 3 records have only empty assistant replies: nothing to learn from them" in warning
    assert f"(first: {path}:2)" in warning
    # A conversation with one empty reply among others still teaches: not counted.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bit_axon.training.data"):
        SFTDataset(write_jsonl(tmp_path / "mixed.jsonl", [{"messages": CONVERSATIONS[2]}]), qwen_tokenizer)
    assert not caplog.records
    path = write_jsonl(tmp_path / "all.jsonl", [empty, empty])
    with pytest.raises(DatasetError, match=re.escape(f"{path}: 2 of 2 records have only empty assistant replies")):
        SFTDataset(path, qwen_tokenizer)
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(DatasetError, match="empty assistant replies"):
        AlpacaDataset(path, qwen_tokenizer)


def test_preference_pairs_with_chosen_equal_to_rejected_are_counted_and_refused_when_all(tmp_path, qwen_tokenizer, caplog):
    same = {**ORPO_STRINGS, "rejected": ORPO_STRINGS["chosen"]}
    path = write_jsonl(tmp_path / "p.jsonl", [ORPO_STRINGS, same])
    with caplog.at_level(logging.WARNING, logger="bit_axon.training.data"):
        assert len(ORPODataset(path, qwen_tokenizer)) == 2
    [warning] = [r.getMessage() for r in caplog.records]
    assert "1 of 2 records have the same chosen and rejected response: they teach no preference" in warning
    assert f"(first: {path}:2)" in warning
    path = write_jsonl(tmp_path / "q.jsonl", [same, same])
    with pytest.raises(DatasetError, match=re.escape(f"{path}: 2 of 2 records have the same chosen and rejected")):
        ORPODataset(path, qwen_tokenizer)


def test_examples_whose_prompt_fills_max_seq_len_are_counted_and_refused_when_most(tmp_path, qwen_tokenizer, caplog):
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    long = {"messages": [{"role": "user", "content": " ".join(["word"] * 80)}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "some.jsonl", [short, long, short])
    with caplog.at_level(logging.WARNING, logger="bit_axon.training.data"):
        data = SFTDataset(path, qwen_tokenizer, max_seq_len=32)
    assert not any(data[1][1])
    lost = [r.getMessage() for r in caplog.records if "keep no answer tokens" in r.getMessage()]
    assert len(lost) == 1 and "1 of 3 examples" in lost[0] and f"first: {path}:2" in lost[0]
    path = write_jsonl(tmp_path / "most.jsonl", [long, short, long])
    with pytest.raises(DatasetError, match=re.escape(f"{path}: 2 of 3 examples keep no answer tokens when cut to 31")) as info:
        SFTDataset(path, qwen_tokenizer, max_seq_len=32)
    assert "--max-seq-len" in str(info.value)
