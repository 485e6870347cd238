"""The dashboard's reads: only new complete lines, however the file grows; run names; the runs API."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bit_axon.serving import runs

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

records = st.lists(st.fixed_dictionaries({"step": st.integers(0, 10**6), "loss": st.floats(0, 100)}), max_size=8)


@settings(max_examples=60, deadline=None)
@given(written=records, cuts=st.lists(st.integers(0, 10**4), max_size=6))
def test_reading_from_the_last_offset_sees_each_line_once_however_the_file_grows(written, cuts):
    text = "".join(json.dumps(r) + "\n" for r in written).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        path.write_bytes(b"")
        seen, offset = [], 0
        # Append the file in arbitrary pieces (lines cut mid-way), reading after each.
        for cut in sorted({min(c, len(text)) for c in cuts}) + [len(text)]:
            path.write_bytes(text[:cut])
            new, offset = runs.read_new_records(path, offset)
            seen += new
    assert seen == written
    assert offset == len(text)


def test_a_bad_line_is_skipped_with_its_place_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    got, _ = runs.read_new_records(path, 0)
    assert got == [{"step": 1}, {"step": 2}]
    assert f"{path}: byte 12: not a JSON line" in caplog.text


def test_run_names_and_a_name_outside_the_root(tmp_path):
    for name in ("a", "b/c"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text("")
    assert set(runs.list_runs(tmp_path)) == {"a", "b/c"}
    with pytest.raises(ValueError, match="outside the runs directory"):
        runs.run_directory(tmp_path / "b", "../a")
    with pytest.raises(ValueError, match="not a run directory"):
        runs.run_directory(tmp_path, "b")


def test_the_metrics_api_reads_on_and_starts_over_when_the_file_is_rewritten(live_server, runs_root):
    run = runs_root / "api-run"
    run.mkdir()
    (run / "train_config.yaml").write_text("max_steps: 40\nlearning_rate: 0.001\n")
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        first = http.get("/api/metrics", params={"run": "api-run", "offset": 0}).json()
        assert [r["step"] for r in first["records"]] == [1, 2] and first["max_steps"] == 40
        with metrics.open("a") as f:
            f.write('ss": 2.0}\n')
        second = http.get("/api/metrics", params={"run": "api-run", "offset": first["offset"]}).json()
        assert [r["step"] for r in second["records"]] == [3] and not second["reset"]
        metrics.write_text('{"step": 1, "loss": 9.0}\n')  # a new run in the same directory
        third = http.get("/api/metrics", params={"run": "api-run", "offset": second["offset"]}).json()
        assert third["reset"] and third["records"] == [{"step": 1, "loss": 9.0}]
        missing = http.get("/api/metrics", params={"run": "nope"})
        assert missing.status_code == 404 and "not a run directory" in missing.json()["error"]["message"]
