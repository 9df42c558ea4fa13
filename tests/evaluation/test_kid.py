"""KID (clean-fid's kernel distance on our features) against a direct computation of the unbiased MMD²."""

from __future__ import annotations

import numpy as np

from d2ctool.evaluation.metrics import kernel_inception_distance


def unbiased_mmd2_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al.'s estimator written out: mean off-diagonal k(x, x') + k(y, y') minus 2 mean k(x, y)."""
    d, m = x.shape[1], len(x)
    kernel = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_equals_the_unbiased_mmd_over_the_whole_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 32)).astype(np.float32)
    y = (rng.normal(size=(60, 32)) * 1.3 + 0.2).astype(np.float32)
    # equal sizes under the subset size: every subset is the whole set, so the estimate is exact
    assert np.isclose(kernel_inception_distance(x, y, num_subsets=3), unbiased_mmd2_cubic(x.astype(np.float64),
                                                                                          y.astype(np.float64)))
    assert unbiased_mmd2_cubic(x, y) > 0.1


def test_kid_is_unbiased_near_zero_for_one_distribution_and_seeded():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(300, 16))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    assert (np.random.get_state()[1] == before).all()  # the global generator is left as it was
    assert first == kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    assert abs(first) < 0.05 and first != kernel_inception_distance(x, y, num_subsets=20, subset_size=100, seed=1)
