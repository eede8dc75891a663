"""Shared test data and independent float64 / mpmath references (no gmfast code inside)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import torch


def blobs(n, K, d, *, sep=3.0, seed=0, per_class_cov=False, scale_spread=1.0):
    """Gaussian classes with random means (spread ``sep``) and random covariances."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(K, d)) * sep
    y = np.arange(n) % K
    rng.shuffle(y)
    if per_class_cov:
        Z = np.empty((n, d))
        for k in range(K):
            M = rng.normal(size=(d, d)) / math.sqrt(d) * scale_spread + np.eye(d) * rng.uniform(0.5, 1.5)
            idx = y == k
            Z[idx] = mu[k] + rng.normal(size=(idx.sum(), d)) @ M.T
    else:
        M = rng.normal(size=(d, d)) / math.sqrt(d) + np.eye(d)
        Z = mu[y] + rng.normal(size=(n, d)) @ M.T
    return Z, y


def dual_norm(v, norm):
    """‖v‖_q for the dual q of the threat norm (2→2, ∞→1, 1→∞), float64, row-wise."""
    v = np.asarray(v, dtype=np.float64)
    if norm == 2:
        return np.sqrt((v * v).sum(-1))
    if norm == math.inf:
        return np.abs(v).sum(-1)
    if norm == 1:
        return np.abs(v).max(-1)
    raise ValueError(norm)


def linear_radius_bruteforce(Z, W, b, norm, cov=None):
    """Exact radius of the linear classifier argmax(W z + b), float64, all classes.

    Returns (pred, radius, binding_class, runner_up).
    """
    Z = np.asarray(Z, dtype=np.float64)
    L = Z @ W.T + b
    c = L.argmax(1)
    B, K = L.shape
    rad = np.full(B, np.inf)
    bind = np.full(B, -1)
    runner = np.full(B, -1)
    for i in range(B):
        best = np.inf
        second = None
        for j in range(K):
            if j == c[i]:
                continue
            dv = W[c[i]] - W[j]
            den = math.sqrt(dv @ cov @ dv) if norm == "mahalanobis" else dual_norm(dv, norm)
            m = L[i, c[i]] - L[i, j]
            r = m / den
            if r < best:
                best, bind[i] = r, j
            if second is None or m < second[0]:
                second = (m, j)
        rad[i] = max(best, 0.0)
        runner[i] = second[1]
    return c, rad, bind, runner


def mp_linear_radius(z, W, b, norm, dps=60):
    """Exact radius of argmax(W z + b) at the exact point z, in high precision.

    Returns (exact argmax, radius as mpf); the radius is 0 at a tie.
    """
    with mpmath.workdps(dps):
        zm = [mpmath.mpf(float(v)) for v in z]
        K = W.shape[0]
        L = [mpmath.fsum(mpmath.mpf(float(W[k, i])) * zm[i] for i in range(len(zm))) + mpmath.mpf(float(b[k]))
             for k in range(K)]
        c = max(range(K), key=lambda k: (L[k], -k))
        best = mpmath.inf
        for j in range(K):
            if j == c:
                continue
            dv = [mpmath.mpf(float(W[c, i])) - mpmath.mpf(float(W[j, i])) for i in range(W.shape[1])]
            if norm == 2:
                den = mpmath.sqrt(mpmath.fsum(x * x for x in dv))
            elif norm == math.inf:
                den = mpmath.fsum(abs(x) for x in dv)
            else:
                den = max(abs(x) for x in dv)
            best = min(best, (L[c] - L[j]) / den)
        return c, max(best, mpmath.mpf(0))


