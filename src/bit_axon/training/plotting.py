"""loss.png: training and validation loss against the step, from a run's metric records.

One early spike (a loss of 151 at step 3) on a linear axis flattens the rest of the run into a
line at the bottom, so the y axis is logarithmic whenever every loss plotted is positive; when
some are not (a loss that can go negative), it stays linear but is clipped to the smoothed curve
and the validation points, so a raw spike runs off the top instead of squashing the plot. The raw
train loss is drawn faintly under its exponential moving average, and a dashed vertical line marks
each step a run was resumed from (``resumed_from`` in the first record after a resume).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bit_axon.io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EMA_WEIGHT = 0.9  # the share of the previous smoothed value kept at each step
RESUMED_FROM = "resumed_from"  # a metrics record's key: the step this run resumed from


@dataclass
class LossSeries:
    """What loss.png shows, as data: each curve's (step, value) points and the y axis."""

    train: list[tuple[int, float]] = field(default_factory=list)
    smoothed: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    yscale: str = "log"
    ylim: tuple[float, float] | None = None  # None: matplotlib's own range


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """The exponential moving average of ``values``, bias-corrected (TensorBoard's smoothing), so the
    first points are not pulled towards 0."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_series(records: Iterable[Mapping[str, Any]]) -> LossSeries:
    """The curves and y axis of loss.png for ``records`` (metrics.jsonl rows)."""
    records = list(records)
    train = [(r["step"], float(r["loss"])) for r in records if _finite(r.get("loss"))]
    val = [(r["step"], float(r["val_loss"])) for r in records if _finite(r.get("val_loss"))]
    smoothed = list(zip([s for s, _ in train], ema([v for _, v in train]), strict=True))
    resumes = [int(r[RESUMED_FROM]) for r in records if RESUMED_FROM in r]
    values = [v for _, v in train + val]
    if all(v > 0 for v in values):
        return LossSeries(train, smoothed, val, resumes, "log")
    kept = [v for _, v in smoothed + val]
    low, high = min(values), max(kept)
    margin = 0.05 * (high - low) or 1.0
    return LossSeries(train, smoothed, val, resumes, "linear", (low - margin, high + margin))


def loss_figure(records: Iterable[Mapping[str, Any]]) -> Figure | None:
    """The loss.png figure of ``records``; None when there is nothing to plot."""
    series = loss_series(records)
    if not series.train and not series.val:
        return None
    # Imported here: matplotlib takes about a second to import, and only runs that plot need it.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))  # not pyplot: no global figure state to leak or close
    ax = fig.subplots()
    if series.train:
        ax.plot(*zip(*series.train, strict=True), color="C0", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(*zip(*series.smoothed, strict=True), color="C0", linewidth=1.5,
                label=f"train loss, EMA {EMA_WEIGHT:g}")
    if series.val:
        ax.plot(*zip(*series.val, strict=True), "o-", color="C1", label="validation loss")
    for n, step in enumerate(series.resumes):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="resumed" if n == 0 else None)
    ax.set_yscale(series.yscale)
    if series.ylim is not None:
        ax.set_ylim(*series.ylim)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if series.yscale == "log" else ""))
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_losses(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Write the loss curves of ``records`` (metrics.jsonl rows) to ``path`` as a PNG; None when there is nothing to plot."""
    fig = loss_figure(records)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
