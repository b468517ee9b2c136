"""The confidence intervals of ``lightning_htrmrl.statistics`` against scipy's own t-tests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lightning_htrmrl.statistics import confidence_half_width, difference_half_width

SEEDS_A = [0.842, 0.990, 0.899, 0.790, 0.844, 0.672]
SEEDS_B = [0.439, 0.660, 0.703]


def test_half_width_of_a_mean_is_scipys_student_t_interval() -> None:
    low, high = stats.ttest_1samp(SEEDS_A, 0.0).confidence_interval(0.95)
    assert confidence_half_width(SEEDS_A) == pytest.approx((high - low) / 2)
    assert confidence_half_width([0.5]) is None


def test_half_width_of_a_difference_is_scipys_welch_interval() -> None:
    low, high = stats.ttest_ind(SEEDS_A, SEEDS_B, equal_var=False).confidence_interval(0.95)
    assert (low + high) / 2 == pytest.approx(np.mean(SEEDS_A) - np.mean(SEEDS_B))
    assert difference_half_width(SEEDS_A, SEEDS_B) == pytest.approx((high - low) / 2)
    assert difference_half_width(SEEDS_A, [0.5]) is None
    assert difference_half_width([0.5, 0.5], [0.2, 0.2]) == 0.0
