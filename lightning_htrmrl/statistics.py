"""The one confidence interval every figure here reports."""

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
