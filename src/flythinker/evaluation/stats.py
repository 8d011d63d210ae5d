"""Paired comparisons of two methods on the same records: difference and bootstrap interval.

Both methods are scored on the same records, so the comparison resamples *records* (with
replacement) and recomputes both sides on each resample: the interval then reflects how much the
difference depends on which records were drawn, not the spread of either method alone. A
statistic is a ratio of sums, ``sum(numerator) / sum(denominator)``: a mean of per-record scores
(denominator 1), or a loss per token (summed losses over summed tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flythinker.errors import FlyThinkerError


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # method minus baseline, on all records
    low: float  # 2.5th percentile of the bootstrap differences
    high: float  # 97.5th percentile
    n: int  # records

    @property
    def verdict(self) -> str:
        """"above" / "below" zero when the whole 95% interval is, else "overlaps"."""
        if self.low > 0:
            return "above"
        if self.high < 0:
            return "below"
        return "overlaps"


def paired_bootstrap(
    method: Sequence[float],
    baseline: Sequence[float],
    method_denominator: Sequence[float] | None = None,
    baseline_denominator: Sequence[float] | None = None,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDifference:
    """Difference of two ratio-of-sums statistics over the same records, with a percentile
    bootstrap interval (seeded, so a report is reproducible)."""
    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise FlyThinkerError(f"paired comparison needs two equal, non-empty lists of per-record values; got {a.shape} and {b.shape}")
    da = np.ones_like(a) if method_denominator is None else np.asarray(method_denominator, dtype=float)
    db = np.ones_like(b) if baseline_denominator is None else np.asarray(baseline_denominator, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = a[picks].sum(1) / da[picks].sum(1) - b[picks].sum(1) / db[picks].sum(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return PairedDifference(float(a.sum() / da.sum() - b.sum() / db.sum()), float(low), float(high), len(a))
