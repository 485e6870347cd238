"""The engine's pieces that need no server: stop strings over streamed text, request checks, cancel."""

from __future__ import annotations

import threading

from bit_axon.serving.engine import Engine, Finished, GenerationRequest, StopText

import pytest
from hypothesis import given
from hypothesis import strategies as st

text = st.text(alphabet="abc ", max_size=30)


def stop_reference(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """Plainly: after each piece, look for the stop strings in all the text so far."""
    seen = ""
    for piece in pieces:
        seen += piece
        found = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if found:
            return seen[: min(found)], True
    return seen, False


@given(pieces=st.lists(text, max_size=12), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3))
def test_stop_text_equals_searching_all_the_text_after_each_piece(pieces, stops):
    matcher = StopText(stops)
    shown = [matcher.feed(p) for p in pieces]
    out = "".join(shown) + matcher.flush()
    assert (out, matcher.stopped) == stop_reference(pieces, stops)
    # What was shown never has to be taken back: every piece shown is final.
    assert all(not any(s in "".join(shown[: i + 1]) for s in stops) for i in range(len(shown)))


def test_stop_text_never_shows_a_stop_string_split_over_pieces():
    matcher = StopText(["<END>"])
    shown = [matcher.feed(p) for p in ["hello <E", "N", "D> more"]]
    assert shown == ["hello ", "", ""] and matcher.stopped


@pytest.fixture(scope="module")
def engine(served):
    with Engine(list(served.values()), max_batch=2) as engine:
        yield engine


def run(engine, request):
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    job = engine.submit(request, emit)
    return job, events, done


def test_requests_are_checked_before_they_queue(engine, served):
    limit = served["tiny-llama"].context_length
    with pytest.raises(KeyError):
        engine.submit(GenerationRequest("nope", [1, 2], 4), print)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit(GenerationRequest("tiny-llama", [], 4), print)
    with pytest.raises(ValueError, match=f"reads at most {limit}"):
        engine.submit(GenerationRequest("tiny-llama", [5] * limit, 4), print)


def test_more_requests_than_rows_wait_their_turn_and_all_finish(engine):
    jobs = [run(engine, GenerationRequest("tiny-bitaxon", [5, 6, 7 + i], 6)) for i in range(5)]
    for _, events, done in jobs:
        assert done.wait(60)
        assert isinstance(events[-1], Finished) and events[-1].reason in ("stop", "length")
    assert engine.largest_batch <= 2


def test_a_cancelled_request_finishes_as_cancelled(engine):
    job, events, done = run(engine, GenerationRequest("tiny-llama", [5, 6], 80, stop=("<never>",)))
    job.cancel()
    assert done.wait(60)
    assert events[-1].reason == "cancelled"
    assert engine.active == 0
