from bit_axon.training.packing import EOS_TOKEN_ID, PAD_TOKEN_ID, PackedBatch, SequencePacker, padding_row

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

E, P = EOS_TOKEN_ID, PAD_TOKEN_ID


def pack_all(examples, max_seq_len):
    packer = SequencePacker(max_seq_len, eos_token_id=E, pad_token_id=P)
    rows = []
    for ids, mask in examples:
        rows += packer.add_example(ids, mask)
    last = packer.flush()
    if last is not None:
        rows.append(last)
    assert packer.flush() is None
    return rows, packer


def test_guide_layout():
    rows, _ = pack_all([([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])], max_seq_len=8)
    assert rows == [
        PackedBatch([1, 2, 3, E, 4, 5, E, P], [0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 2]),
    ]


def test_example_that_does_not_fit_starts_a_new_row():
    rows, _ = pack_all([([1, 2, 3], [1, 1, 1]), ([4, 5, 6], [1, 1, 1])], max_seq_len=6)
    assert [r.token_ids for r in rows] == [[1, 2, 3, E, P, P], [4, 5, 6, E, P, P]]
    assert [r.segment_ids for r in rows] == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]


def test_full_row_is_emitted_at_once():
    packer = SequencePacker(4)
    assert packer.add_example([1, 2, 3], [1, 1, 1]) == [PackedBatch([1, 2, 3, E], [1, 1, 1, 0], [0, 0, 0, 0])]
    assert packer.flush() is None


def test_too_long_example_is_refused_not_cut():
    # The datasets cut once, to max_seq_len - 1; the packer never cuts again.
    packer = SequencePacker(4)
    with pytest.raises(ValueError, match="does not fit a row of max_seq_len=4"):
        packer.add_example([1, 2, 3, 4], [1, 1, 1, 1])
    assert packer.add_example([1, 2, 3], [1, 1, 1]) == [PackedBatch([1, 2, 3, E], [1, 1, 1, 0], [0, 0, 0, 0])]


def test_packed_batch_as_the_guide_writes_it():
    row = PackedBatch([1, 2, E, P], [1, 1, 0, 0])
    assert row.segment_ids == [0, 0, 0, 0]
    assert row == PackedBatch([1, 2, E, P], [1, 1, 0, 0], [0, 0, 0, 0])
    token_ids, loss_mask, segment_ids = PackedBatch([1], [1], [3])
    assert (token_ids, loss_mask, segment_ids) == ([1], [1], [3])


def test_bad_examples_rejected():
    packer = SequencePacker(8)
    with pytest.raises(ValueError, match="differ in length"):
        packer.add_example([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        packer.add_example([], [])
    with pytest.raises(ValueError, match="max_seq_len"):
        SequencePacker(1)
    with pytest.raises(ValueError, match="max_seq_len must be an integer"):
        SequencePacker(8.0)


def test_padding_row():
    assert padding_row(3) == PackedBatch([P, P, P], [0, 0, 0], [0, 0, 0])


examples_strategy = st.lists(
    st.integers(1, 24).flatmap(
        lambda n: st.tuples(
            # Real examples contain <|im_end|> and <|endoftext|> ids too, so include them.
            st.lists(st.sampled_from([0, 1, 7, 100, 151643, 151645, 151644]) | st.integers(0, 151664), min_size=n, max_size=n),
            st.lists(st.integers(0, 1), min_size=n, max_size=n),
        )
    ),
    min_size=0,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(examples=examples_strategy, max_seq_len=st.integers(2, 40))
def test_packing_invariants(examples, max_seq_len):
    limit = max_seq_len - 1
    # What a dataset built with this max_seq_len holds: examples cut to max_seq_len - 1.
    examples = [(ids[:limit], mask[:limit]) for ids, mask in examples]
    rows, _ = pack_all(examples, max_seq_len)
    expected = examples

    recovered = []
    for row in rows:
        assert len(row.token_ids) == len(row.loss_mask) == len(row.segment_ids) == max_seq_len
        segs = row.segment_ids
        # Segment ids count up from 0 in steps of one.
        assert segs[0] == 0
        assert all(b - a in (0, 1) for a, b in zip(segs, segs[1:], strict=False))
        pad = padding_positions(row)
        n_examples = segs[-1] + 1 - (1 if pad else 0)
        assert n_examples >= 1
        for s in range(n_examples):
            positions = [i for i, x in enumerate(segs) if x == s]
            ids = [row.token_ids[i] for i in positions]
            mask = [row.loss_mask[i] for i in positions]
            assert ids[-1] == E and mask[-1] == 0  # the separator closes each example, unmasked
            recovered.append((ids[:-1], mask[:-1]))
        assert all(row.token_ids[i] == P and row.loss_mask[i] == 0 and segs[i] == n_examples for i in pad)
        assert pad == list(range(max_seq_len - len(pad), max_seq_len))

    # Every token and mask bit, once and in order.
    assert recovered == expected
    # Greedy: a row ends early only because the next example would not fit.
    for row, nxt in zip(rows, rows[1:], strict=False):
        used = max_seq_len - len(padding_positions(row))
        first_next = nxt.segment_ids.count(0)
        assert used + first_next > max_seq_len


def padding_positions(row):
    """Positions of the trailing padding segment: an example's segment always ends with EOS, so the
    last segment is padding exactly when the row ends with PAD."""
    if row.token_ids[-1] != P:
        return []
    return [i for i, s in enumerate(row.segment_ids) if s == row.segment_ids[-1]]
