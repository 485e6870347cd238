from bit_axon.training.convert import ConversionError, convert_record, detect_shape

import pytest

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_messages_and_conversations():
    assert convert_record({"messages": CHAT, "id": 3}) == {"messages": CHAT}
    extra = [{**m, "name": "x"} for m in CHAT]
    assert convert_record({"conversations": extra}) == {"messages": CHAT}
    assert detect_shape({"conversations": CHAT}) == "messages"


def test_sharegpt():
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    assert detect_shape(record) == "sharegpt"
    assert convert_record(record) == {"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}
    separate_system = {"conversations": record["conversations"][1:], "system": "Be brief."}
    assert convert_record(separate_system) == convert_record(record)
    with pytest.raises(ConversionError, match="unknown role 'alien'"):
        convert_record({"conversations": [{"from": "alien", "value": "x"}]})


def test_alpaca():
    assert detect_shape({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert convert_record({"instruction": "a", "input": "", "output": "b"}) == {"instruction": "a", "output": "b"}
    assert convert_record({"instruction": "a", "input": None, "output": "b"}) == {"instruction": "a", "output": "b"}
    assert convert_record({"instruction": "a", "input": "c", "output": "b", "text": "..."}) == {
        "instruction": "a", "input": "c", "output": "b",
    }
    # Readers type numeric answers as numbers; they are text to the model.
    assert convert_record({"instruction": "a", "output": 4}) == {"instruction": "a", "output": "4"}
    with pytest.raises(ConversionError, match="'output' must be a string"):
        convert_record({"instruction": "a", "output": None}, "alpaca")
    with pytest.raises(ConversionError, match="'output' must be a string"):
        convert_record({"instruction": "a", "output": True}, "alpaca")


def test_preferences():
    expected = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert convert_record({"prompt": "Q", "chosen": "good", "rejected": "bad"}) == expected
    ultrafeedback = {
        "prompt": "Q",
        "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
        "score_chosen": 9.0,
    }
    assert convert_record(ultrafeedback) == expected
    no_prompt = {k: v for k, v in ultrafeedback.items() if k != "prompt"}
    assert convert_record(no_prompt) == expected
    with pytest.raises(ConversionError, match="needs a 'prompt'"):
        convert_record({"chosen": "good", "rejected": "bad"})
    with pytest.raises(ConversionError, match="must be the assistant's response"):
        convert_record({"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "bad"})


def test_conversation_without_answer_and_unknown_shape():
    with pytest.raises(ConversionError, match="no assistant turn"):
        convert_record({"messages": CHAT[:1]})
    with pytest.raises(ConversionError, match="cannot tell the shape"):
        detect_shape({"text": "hello"})
    with pytest.raises(ConversionError, match="unknown shape"):
        convert_record({"messages": CHAT}, "csv")
