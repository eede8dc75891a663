"""Distributional certificates: CA of the mixture, the KL lower bound, diagnostics."""

import math

import numpy as np
import pytest
import torch
from helpers import blobs, linear_radius_bruteforce

from gmfast import GaussianMixtureHead as Head
from gmfast.bounds import (certified_accuracy_gmm, certified_accuracy_lower_bound, format_report,
                           heldout_log_likelihood, joint_kl_estimate, knn_kl_divergence, mahalanobis_gaussianity,
                           report, sample_mixture, tv_from_kl)

RADII = [0.0, 0.25, 0.5, 1.0, 2.0]


def independent_mc(head, radii, n, seed, norm=2):
    """Sample Q with numpy, classify and take radii with a float64 brute force (no gmfast)."""
    rng = np.random.default_rng(seed)
    mu, S, pri = head.means_.numpy(), head.covariance_.numpy(), head.priors_.numpy()
    y = rng.choice(len(pri), size=n, p=pri)
    Z = mu[y] + rng.normal(size=(n, mu.shape[1])) @ np.linalg.cholesky(S).T
    p = head.classifier_params
    pred, rad, _, _ = linear_radius_bruteforce(Z, p.A.numpy(), p.beta.numpy(), norm, S)
    hit = (pred == y)[:, None] & (rad[:, None] >= np.asarray(radii)[None])
    # a standard error floor of 3/n: with no event observed the plug-in error would be 0
    return hit.mean(0), np.maximum(hit.std(0) / math.sqrt(n), 3.0 / n)


def test_closed_form_k2_matches_monte_carlo():
    Z, y = blobs(400, 2, 3, sep=1.0, seed=100)
    head = Head("tied").fit(Z, y)
    ca = certified_accuracy_gmm(head, RADII)
    assert ca.method.startswith("closed form") and (ca.stderr == 0).all()
    mc, se = independent_mc(head, RADII, 200_000, 0)
    assert np.all(np.abs(ca.estimate - mc) <= 4 * se + 1e-12), (ca.estimate, mc)
    assert np.all(np.diff(ca.estimate) <= 0)  # monotone in the radius


@pytest.mark.parametrize("norm", [2, math.inf])
def test_rqmc_k4_matches_monte_carlo(norm):
    Z, y = blobs(800, 4, 3, sep=1.5, seed=101)
    head = Head("tied").fit(Z, y)
    ca = certified_accuracy_gmm(head, RADII, norm=norm, n_samples=2**15)
    mc, se = independent_mc(head, RADII, 100_000, 1, norm)
    assert ca.method.startswith("randomized QMC")
    assert np.all(np.abs(ca.estimate - mc) <= 4 * np.sqrt(se**2 + ca.stderr**2) + 1e-9), (ca.estimate, mc)
    # at radius 0 it is the Bayes accuracy of Q
    kernel = certified_accuracy_gmm(head, [0.0], method="mc", norm=norm, n_samples=100_000)
    assert abs(kernel.estimate[0] - ca.estimate[0]) <= 4 * math.hypot(kernel.stderr[0], ca.stderr[0])


def test_per_class_types_use_the_kernel():
    Z, y = blobs(600, 3, 3, sep=1.5, seed=102, per_class_cov=True)
    head = Head("full").fit(Z, y)
    ca = certified_accuracy_gmm(head, RADII, n_samples=50_000)
    assert ca.method.startswith("Monte Carlo") and (ca.stderr > 0).any()
    assert np.all(np.diff(ca.estimate) <= 0) and 0.5 < ca.estimate[0] <= 1
    with pytest.raises(ValueError, match="tied"):
        certified_accuracy_gmm(head, RADII, method="rqmc")


def test_tv_from_kl():
    kl = np.array([0.0, 1e-6, 0.01, 0.5, 2.0, 10.0, np.inf])
    tv = tv_from_kl(kl)
    want = np.minimum(np.sqrt(kl / 2), np.sqrt(1 - np.exp(-kl)))
    want[-1] = 1.0
    np.testing.assert_allclose(tv, want, rtol=1e-12)
    assert tv_from_kl(0.0) == 0.0 and np.all(np.diff(tv) >= 0) and np.all(tv <= 1)
    assert tv_from_kl(10.0) < math.sqrt(5.0)  # Bretagnolle–Huber takes over where Pinsker exceeds 1
    with pytest.raises(ValueError, match="KL must be >= 0"):
        tv_from_kl(-0.1)


