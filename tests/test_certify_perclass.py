"""Per-class covariances: the sound l2 radius against attacks and independent references."""

import math

import mpmath
import numpy as np
import pytest
import torch
from helpers import blobs, bound_reference, dense_params, quadratic_first_crossing

from gmfast import GaussianMixtureHead as Head

BACKENDS = ["reference", "cpu"]
KINDS = ["full", "diag", "spherical"]


@pytest.fixture(scope="module", params=KINDS)
def fitted(request):
    Z, y = blobs(1500, 5, 4, sep=1.2, seed=51, per_class_cov=True, scale_spread=0.8)
    return Z, y, Head(request.param).fit(Z, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_equals_float64_formula(fitted, backend):
    Z, y, head = fitted
    mu, P, kappa = dense_params(head)
    pred_ref, r_ref = bound_reference(Z[:400], mu, P, kappa)
    exact = head.certify(torch.tensor(Z[:400]), fp_sound=False, backend=backend, curvature="exact")
    sound = head.certify(torch.tensor(Z[:400]), backend=backend, curvature="exact")
    assert (exact.prediction.numpy() == pred_ref).all()
    np.testing.assert_allclose(exact.radius.numpy(), r_ref, rtol=1e-8, atol=1e-12)
    assert (sound.radius.numpy() <= r_ref).all()
    np.testing.assert_allclose(sound.radius.numpy(), r_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attack_never_beats_the_radius(fitted, backend, dtype):
    Z, y, head = fitted
    mu, P, kappa = dense_params(head)
    rng = np.random.default_rng(7)
    d = Z.shape[1]
    Zs = torch.tensor(Z[:120]).to(dtype)
    cert = head.certify(Zs, backend=backend)
    Zs64 = Zs.double().numpy()
    ratios = []
    for i in range(Zs.shape[0]):
        z, c, R = Zs64[i], cert.prediction[i].item(), cert.radius[i].item()
        dirs = rng.normal(size=(3000, d))
        # add the gradient directions of every margin and the curvature eigenvectors
        wc = z - mu[c]
        grads = [P[j] @ (z - mu[j]) - P[c] @ wc for j in range(len(mu)) if j != c]
        eig = [np.linalg.eigh(P[j] - P[c])[1].T for j in range(len(mu)) if j != c]
        dirs = np.concatenate([dirs] + [np.array(grads)] + eig)
        dirs = np.concatenate([dirs, -dirs])
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        t = quadratic_first_crossing(z, dirs, mu, P, kappa, c)
        assert R <= t * (1 + 1e-12), f"row {i}: certified {R} but an attack crosses at {t}"
        ratios.append(R / t)
        # and nothing inside the ball flips, by direct evaluation
        inside = torch.tensor(z + 0.9999 * R * dirs[:500]) if math.isfinite(R) else None
        if inside is not None and R > 0:
            assert (head.predict(inside) == c).all()
    assert np.median(ratios) > 0.3  # a bound, but not a vacuous one


def test_equal_covariances_match_tied():
    Z, y = blobs(800, 4, 5, seed=61)
    tied = Head("tied", shrinkage=0.0).fit(Z, y)
    K = 4
    S = tied.covariance_
    full = Head.from_params(tied.means_, S.expand(K, -1, -1).clone(), tied.priors_, "full")
    Zt = torch.tensor(Z)
    a, b = tied.certify(Zt), full.certify(Zt)
    assert (a.prediction == b.prediction).all()
    np.testing.assert_allclose(b.radius.numpy(), a.radius.numpy(), rtol=1e-6, atol=1e-9)
    # diagonal covariances: tied(diag Σ) == diag head with identical variances
    v = torch.diagonal(S).clone()
    tied_d = Head.from_params(tied.means_, torch.diag(v), tied.priors_, "tied")
    diag = Head.from_params(tied.means_, v.expand(K, -1).clone(), tied.priors_, "diag")
    np.testing.assert_allclose(diag.certify(Zt).radius.numpy(), tied_d.certify(Zt).radius.numpy(), rtol=1e-6)
    sph = Head.from_params(tied.means_, torch.full((K,), 2.0), tied.priors_, "spherical")
    tied_s = Head.from_params(tied.means_, 2.0 * torch.eye(5), tied.priors_, "tied")
    np.testing.assert_allclose(sph.certify(Zt).radius.numpy(), tied_s.certify(Zt).radius.numpy(), rtol=1e-6)


def test_curvature_modes():
    Z, y = blobs(1000, 4, 6, seed=62, per_class_cov=True)
    head = Head("full", shrinkage=0.0).fit(Z, y)
    from gmfast.params import curvature_table

    lam_e, up_e, m_e = curvature_table(head.classifier_params, "exact")
    lam_w, up_w, m_w = curvature_table(head.classifier_params, "weyl")
    assert (m_e, m_w) == ("exact", "weyl")
    assert curvature_table(head.classifier_params, "auto")[2] == "exact"  # small: exact is cheap
    assert (up_e <= up_w + 1e-12).all() and (lam_e <= up_e).all()
    assert (up_e < up_w).sum() > 0
    Zt = torch.tensor(Z[:200])
    re = head.certify(Zt, curvature="exact").radius
    rw = head.certify(Zt, curvature="weyl").radius
    assert (re >= rw).all() and (re > rw).any()
    with pytest.raises(ValueError, match="curvature must be one of"):
        head.certify(Zt, curvature="magic")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp_sound_near_the_boundary(kind, backend):
    """Points within float32 rounding of a decision boundary: the returned radius is never
    above the bound evaluated in 50-digit arithmetic at the exact input point."""
    Z, y = blobs(600, 3, 4, sep=1.5, seed=63, per_class_cov=True)
    head = Head(kind, shrinkage=0.0).fit(Z, y)
    mu, P, kappa = dense_params(head)
    K = len(mu)
    lam = np.array([[0.0 if c == j else max(0.0, np.linalg.eigvalsh(P[c] - P[j])[-1]) for j in range(K)]
                    for c in range(K)])

    def f(z):
        return np.array([kappa[k] - 0.5 * (z - mu[k]) @ P[k] @ (z - mu[k]) for k in range(K)])

    rng = np.random.default_rng(1)
    pts = []
    for z0 in Z[:40]:
        fz = f(z0)
        c, j = np.argsort(-fz)[:2]
        other = mu[j]
        # bisection on the segment z0 -> μ_j for the c/j boundary
        lo, hi = 0.0, 1.0
        if (f(other)[c] - f(other)[j]) > 0:
            continue
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            zm = z0 + mid * (other - z0)
            fm = f(zm)
            (lo, hi) = (mid, hi) if fm[c] > fm[j] else (lo, mid)
        zb = z0 + lo * (other - z0)
        for s in (0.0, 1e-8, 1e-7, 1e-6):
            pts.append(zb + s * rng.normal(size=zb.shape))
    X = torch.tensor(np.array(pts), dtype=torch.float32)
    cert = head.certify(X, backend=backend, curvature="exact")
    with mpmath.workdps(50):
        mus = [[mpmath.mpf(float(v)) for v in m] for m in mu]
        Ps = [[[mpmath.mpf(float(v)) for v in row] for row in Pk] for Pk in P]
        for i in range(X.shape[0]):
            z = [mpmath.mpf(float(v)) for v in X[i].double()]
            W = [[z[a] - mus[k][a] for a in range(len(z))] for k in range(K)]
            U = [[mpmath.fsum(Ps[k][a][b] * W[k][b] for b in range(len(z))) for a in range(len(z))] for k in range(K)]
            fk = [mpmath.mpf(float(kappa[k])) - mpmath.fsum(W[k][a] * U[k][a] for a in range(len(z))) / 2
                  for k in range(K)]
            c = max(range(K), key=lambda k: (fk[k], -k))
            best = mpmath.inf
            for j in range(K):
                if j == c:
                    continue
                q = fk[c] - fk[j]
                g = mpmath.sqrt(mpmath.fsum((U[c][a] - U[j][a]) ** 2 for a in range(len(z))))
                r = 0 if q <= 0 else 2 * q / (g + mpmath.sqrt(g * g + 2 * mpmath.mpf(lam[c, j]) * q))
                best = min(best, r)
            got = mpmath.mpf(cert.radius[i].item())
            # λ from float64 eigvalsh is within ~1e-15 relative of exact; the slack below is
            # that much and no more
            assert got <= best * (1 + mpmath.mpf(1e-12)), f"point {i}: {got} > {best}"
            if cert.prediction[i].item() != c:
                assert cert.radius[i].item() == 0.0
    assert X.shape[0] >= 80


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radii_do_not_depend_on_memory_layout(fitted, backend, dtype):
    """The same values, contiguous, with a row stride, or column-major (transposed), give
    bit-identical predictions and radii (the reference used to differ by ~2e-6 relative)."""
    Z, y, head = fitted
    X = torch.tensor(Z[:300], dtype=dtype)
    strided = torch.cat([X, X], 1)[:, : X.shape[1]]
    colmajor = X.T.contiguous().T
    want = head.certify(X, backend=backend)
    for other in (strided, colmajor):
        assert not other.is_contiguous()
        got = head.certify(other, backend=backend)
        assert torch.equal(got.prediction, want.prediction) and torch.equal(got.radius, want.radius)
