"""The metrics' math, checked against independent scipy/numpy computations (no network, no images)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import scipy.stats

from d2ctool.evaluation.metrics import (StatsAccumulator, feature_stats, frechet_distance, frechet_distance_to,
                                        inception_score, manifold_radii, precision_recall)


pytestmark = pytest.mark.usefixtures("one_thread")


def scipy_fid(mu1, sigma1, mu2, sigma2):
    """The ADM evaluator's formula with scipy's matrix square root."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n, d", [(400, 16), (700, 128)])
def test_frechet_distance_matches_scipy_sqrtm(n, d):
    rng = np.random.default_rng(d)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) @ mix * 1.5 + 0.3
    mu1, sigma1 = np.mean(x, 0), np.cov(x, rowvar=False)
    mu2, sigma2 = np.mean(y, 0), np.cov(y, rowvar=False)
    expected = scipy_fid(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_to(x, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-9)  # symmetric
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-9 * np.trace(sigma1)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    # singular covariances: the factor path (n < d) and the eigendecomposition path agree with scipy
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 48)), rng.normal(size=(30, 48)) * 2 + 1
    mu1, sigma1 = feature_stats(x)
    mu2, sigma2 = feature_stats(y)
    expected = scipy_fid(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_to(x, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance_to(x, mu1, sigma1)) < 1e-9 * np.trace(sigma1)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_and_streaming_accumulator_match_numpy():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(1000, 32)) * 3 + 100).astype(np.float32)  # a large offset: the shifted sums matter
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), 0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    acc = StatsAccumulator(32)
    for start in range(0, len(x), 137):
        acc.add(x[start:start + 137])
    mu_s, sigma_s = acc.stats()
    np.testing.assert_allclose(mu_s, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_s, sigma, rtol=1e-9, atol=1e-9)


def independent_is(logits, split):
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    scores = []
    for start in range(0, len(probs), split):
        part = probs[start:start + split]
        marginal = part.mean(0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(p, marginal) for p in part])))
    return float(np.mean(scores))


def test_inception_score_matches_independent_computation_with_adm_splits():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1200, 50)) * 3  # splits of 500: 500, 500, 200 (the last one shorter, as ADM)
    assert inception_score(logits, 500) == pytest.approx(independent_is(logits, 500), rel=1e-10)
    assert inception_score(logits, 5000) == pytest.approx(independent_is(logits, 5000), rel=1e-10)
    # a classifier that is sure and spreads its votes evenly over C classes scores C
    confident = np.full((400, 8), -50.0)
    confident[np.arange(400), np.arange(400) % 8] = 50.0
    assert inception_score(confident, 400) == pytest.approx(8.0, rel=1e-9)


def test_inception_score_of_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(4).normal(size=(1, 1008)) * 5, (64, 1))
    assert inception_score(logits, 5000) == pytest.approx(1.0, abs=1e-12)


def adm_distances(u, v):
    """ADM's DistanceBlock: squared distances on float16-rounded features, rounded to float16 (scipy cdist)."""
    u16, v16 = u.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    return scipy.spatial.distance.cdist(u16, v16, "sqeuclidean").astype(np.float16).astype(np.float32)


def test_manifold_radii_are_the_kth_nearest_other_point():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(70, 20)).astype(np.float32)
    d = adm_distances(x, x)
    for k in (1, 3, 5):
        expected = np.sort(d, axis=1)[:, k]  # column 0 is the point itself
        np.testing.assert_allclose(manifold_radii(x, k, batch_size=16), expected, rtol=2e-3)


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(120, 16)).astype(np.float32)
    samples = (rng.normal(size=(90, 16)) * 1.3 + 0.4).astype(np.float32)
    r_ref = np.sort(adm_distances(ref, ref), axis=1)[:, 3]
    r_smp = np.sort(adm_distances(samples, samples), axis=1)[:, 3]
    precision = np.mean((adm_distances(samples, ref) <= r_ref[None, :]).any(1))
    recall = np.mean((adm_distances(ref, samples) <= r_smp[None, :]).any(1))
    got = precision_recall(ref, samples, k=3, batch_size=32)
    assert got == pytest.approx((precision, recall), abs=1e-12)
    assert 0 < precision < 1 and 0 < recall < 1  # a case that tests something


def test_precision_recall_constructed_cases():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(200, 32)).astype(np.float32)
    assert precision_recall(ref, ref.copy()) == (1.0, 1.0)  # identical sets
    far = ref + 100.0
    assert precision_recall(ref, far) == (0.0, 0.0)  # disjoint sets
    # every reference point among the samples plus as many far away: precision 1/2, recall 1
    half = np.concatenate([ref, ref + 100.0])
    precision, recall = precision_recall(ref, half)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(1.0)
    # samples collapsed onto a tenth of the reference: precise, poor recall
    collapsed = np.repeat(ref[:20], 10, axis=0)
    precision, recall = precision_recall(ref, collapsed)
    assert precision == 1.0 and recall < 0.3
