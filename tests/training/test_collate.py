import itertools
import json
import logging

from bit_axon.training.collate import (
    IGNORE_INDEX,
    Batch,
    BatchCollator,
    OrpoBatch,
    collate_orpo,
    iterate_batches,
    iterate_orpo_batches,
)
from bit_axon.training.data import ORPODataset, PreferencePair, SFTDataset
from bit_axon.training.packing import EOS_TOKEN_ID, PAD_TOKEN_ID, PackedBatch

import mlx.core as mx
import numpy as np
import pytest

E, P = EOS_TOKEN_ID, PAD_TOKEN_ID


def toy_dataset(n=23, seed=0):
    """Examples whose first token is their index, so batches tell which example went where."""
    rng = np.random.default_rng(seed)
    data = []
    for i in range(n):
        length = int(rng.integers(2, 9))
        ids = [i] + rng.integers(1000, 2000, length - 1).tolist()
        data.append((ids, [0] + [1] * (length - 1)))
    return data


def examples_in(batches):
    """(first token, ids, mask) of every packed example, in order."""
    out = []
    for batch in batches:
        ids, mask, segs = (np.array(a) for a in batch)
        for row_ids, row_mask, row_segs in zip(ids, mask, segs, strict=True):
            # A row ending in PAD has a padding segment after its examples.
            n = row_segs[-1] if row_ids[-1] == P else row_segs[-1] + 1
            for s in range(n):
                sel = row_segs == s
                out.append((row_ids[sel][:-1].tolist(), row_mask[sel][:-1].astype(int).tolist()))
    return out


def test_shapes_and_dtypes():
    batches = list(iterate_batches(toy_dataset(), batch_size=3, max_seq_len=16, seed=0))
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.token_ids.shape == batch.loss_mask.shape == batch.segment_ids.shape == (3, 16)
        assert batch.token_ids.dtype == mx.int32
        assert batch.loss_mask.dtype == mx.float32
        assert batch.segment_ids.dtype == mx.int32
        assert set(np.unique(np.array(batch.loss_mask)).tolist()) <= {0.0, 1.0}


def test_one_epoch_holds_every_example_once_in_seeded_order():
    data = toy_dataset()
    batches = list(iterate_batches(data, batch_size=2, max_seq_len=16, seed=5))
    packed = examples_in(batches)
    order = np.random.default_rng(5).permutation(len(data)).tolist()
    assert [ids[0] for ids, _ in packed] == order
    assert packed == [data[i] for i in order]


def test_no_shuffle_keeps_file_order():
    data = toy_dataset()
    packed = examples_in(iterate_batches(data, batch_size=2, max_seq_len=16, shuffle=False))
    assert packed == data


def test_deterministic_for_a_seed():
    data = toy_dataset()

    def run(seed):
        return [tuple(np.array(a).tolist() for a in b) for b in iterate_batches(data, 2, 16, seed=seed)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_final_partial_batch_is_filled_with_masked_padding_rows():
    data = [([1, 2, 3], [1, 1, 1])] * 5  # one example per row at max_seq_len=4
    batches = list(iterate_batches(data, batch_size=3, max_seq_len=4, shuffle=False))
    assert len(batches) == 2
    last = batches[-1]
    assert np.array(last.token_ids).tolist() == [[1, 2, 3, E], [1, 2, 3, E], [P, P, P, P]]
    assert np.array(last.loss_mask).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_loop_runs_on_across_epochs_with_full_batches():
    data = toy_dataset(n=7)
    one_epoch = sum(len(ids) + 1 for ids, _ in data)
    batches = list(itertools.islice(iterate_batches(data, 2, 16, loop=True, seed=1), 12))
    assert len(batches) == 12 and all(b.token_ids.shape == (2, 16) for b in batches)
    packed = examples_in(batches)
    assert len(packed) * 7 > one_epoch  # more than one epoch of data went through
    first, second = [ids[0] for ids, _ in packed[:7]], [ids[0] for ids, _ in packed[7:14]]
    assert first == np.random.default_rng(1).permutation(7).tolist()
    assert second == np.random.default_rng(2).permutation(7).tolist()
    assert not (np.array(batches[-1].token_ids) == P).all(axis=1).any()  # no padding rows when looping


def test_iterator_never_cuts_examples(caplog):
    # Examples of max_seq_len - 1 tokens go in whole, silently; a longer one is a programming error
    # (the dataset, built with the same max_seq_len, cuts when it loads).
    data = [(list(range(1, 10)), [1] * 9), ([1, 2], [1, 1])]
    with caplog.at_level(logging.WARNING):
        batches = list(iterate_batches(data, 1, 10, shuffle=False))
    assert not caplog.records
    assert np.array(batches[0].token_ids).tolist() == [[*range(1, 10), E]]
    with pytest.raises(ValueError, match="does not fit a row of max_seq_len=10"):
        list(iterate_batches([(list(range(1, 11)), [1] * 10)], 1, 10))


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        next(iterate_batches([], 1, 8))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(toy_dataset(), 0, 8))


