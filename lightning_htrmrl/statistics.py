"""The confidence intervals every figure here reports: Student-t, of a mean and of a difference of means."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def confidence_half_width(values: Sequence[float]) -> float | None:
    """Half-width of the Student-t 95 % confidence interval of the mean of ``values`` (independent
    samples: trials, evaluation rounds or seeds); None for fewer than 2 values."""
    if len(values) < 2:
        return None
    from scipy import stats  # scikit-learn's dependency; imported here to keep startup light

    spread = float(np.std(np.asarray(values, dtype=np.float64), ddof=1))
    return float(stats.t.ppf(0.975, len(values) - 1)) * spread / math.sqrt(len(values))


def difference_half_width(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Half-width of the Welch (Student-t, unequal variances) 95 % confidence interval of
    ``mean(a) - mean(b)`` for two independent samples (e.g. two variants' seeds); None unless each
    has at least 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    var_a, var_b = (float(np.var(np.asarray(x, dtype=np.float64), ddof=1)) / len(x) for x in (a, b))
    if var_a + var_b == 0.0:
        return 0.0
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return float(stats.t.ppf(0.975, dof)) * math.sqrt(var_a + var_b)
