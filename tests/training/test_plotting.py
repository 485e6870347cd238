"""loss.png: a log axis that one spike cannot flatten, a smoothed curve, resume marks (the data, not pixels)."""

from bit_axon.training.callbacks import read_metrics
from bit_axon.training.plotting import EMA_WEIGHT, ema, loss_figure, loss_series, plot_losses
from bit_axon.training.trainer import Trainer
from toy import config, copy_task, tiny_model, trainer_kwargs

import pytest


def _records(spike=151.0, offset=0.0):
    records = [{"step": s, "loss": 3.0 - 0.1 * s + offset} for s in range(1, 21)]
    records[2]["loss"] = spike  # step 3
    records[9]["val_loss"], records[19]["val_loss"] = 2.5 + offset, 1.5 + offset
    records[10]["resumed_from"] = 10  # the first record after a resume from step 10
    records[5]["loss"] = float("nan")  # a skipped step: not drawn
    return records


def test_ema_is_bias_corrected():
    assert ema([4.0]) == [4.0]
    smoothed = ema([4.0, 2.0])
    assert smoothed[1] == pytest.approx((EMA_WEIGHT * 0.1 * 4 + 0.1 * 2) / (1 - EMA_WEIGHT**2))


def test_a_spike_gets_a_log_axis_and_a_smoothed_curve_that_damps_it():
    series = loss_series(_records())
    assert series.yscale == "log" and series.ylim is None
    assert [s for s, _ in series.train] == [s for s in range(1, 21) if s != 6]
    assert dict(series.train)[3] == 151.0
    assert series.smoothed == list(zip([s for s, _ in series.train], ema([v for _, v in series.train]), strict=True))
    assert max(v for _, v in series.smoothed) < 151.0 / 2  # damped (bias correction weighs early points more)
    assert series.smoothed[0] == series.train[0]
    assert series.val == [(10, 2.5), (20, 1.5)]
    assert series.resumes == [10]


def test_non_positive_losses_get_a_linear_axis_clipped_below_the_spike():
    series = loss_series(_records(offset=-2.0))
    assert series.yscale == "linear"
    low, high = series.ylim
    assert high < 151.0 - 2.0
    assert high >= max(v for _, v in series.smoothed + series.val)
    assert low <= min(v for _, v in series.train)


def test_the_figure_draws_the_series():
    fig = loss_figure(_records())
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    raw, smoothed = lines["train loss"], lines[f"train loss, EMA {EMA_WEIGHT:g}"]
    assert raw.get_alpha() < 1 and smoothed.get_alpha() in (None, 1)
    assert list(smoothed.get_xdata()) == list(raw.get_xdata())
    assert list(lines["validation loss"].get_ydata()) == [2.5, 1.5]
    mark = lines["resumed"]
    assert list(mark.get_xdata()) == [10, 10] and mark.get_linestyle() == "--"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines)


def test_plot_losses_writes_a_png_or_nothing(tmp_path):
    assert plot_losses(_records(), tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_losses([{"step": 1, "loss": float("nan")}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_the_first_record_after_a_resume_says_where_it_resumed_from(tmp_path):
    for max_steps, resume in ((2, False), (4, True)):
        cfg = config(tmp_path, max_steps=max_steps, save_every=2)
        Trainer(tiny_model(), cfg, copy_task(20), **trainer_kwargs()).train(resume=resume)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("resumed_from") for r in records] == [None, None, 2, None]