def test_batch_collator():
    rows = [PackedBatch([1, E, P], [1, 0, 0], [0, 0, 1])]
    batch = BatchCollator(batch_size=2)(rows)
    assert np.array(batch.token_ids).tolist() == [[1, E, P], [P, P, P]]
    assert np.array(batch.loss_mask).tolist() == [[1, 0, 0], [0, 0, 0]]
    assert np.array(batch.segment_ids).tolist() == [[0, 0, 1], [0, 0, 0]]
    assert BatchCollator()(rows).token_ids.shape == (1, 3)
    with pytest.raises(ValueError, match="same length"):
        BatchCollator()([rows[0], PackedBatch([1], [1], [0])])
    with pytest.raises(ValueError, match="do not fit"):
        BatchCollator(batch_size=1)(rows * 2)


def test_trainer_contract_mask_marks_assistant_targets(tmp_path, qwen_tokenizer):
    path = tmp_path / "chat.jsonl"
    conversations = [
        [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]
        for i in range(6)
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    batches = list(iterate_batches(SFTDataset(path, qwen_tokenizer), 2, 64, shuffle=False))
    targets = []
    for batch in batches:
        ids, mask = np.array(batch.token_ids), np.array(batch.loss_mask)
        # What the trainer trains on: targets token_ids[:, 1:] weighted by loss_mask[:, 1:].
        targets += [qwen_tokenizer.decode(row[1:][m[1:] == 1].tolist()) for row, m in zip(ids, mask, strict=True)]
    assert "".join(targets) == "".join(f"{i} + 1 = {i + 1}.<|im_end|>" for i in range(6))


def toy_pairs(n=9):
    # Pair i: prompt [i, i], chosen response of length 1 + i % 3, rejected of length 2.
    pairs = []
    for i in range(n):
        chosen = [1000 + i] * (1 + i % 3)
        pairs.append(PreferencePair([i, i, *chosen], [0, 0] + [1] * len(chosen), [i, i, 2000 + i, E], [0, 0, 1, 1]))
    return pairs


def test_collate_orpo_labels_and_padding():
    pairs = toy_pairs(3)
    batch = collate_orpo(pairs)
    assert isinstance(batch, OrpoBatch)
    assert all(a.shape == (3, 5) and a.dtype == mx.int32 for a in batch)
    assert np.array(batch.chosen_ids)[2].tolist() == [2, 2, 1002, 1002, 1002]
    assert np.array(batch.chosen_ids)[0].tolist() == [0, 0, 1000, P, P]
    assert np.array(batch.chosen_labels)[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 1000, IGNORE_INDEX, IGNORE_INDEX]
    assert np.array(batch.rejected_ids)[1].tolist() == [1, 1, 2001, E, P]
    assert np.array(batch.rejected_labels)[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 2001, E, IGNORE_INDEX]


def test_orpo_pairs_never_split():
    pairs = toy_pairs(9)
    batches = list(iterate_orpo_batches(pairs, batch_size=4, max_seq_len=16, seed=2))
    assert [b.chosen_ids.shape[0] for b in batches] == [4, 4, 1]
    seen = []
    for b in batches:
        chosen, rejected = np.array(b.chosen_ids), np.array(b.rejected_ids)
        assert (chosen[:, :2] == rejected[:, :2]).all()  # same pair on the same row
        assert chosen.shape[1] == max(len(pairs[i].chosen_ids) for i in chosen[:, 0])  # padded to this batch only
        seen += chosen[:, 0].tolist()
    assert seen == np.random.default_rng(2).permutation(9).tolist()


def test_orpo_loop_and_determinism():
    pairs = toy_pairs(5)

    def run():
        return [np.array(b.chosen_ids).tolist() for b in itertools.islice(iterate_orpo_batches(pairs, 2, 16, loop=True), 6)]

    first = run()
    assert first == run()
    assert all(len(rows) == 2 for rows in first)


def test_orpo_real_dataset_labels(tmp_path, qwen_tokenizer):
    path = tmp_path / "p.jsonl"
    records = [{"prompt": f"What is {i} + 2?", "chosen": f"{i + 2}.", "rejected": f"{i + 3}."} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = ORPODataset(path, qwen_tokenizer)
    for batch in iterate_orpo_batches(data, 2, 64, shuffle=False):
        for ids, labels in [(batch.chosen_ids, batch.chosen_labels), (batch.rejected_ids, batch.rejected_labels)]:
            ids, labels = np.array(ids), np.array(labels)
            keep = labels != IGNORE_INDEX
            assert (ids[keep] == labels[keep]).all()
            for row, row_labels in zip(ids, labels, strict=True):
                text = qwen_tokenizer.decode(row_labels[row_labels != IGNORE_INDEX].tolist())
                assert text.endswith(".<|im_end|>") and "What is" not in text
                assert "What is" in qwen_tokenizer.decode(row.tolist())


def test_orpo_iterator_never_cuts_pairs():
    pair = PreferencePair([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], [1, 2, 6], [0, 0, 1])
    batch = next(iterate_orpo_batches([pair], 1, 5))
    assert np.array(batch.chosen_ids).tolist() == [[1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="longer than max_seq_len=4"):
        next(iterate_orpo_batches([pair], 1, 4))