def test_lower_bound_holds_on_a_shifted_mixture():
    """P = the fitted mixture with every class mean shifted: for equal weights and covariance,
    KL(P‖Q) ≤ Σ π_k ½ δ_kᵀΣ⁻¹δ_k (joint convexity); the empirical CA under P is above the bound."""
    Z, y = blobs(1000, 3, 4, sep=2.0, seed=103)
    head = Head("tied").fit(Z, y)
    rng = np.random.default_rng(5)
    delta = rng.normal(size=(3, 4)) * 0.15
    S = head.covariance_.numpy()
    kl = float(sum(head.priors_[k].item() * 0.5 * delta[k] @ np.linalg.solve(S, delta[k]) for k in range(3)))
    lb = certified_accuracy_lower_bound(head, RADII, kl, n_samples=2**15)
    # a large sample from P, certified by the head
    n = 200_000
    yy = rng.choice(3, size=n, p=head.priors_.numpy())
    ZP = head.means_.numpy()[yy] + delta[yy] + rng.normal(size=(n, 4)) @ np.linalg.cholesky(S).T
    cert = head.certify(torch.tensor(ZP))
    from gmfast import certified_accuracy

    emp = certified_accuracy(cert, yy, RADII)
    assert np.all(emp >= lb.estimate), (emp, lb.estimate)
    assert lb.estimate[0] > 0.3  # and it says something


def test_knn_kl_estimator():
    rng = np.random.default_rng(6)
    n = 5000
    P = rng.normal(size=(n, 2))
    Q = rng.normal(size=(n, 2)) * np.array([1.5, 0.8]) + np.array([0.5, 0.0])
    # closed form KL(N(0,I) ‖ N(m, D))
    var = np.array([1.5, 0.8]) ** 2
    kl = 0.5 * np.sum(1 / var + np.array([0.5, 0.0]) ** 2 / var - 1 + np.log(var))
    est = knn_kl_divergence(P, Q)
    assert abs(est - kl) <= 0.2 * kl + 0.02, (est, kl)
    assert abs(knn_kl_divergence(P, rng.normal(size=(n, 2)))) < 0.05


def test_gaussianity_and_loglik_diagnostics(tmp_path):
    rng = np.random.default_rng(7)
    Zg = rng.normal(size=(2000, 3)) + np.repeat(np.eye(3) * 4, [700, 700, 600], axis=0)
    yg = np.repeat([0, 1, 2], [700, 700, 600])
    head = Head("full").fit(Zg, yg)
    ks = mahalanobis_gaussianity(head, Zg, yg)
    assert min(p for _, _, p in ks.values()) > 1e-3
    Zt = Zg.copy()
    Zt[yg == 1] = 4 * np.eye(3)[1] + rng.standard_t(2, size=(700, 3))
    head_t = Head("full").fit(Zt, yg)
    ks_t = mahalanobis_gaussianity(head_t, Zt, yg)
    assert ks_t[1][2] < 1e-6 and ks_t[0][2] > 1e-3
    assert heldout_log_likelihood(head, Zg, yg) > heldout_log_likelihood(head_t, Zt, yg)
    assert heldout_log_likelihood(head, Zg) >= heldout_log_likelihood(head, Zg, yg)  # marginal ≥ joint
    z, yy = sample_mixture(head, 3000)
    assert abs(joint_kl_estimate(head, z, yy)) < 0.1  # samples of Q itself


def test_report(tmp_path):
    Z, y = blobs(900, 3, 4, sep=2.0, seed=104)
    head = Head("tied").fit(Z[:600], y[:600])
    res = report(head, Z[600:], y[600:], RADII, out_dir=tmp_path, n_samples=2**14)
    text = format_report(res)
    assert "k-NN estimate (not a guarantee)" in text and "lower bound" in text
    assert all(np.asarray(res["lower_bound"]) <= np.asarray(res["ca_q"]) + 1e-12)
    assert all((tmp_path / f).exists() for f in ("certified_accuracy.png", "mahalanobis_qq.png"))
    res2 = report(head, Z[600:], y[600:], RADII, kl=0.01, n_samples=2**14)
    assert res2["kl_source"] == "given" and res2["tv"] == pytest.approx(math.sqrt(0.005))
