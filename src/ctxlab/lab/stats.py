"""Mean, sample standard deviation and Welch's unequal-variance t-test (Welch 1947), via scipy."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value). A diverged run's NaN or inf makes the
    mean NaN or inf and the deviation NaN (``statistics.stdev`` cannot take them)."""
    if not all(math.isfinite(v) for v in values):
        return statistics.fmean(values), math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b) (``scipy.stats.ttest_ind(equal_var=False)``).

    None when either side has fewer than 2 values or a value that is not finite (a diverged run). When both sides have zero variance the test is
    undefined; then equal means give p = 1 and different means p = 0 (every seed agrees on a difference).
    """
    if len(a) < 2 or len(b) < 2 or not all(math.isfinite(v) for v in (*a, *b)):
        return None
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    try:
        from scipy.stats import ttest_ind
    except ImportError as e:  # pragma: no cover - scipy is in the lab extra
        raise ImportError("ctxlab lab report needs scipy for Welch's t-test: pip install 'ctxlab[lab]'") from e
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p