def quadratic_first_crossing(z, dirs, mus, precs, kappas, c):
    """Smallest t > 0 with f_j(z + t v) ≥ f_c(z + t v) for some j, over unit directions v.

    f_k(x) = κ_k − ½ (x−μ_k)ᵀP_k(x−μ_k); along a ray q_cj(t) = q + t gᵀv + ½ t² vᵀHv is an
    exact quadratic, so the crossing is solved in closed form (float64). Returns the
    minimum over directions and classes (inf if none crosses).
    """
    K = len(mus)
    best = np.inf
    wc = z - mus[c]
    fc = kappas[c] - 0.5 * wc @ precs[c] @ wc
    uc = precs[c] @ wc
    for j in range(K):
        if j == c:
            continue
        wj = z - mus[j]
        q = fc - (kappas[j] - 0.5 * wj @ precs[j] @ wj)
        g = precs[j] @ wj - uc  # gradient of q_cj
        H = precs[j] - precs[c]
        a2 = 0.5 * np.einsum("nd,de,ne->n", dirs, H, dirs)
        a1 = dirs @ g
        # roots of a2 t² + a1 t + q = 0, smallest positive
        disc = a1 * a1 - 4 * a2 * q
        with np.errstate(divide="ignore", invalid="ignore"):
            sq = np.sqrt(np.where(disc >= 0, disc, np.nan))
            cand = np.stack([(-a1 - sq) / (2 * a2), (-a1 + sq) / (2 * a2)], 1)
            lin = np.where(np.abs(a2) < 1e-300, -q / a1, np.nan)
        cand = np.concatenate([cand, lin[:, None]], 1)
        cand = np.where(cand > 0, cand, np.inf)
        best = min(best, np.nanmin(cand))
    return best


def dense_params(head):
    """(μ, P as dense (K,d,d), κ) of the certified classifier, float64 numpy."""
    p = head.classifier_params
    mu = p.mu.numpy()
    K, d = mu.shape
    if p.kind == "full":
        P = p.prec.numpy()
    elif p.kind == "diag":
        P = np.stack([np.diag(v) for v in p.prec.numpy()])
    else:
        P = np.stack([s * np.eye(d) for s in p.prec.numpy()])
    return mu, P, p.kappa.numpy()


def bound_reference(Z, mu, P, kappa):
    """The radius formula of DESIGN 1.4 in plain float64 numpy, exact curvature, all j."""
    K = len(mu)
    lam = np.zeros((K, K))
    for c in range(K):
        for j in range(K):
            if c != j:
                lam[c, j] = max(0.0, np.linalg.eigvalsh(P[c] - P[j])[-1])
    out_pred, out_r = [], []
    for z in Z:
        W = z - mu
        U = np.einsum("kij,kj->ki", P, W)
        f = kappa - 0.5 * (W * U).sum(1)
        c = int(f.argmax())
        r = np.inf
        for j in range(K):
            if j == c:
                continue
            q = f[c] - f[j]
            g = np.linalg.norm(U[c] - U[j])
            r = min(r, 0.0 if q <= 0 else 2 * q / (g + math.sqrt(g * g + 2 * lam[c, j] * q)))
        out_pred.append(c)
        out_r.append(r)
    return np.array(out_pred), np.array(out_r)


def random_head(kind, d, K, seed, *, uniform_priors=False):
    """A fitted head of ``kind`` with random float64 parameters (cheap for any shape)."""
    from gmfast import GaussianMixtureHead

    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, d, generator=g, dtype=torch.float64) * 2
    if uniform_priors:
        pri = torch.full((K,), 1.0 / K, dtype=torch.float64)
    else:
        pri = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
        pri /= pri.sum()
    if kind == "tied":
        X = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        cov = X @ X.T + 0.5 * torch.eye(d, dtype=torch.float64)
    elif kind == "full":
        X = torch.randn(K, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        cov = X @ X.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    elif kind == "diag":
        cov = torch.rand(K, d, generator=g, dtype=torch.float64) + 0.3
    else:
        cov = torch.rand(K, generator=g, dtype=torch.float64) + 0.3
    return GaussianMixtureHead.from_params(mu, cov, pri, kind)


def benchmark_module(name):
    """``benchmarks/<name>.py`` imported as a module (skips, saying why, where the checkout has
    no benchmarks directory)."""
    import importlib.util
    from pathlib import Path

    import pytest

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"benchmarks/{name}.py not in this checkout ({path})")
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
