"""Diagnostics of the fit: held-out log-likelihood, KL estimates, Gaussianity of the latents.

Everything here is an **estimate**, never a guarantee: ``KL(P‖Q)`` between the data's law
and the fitted mixture is not observable from samples with a guarantee, so these numbers
help choose and check a model; the certificate that uses a KL bound
(:func:`gmfast.distributional.certified_accuracy_lower_bound`) is only as good as the bound
the user supplies.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from gmfast.head import GaussianMixtureHead
from gmfast.mixture import mixture_of, sample_class

__all__ = ["heldout_log_likelihood", "knn_kl_divergence", "joint_kl_estimate", "mahalanobis_gaussianity",
           "mahalanobis_sq"]


def heldout_log_likelihood(head, Z, y=None) -> float:
    """Average log-likelihood of held-out latents under the fitted mixture, nats per sample.

    With labels ``y``: the joint ``log π_y + log q(z | y)``; without: the marginal
    ``log Σ_k π_k q(z | k)`` (a log-sum-exp over ``head(Z)``, the (B, K) log-joint).
    Computed in float64.

    A **diagnostic** of fit (higher is better; compare heads on the same data), not a
    guarantee: ``KL(P‖Q) = −H(P) − E_P[log q]`` involves the unknown entropy ``H(P)``, so the
    log-likelihood ranks models but does not bound KL.
    """
    lj = head(torch.as_tensor(Z).double())
    if y is None:
        return float(torch.logsumexp(lj, 1).mean())
    y = torch.as_tensor(y).long()
    return float(lj.gather(1, y[:, None]).mean())


def knn_kl_divergence(Zp, Zq, k: int = 1) -> float:
    """k-nearest-neighbour estimate of ``KL(P‖Q)`` from samples (Wang, Kulkarni & Verdú 2009).

    ``D̂ = (d/n) Σ_i log(ν_k(i)/ρ_k(i)) + log(m/(n − 1))``, with ``ρ_k(i)`` the Euclidean
    distance from ``x_i`` (one of the ``n`` samples of P) to its k-th nearest neighbour among
    the other P samples and ``ν_k(i)`` to its k-th nearest among the ``m`` Q samples.

    An **estimate**, not a bound: consistent as ``n, m → ∞``, but biased at finite ``n`` and
    the bias grows quickly with the dimension ``d`` (neighbour distances concentrate; WKV
    2009 §IV), and it can come out negative. Draw ``Zq`` from the fitted mixture with
    :func:`gmfast.mixture.sample_mixture`.

    Parameters
    ----------
    Zp : (n, d) array_like, samples of P (no duplicate rows)
    Zq : (m, d) array_like, samples of Q
    k : int ≥ 1

    Returns
    -------
    float
    """
    P = torch.as_tensor(Zp).double()
    Q = torch.as_tensor(Zq).double()
    if P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[1]:
        raise ValueError(f"Zp and Zq must be (n, d) and (m, d); got {tuple(P.shape)} and {tuple(Q.shape)}")
    n, d = P.shape
    m = Q.shape[0]
    if k < 1 or n < k + 1 or m < k:
        raise ValueError(f"need k >= 1, more than k={k} samples of P and at least k of Q; got {n} and {m}")
    block = max(1, (1 << 22) // max(n, m))  # rows per block: bounded distance matrices
    total = 0.0
    for i in range(0, n, block):
        p = P[i:i + block]
        rows = torch.arange(p.shape[0])
        dpp = torch.cdist(p, P)
        dpp[rows, rows + i] = math.inf  # a point is not its own neighbour
        rho = dpp.kthvalue(k, dim=1).values
        if bool((rho == 0).any()):
            raise ValueError("Zp has duplicate rows: the k-NN estimator needs distinct samples (use k > 1 or dedupe)")
        nu = torch.cdist(p, Q).kthvalue(k, dim=1).values.clamp_min(1e-300)
        total += float(torch.log(nu / rho).sum())
    return d * total / n + math.log(m / (n - 1))


def joint_kl_estimate(head, Z, y, *, k: int = 1, max_per_class: int = 2000, seed: int = 0) -> float:
    """k-NN estimate of ``KL(P‖Q)`` for the joint law of (latent, label), from labelled samples.

    Chain rule: ``KL = KL(P_y‖π) + Σ_y P(y) KL(P_{z|y} ‖ Q_{z|y})``; the label term from the
    empirical class frequencies, each class term by :func:`knn_kl_divergence` between (at
    most ``max_per_class``) samples of the class and as many draws from the class's
    Gaussian (or component mixture). Negative class estimates are raised to 0 (KL ≥ 0).
    An **estimate** with the k-NN estimator's bias (large in high dimension with few samples
    per class), not a bound.
    """
    Z = torch.as_tensor(Z).double()
    y = torch.as_tensor(y).long()
    mix = mixture_of(head)
    K = mix.priors.shape[0]
    freq = torch.bincount(y, minlength=K).double() / len(y)
    kl = float(sum(f * math.log(f / p) for f, p in zip(freq.tolist(), mix.priors.tolist()) if f > 0))
    g = torch.Generator().manual_seed(seed)
    for c in range(K):
        Zc = Z[y == c]
        if Zc.shape[0] < k + 2:
            continue
        Zc = Zc[torch.randperm(Zc.shape[0], generator=g)[:max_per_class]]
        zq = sample_class(mix, c, Zc.shape[0], g)
        kl += float(freq[c]) * max(0.0, knn_kl_divergence(torch.unique(Zc, dim=0), zq, k=k))
    return kl


def mahalanobis_sq(head, Z, y) -> torch.Tensor:
    """Squared Mahalanobis distance of each row to its own class mean (B,), float64."""
    if not isinstance(head, GaussianMixtureHead):
        raise TypeError("the Mahalanobis Gaussianity check needs a GaussianMixtureHead (one Gaussian per class)")
    Z = torch.as_tensor(Z).double()
    y = torch.as_tensor(y).long()
    W = Z - head.means_[y]
    cov = head.covariances_
    kind = head.covariance_type
    if kind == "tied":
        L = torch.linalg.cholesky(cov)
        return torch.linalg.solve_triangular(L, W.T, upper=False).square().sum(0)
    if kind == "full":
        out = torch.empty(Z.shape[0], dtype=torch.float64)
        for k in range(head.n_classes_):  # per class: no (B, d, d) gather
            rows = (y == k).nonzero().reshape(-1)
            L = torch.linalg.cholesky(cov[k])
            out[rows] = torch.linalg.solve_triangular(L, W[rows].T, upper=False).square().sum(0)
        return out
    var = cov[y] if kind == "diag" else cov[y][:, None]
    return (W * W / var).sum(1)


def mahalanobis_gaussianity(head, Z, y) -> dict:
    """Per class: Kolmogorov–Smirnov test of squared Mahalanobis distances against ``χ²_d``.

    If class ``k``'s latents are ``N(μ_k, Σ_k)``, ``(z−μ_k)ᵀΣ_k⁻¹(z−μ_k) ~ χ²_d`` (with fitted
    parameters, approximately; use held-out ``Z``).

    Returns
    -------
    dict ``{class: (n, KS statistic, p-value)}`` for classes with at least 5 rows.

    A **diagnostic**: a tiny p-value says the class is not Gaussian in latent space (heavy
    tails, sub-clusters); a large one proves nothing about KL.
    """
    d2 = mahalanobis_sq(head, Z, y).numpy()
    y = np.asarray(torch.as_tensor(y))
    chi2 = stats.chi2(head.n_features_in_)
    out = {}
    for k in range(head.n_classes_):
        v = d2[y == k]
        if v.size >= 5:
            ks = stats.kstest(v, chi2.cdf)
            out[k] = (int(v.size), float(ks.statistic), float(ks.pvalue))
    return out
