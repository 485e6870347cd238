import gzip
import shutil

import bit_axon.tokenizer as tok
from bit_axon.tokenizer import (
    BUNDLED_TOKENIZER,
    QwenTokenizerWrapper,
    TokenizerLoadError,
    resolve_tokenizer_file,
)

import pytest

CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]
# <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n
CONVERSATION_IDS = [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198, 9707, 151645, 198]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    monkeypatch.setattr(tok, "hub_reachable", refuse)


def test_encode_known_ids(qwen_tokenizer):
    assert qwen_tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [151644, 872, 198, 13048, 151645]
    assert qwen_tokenizer.encode("") == []


def test_special_ids_and_vocab(qwen_tokenizer):
    assert qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.im_end_id == 151645
    assert qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.im_start_id == 151644
    assert qwen_tokenizer.vocab_size == 151665


def test_chat_template_ids_and_text(qwen_tokenizer):
    assert qwen_tokenizer.apply_chat_template(CONVERSATION) == CONVERSATION_IDS
    text = qwen_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = qwen_tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True)
    assert prompt == CONVERSATION_IDS[:6] + [151644, 77091, 198]
    assert qwen_tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=False).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_rejects_malformed_messages(qwen_tokenizer):
    with pytest.raises(ValueError, match="message 1"):
        qwen_tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user"}])


def test_decode(qwen_tokenizer):
    text = "Héllo, wörld! 23 + 41 = 64."
    assert qwen_tokenizer.decode(qwen_tokenizer.encode(text)) == text
    assert qwen_tokenizer.decode(CONVERSATION_IDS) == qwen_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert qwen_tokenizer.decode(CONVERSATION_IDS, skip_special_tokens=True) == "user\nHi\nassistant\nHello\n"


def test_encode_batch_matches_encode(qwen_tokenizer):
    texts = ["a b c", "", "<|im_end|>\n", "What is 23 + 41?"]
    assert qwen_tokenizer.encode_batch(texts) == [qwen_tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("name", [None, "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-0.5B-Instruct", "qwen/qwen2.5-7b"])
def test_qwen25_ids_use_bundled_copy_offline(name, no_network):
    assert resolve_tokenizer_file(name) == BUNDLED_TOKENIZER


def test_local_file_and_directory(tmp_path, no_network):
    assert resolve_tokenizer_file(BUNDLED_TOKENIZER) == BUNDLED_TOKENIZER
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    shutil.copy(BUNDLED_TOKENIZER, gz_dir / "tokenizer.json.gz")
    assert resolve_tokenizer_file(gz_dir) == gz_dir / "tokenizer.json.gz"

    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with gzip.open(BUNDLED_TOKENIZER, "rb") as src, open(plain_dir / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert resolve_tokenizer_file(plain_dir) == plain_dir / "tokenizer.json"
    tokenizer = QwenTokenizerWrapper(str(plain_dir))
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [151644, 872, 198, 13048, 151645]


def test_missing_local_paths(tmp_path, no_network):
    with pytest.raises(TokenizerLoadError, match="No tokenizer.json"):
        resolve_tokenizer_file(tmp_path)
    with pytest.raises(TokenizerLoadError, match="not found"):
        resolve_tokenizer_file(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(TokenizerLoadError, match="not found"):
        resolve_tokenizer_file("./nope/nope/nope")


def test_unknown_hub_id_offline_fails_fast_naming_it(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(repo_id, filename, **kwargs):
        assert kwargs.get("local_files_only"), "must not download when the hub is unreachable"
        raise LocalEntryNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    monkeypatch.setattr(tok, "hub_reachable", lambda timeout: False)
    with pytest.raises(TokenizerLoadError, match="some-org/some-model"):
        QwenTokenizerWrapper("some-org/some-model")


def test_hub_download_error_names_id(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(repo_id, filename, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in cache")
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(tok, "hub_reachable", lambda timeout: True)
    with pytest.raises(TokenizerLoadError, match="some-org/other-model.*connection reset"):
        resolve_tokenizer_file("some-org/other-model")


def test_cached_hub_tokenizer_is_used_without_network(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(BUNDLED_TOKENIZER))
    monkeypatch.setattr(tok, "hub_reachable", lambda timeout: pytest.fail("probed the network"))
    assert resolve_tokenizer_file("some-org/cached-model") == BUNDLED_TOKENIZER


def test_hub_offline_mode_is_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(tok.socket, "create_connection", lambda *a, **k: pytest.fail("opened a socket"))
    assert tok.hub_reachable(1.0) is False


def test_chat_pieces_are_chatml_with_assistant_targets(qwen_tokenizer):
    pieces = qwen_tokenizer.chat_pieces(CONVERSATION)
    assert "".join(text for text, _ in pieces) == qwen_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert [text for text, target in pieces if target] == ["Hello", "<|im_end|>"]
    assert [i for text, _ in pieces for i in qwen_tokenizer.encode(text)] == CONVERSATION_IDS


def test_stop_ids_end_a_turn_then_a_document(qwen_tokenizer):
    assert qwen_tokenizer.stop_token_ids == (151645, 151643)


def test_save_is_read_back_as_the_same_tokenizer(tmp_path, qwen_tokenizer):
    import json

    from bit_axon.sources import ChatTokenizer

    qwen_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    loaded = ChatTokenizer.from_hf_directory(tmp_path)
    for name in ("vocab_size", "eos_token_id", "pad_token_id", "stop_token_ids"):
        assert getattr(loaded, name) == getattr(qwen_tokenizer, name), name
    three_turns = [{"role": "system", "content": "Be kind."}, *CONVERSATION, {"role": "user", "content": "Héllo 你好"}]
    for generation_prompt in (False, True):
        for tokenize in (False, True):
            expected = qwen_tokenizer.apply_chat_template(three_turns, generation_prompt, tokenize)
            assert loaded.apply_chat_template(three_turns, generation_prompt, tokenize) == expected
    targets = [text for text, target in loaded.chat_pieces(CONVERSATION) if target]
    assert targets == ["Hello<|im_end|>"]  # the same target tokens as the ChatML pieces
