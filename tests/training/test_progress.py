"""Progress: plain lines when the output is not a terminal; a bar whose step counter survives 80 columns."""

import io
import re

from bit_axon.training.progress import StepProgress, format_duration

from rich.console import Console

RECORD = dict(loss=2.31412, learning_rate=1.2e-4, tokens_per_sec=812.4, peak_memory_gb=1.2)
ORPO_FIELDS = "margin +0.123 acc 0.75 chosen -1.2345 rejected -2.3456 log_odds 0.1234"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(steps, *, total=12, start=0, log_every=5, seconds_per_step=2.0, terminal=False, width=80,
         fields=lambda r: "", extra=None):
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system=None)
    clock = Clock()
    progress = StepProgress(console, True, fields, log_every, clock=clock)
    with progress.shown(total=total, completed=start):
        for step in steps:
            clock.now += seconds_per_step
            progress.update({**RECORD, **(extra or {}), "step": step})
    return out.getvalue()


def _steps(text):
    return [int(m) for m in re.findall(r"^step (\d+)/", text, re.M)]


def test_plain_lines_every_n_steps_plus_the_first_and_the_last():
    text = _run(range(1, 13))
    assert _steps(text) == [1, 5, 10, 12]
    # Step 5 after 10 s: 2 s a step, 7 steps to go.
    assert text.splitlines()[1] == "step 5/12 loss 2.3141 lr 1.2e-04 812 tok/s 1.20 GB eta 14s"
    assert text.splitlines()[-1] == "step 12/12 loss 2.3141 lr 1.2e-04 812 tok/s 1.20 GB"


def test_plain_lines_show_epoch_validation_and_the_trainers_fields():
    line = _run([1], extra={"epoch": 0.4, "val_loss": 2.1}, fields=lambda r: "margin +0.120").splitlines()[0]
    assert line == "step 1/12 epoch 0.40 loss 2.3141 lr 1.2e-04 812 tok/s 1.20 GB val 2.1000 margin +0.120 eta 22s"


def test_a_plain_line_at_least_every_30_seconds():
    assert _steps(_run(range(1, 8), log_every=100, seconds_per_step=31)) == list(range(1, 8))
    assert _steps(_run(range(1, 8), log_every=100, seconds_per_step=10)) == [1, 4, 7]


def test_a_run_that_stops_early_still_prints_its_last_step():
    assert _steps(_run(range(1, 8))) == [1, 5, 7]


def test_a_resumed_run_prints_its_first_step():
    assert _steps(_run(range(11, 15), total=20, start=10)) == [11, 14]


def test_plain_lines_are_never_cut_at_the_console_width():
    text = _run([1], width=40, fields=lambda r: ORPO_FIELDS)
    assert len(text.splitlines()) == 1 and text.rstrip().endswith(f"{ORPO_FIELDS} eta 22s")


def test_the_terminal_bar_keeps_the_step_counter_at_80_columns():
    text = _run([7], total=300, terminal=True, fields=lambda r: ORPO_FIELDS)
    last = text.split("\r")[-1].replace("\x1b[2K", "").split("\n")[0]
    assert last.startswith("step 7/300")
    assert "…" in last and len(last) <= 80  # the info text is what was cut
    assert "lr 1.2e-04" in last


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    progress = StepProgress(Console(file=out, force_terminal=False), False, lambda r: "", 1)
    with progress.shown(total=3, completed=0):
        progress.update({**RECORD, "step": 1})
    assert out.getvalue() == ""


def test_format_duration():
    assert [format_duration(s) for s in (0, 12.4, 250, 3600 + 5 * 60 + 9)] == ["0s", "12s", "4m10s", "1h05m"]
