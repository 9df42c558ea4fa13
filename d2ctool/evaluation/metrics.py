"""The metrics, as pure math on features (numpy in, floats out): the ADM evaluator's definitions.

- FID: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) over pool_3 statistics (mean, unbiased covariance).
- Inception Score: softmax of pool_3 @ W (no bias) per sample; consecutive splits of 5,000 samples (the last may
  be shorter), exp(mean KL(p(y|x) || p(y))) per split, averaged over the splits.
- Precision/recall (Kynkaanniemi et al. 2019, as ADM computes it): each set's manifold is the union of balls
  around its points with radius the squared distance to the k-th nearest other point (k = 3); precision is the
  fraction of samples inside the reference manifold, recall the fraction of reference points inside the sample
  manifold (a point is inside when its squared distance to a centre is <= that centre's radius).
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) in float64, as np.mean / np.cov(rowvar=False)."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {len(x)}")
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


class StatsAccumulator:
    """Streaming mean and unbiased covariance (float64 sums), for sets too large to hold in memory."""

    def __init__(self, dim: int, device="cpu"):
        import torch

        self.n = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        # shift by the first batch's mean so the sums stay well conditioned
        self.shift = None

    def add(self, features: np.ndarray) -> None:
        import torch

        x = torch.as_tensor(np.asarray(features), device=self.total.device).double()
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 feature vectors, got {self.n}")
        mean = self.total / self.n
        cov = (self.outer - self.n * mean[:, None] * mean[None, :]) / (self.n - 1)
        return (mean + self.shift).cpu().numpy(), cov.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None, device="cpu") -> float:
    """Fréchet distance between two Gaussians: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, computed (float64) as those of
    L^T S2 L for any factor S1 = L L^T: symmetric positive semi-definite, so there are no complex parts and no
    singular-product fallback (the ADM evaluator uses scipy's sqrtm, adding 1e-6 to the diagonals when the
    product is singular). L is `factor1` when given (e.g. centred features / sqrt(n - 1), cheap when n < d),
    else the Cholesky factor of S1, else (S1 singular) V diag(sqrt(w)) from its eigendecomposition.
    """
    import torch

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)

    mu1, mu2 = t(np.atleast_1d(mu1)), t(np.atleast_1d(mu2))
    sigma1, sigma2 = t(np.atleast_2d(sigma1)), t(np.atleast_2d(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or tuple(sigma1.shape) != tuple(mu1.shape) * 2:
        raise ValueError(f"statistics of different dimensions: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    if factor1 is not None:
        factor = t(factor1)
    else:
        factor, status = torch.linalg.cholesky_ex(sigma1)
        if status.item() != 0 or not torch.isfinite(factor).all():
            w, v = torch.linalg.eigh(sigma1)
            factor = v * w.clamp_min(0).sqrt()
    product = factor.T @ sigma2 @ factor
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
    tr_covmean = eigenvalues.clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def frechet_distance_to(features: np.ndarray, mu2, sigma2, device="cpu") -> float:
    """FID of a feature set against (mu2, sigma2); with fewer vectors than dimensions the centred features
    themselves factor the covariance (an n x n eigenproblem instead of d x d)."""
    x = np.asarray(features, dtype=np.float64)
    mu, sigma = feature_stats(x)
    factor = ((x - mu) / np.sqrt(len(x) - 1)).T if len(x) <= x.shape[1] else None
    return frechet_distance(mu, sigma, mu2, sigma2, factor, device)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's Inception Score from the logits (pool_3 @ W, no bias): mean over consecutive splits of split_size."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        raise ValueError("the Inception Score needs at least one sample")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = (p * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _torch(x, device):
    import torch

    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)


def pairwise_sq_distances(u, v):
    """Squared Euclidean distances between rows, as ADM's DistanceBlock: max(|u|^2 - 2 u.v + |v|^2, 0) on the
    features rounded to float16, the result rounded to float16; in float32 where float16 would overflow."""
    import torch

    def block(a, b):
        d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
        return d.clamp_min_(0)

    d16 = block(u.half().float(), v.half().float()).half()
    if torch.isfinite(d16).all():
        return d16.float()
    return block(u, v)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 10000, device="cpu") -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set (the point itself, at
    distance 0, is the 0-th, as in ADM's `np.partition(..., k)`)."""
    import torch

    x = _torch(features, device)
    if len(x) <= k:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} points, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float32, device=device)
    for start in range(0, len(x), batch_size):
        d = pairwise_sq_distances(x[start:start + batch_size], x)
        radii[start:start + batch_size] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return radii.cpu().numpy()


def _inside(points, centres, radii, batch_size: int):
    """For each point: is it within the radius of any centre?"""
    import torch

    result = torch.empty(len(points), dtype=torch.bool, device=points.device)
    for start in range(0, len(points), batch_size):
        d = pairwise_sq_distances(points[start:start + batch_size], centres)
        result[start:start + batch_size] = (d <= radii[None, :]).any(dim=1)
    return result


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, batch_size: int = 10000,
                     device="cpu") -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` pool features with k-NN manifolds."""
    ref, smp = _torch(reference, device), _torch(samples, device)
    ref_radii = _torch(manifold_radii(reference, k, batch_size, device), device)
    smp_radii = _torch(manifold_radii(samples, k, batch_size, device), device)
    precision = _inside(smp, ref, ref_radii, batch_size).double().mean().item()
    recall = _inside(ref, smp, smp_radii, batch_size).double().mean().item()
    return float(precision), float(recall)


def kernel_inception_distance(samples: np.ndarray, reference: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018): the unbiased MMD² between two feature sets under the cubic polynomial kernel
    k(x, y) = (x·y / d + 1)³, averaged over `num_subsets` random subsets of min(n, m, subset_size) rows.
    Unbiased at any sample count, unlike FID. clean-fid's `kernel_distance` on our own features; its subsets
    come from numpy's global generator, which is seeded here and restored afterwards."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(samples.astype(np.float64), reference.astype(np.float64), num_subsets, subset_size)
    finally:
        np.random.set_state(state)
