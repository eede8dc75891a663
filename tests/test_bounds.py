"""Distributional certificates: CA of the mixture, the KL lower bound, diagnostics, report.

References are independent of gmfast: numpy sampling from the fitted parameters, a
vectorised float64 brute-force radius, scipy's own Genz integrator, closed forms.
"""

import math

import numpy as np
import pytest
import torch
from helpers import blobs, bound_reference, dense_params, dual_norm
from scipy import stats

from gmfast import GaussianMixtureHead as Head
from gmfast import certified_accuracy
from gmfast.diagnostics import heldout_log_likelihood, joint_kl_estimate, knn_kl_divergence, mahalanobis_gaussianity
from gmfast.distributional import (_tied_margin_laws, certified_accuracy_gmm, certified_accuracy_lower_bound,
                                   tv_from_kl)
from gmfast.mixture import sample_mixture
from gmfast.report import format_report, plot_mahalanobis_qq, report
from gmfast.multiproto import MultiPrototypeHead

RADII = [0.0, 0.25, 0.5, 1.0, 2.0]
PNG = b"\x89PNG\r\n\x1a\n"


def sample_q(mu, S, pri, n, rng):
    """(Z, y) from the tied mixture, numpy only."""
    y = rng.choice(len(pri), size=n, p=pri)
    return mu[y] + rng.normal(size=(n, mu.shape[1])) @ np.linalg.cholesky(S).T, y


def linear_radius(Z, A, b, norm, S):
    """Exact radius of argmax(A z + b), vectorised float64: (pred, radius)."""
    L = Z @ A.T + b
    c = L.argmax(1)
    D = A[:, None, :] - A[None, :, :]
    if norm == "mahalanobis":
        N = np.sqrt(np.einsum("kji,il,kjl->kj", D, S, D))
    else:
        N = dual_norm(D, norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (L[np.arange(len(c)), c][:, None] - L) / N[c]
    ratio[np.arange(len(c)), c] = np.inf
    return c, np.maximum(ratio.min(1), 0.0)


def independent_mc(head, radii, n, seed, norm=2):
    """Certified accuracy of Q by sampling with numpy and the float64 brute-force radius."""
    rng = np.random.default_rng(seed)
    mu, S, pri = head.means_.numpy(), head.covariance_.numpy(), head.priors_.numpy()
    Z, y = sample_q(mu, S, pri, n, rng)
    p = head.classifier_params
    pred, rad = linear_radius(Z, p.A.numpy(), p.beta.numpy(), norm, S)
    hit = (pred == y)[:, None] & (rad[:, None] >= np.asarray(radii)[None])
    return hit.mean(0), np.sqrt(hit.mean(0) * (1 - hit.mean(0)) / n), Z, y


# --------------------------------------------------------------------------- CA_Q


def test_closed_form_k2_equals_the_hand_derived_formula():
    """Equal priors, means ±μ: m = (a0−a1)ᵀz + β0−β1 has mean Δ²/2 and variance Δ² under either
    class (Δ the Mahalanobis distance of the means), so CA_Q(ε) = Φ((Δ²/2 − ε‖a0−a1‖)/Δ), and at
    ε = 0 the Bayes accuracy Φ(Δ/2)."""
    rng = np.random.default_rng(0)
    d = 5
    B = rng.normal(size=(d, d))
    S = B @ B.T / d + np.eye(d)
    mu = rng.normal(size=d) * 0.7
    head = Head.from_params(np.stack([mu, -mu]), S, np.array([0.5, 0.5]))
    delta = math.sqrt(4 * mu @ np.linalg.solve(S, mu))
    gap = np.linalg.norm(2 * np.linalg.solve(S, mu))
    want = stats.norm.cdf((delta**2 / 2 - np.asarray(RADII) * gap) / delta)
    ca = certified_accuracy_gmm(head, RADII)
    assert ca.method.startswith("closed form") and (ca.stderr == 0).all()
    np.testing.assert_allclose(ca.estimate, want, rtol=1e-10, atol=1e-15)
    assert ca.estimate[0] == pytest.approx(stats.norm.cdf(delta / 2), rel=1e-12)
    np.testing.assert_array_equal(ca.lower_confidence(0.99), ca.estimate)  # exact: no confidence term


def test_closed_form_k2_matches_monte_carlo_unequal_priors():
    Z, y = blobs(400, 2, 3, sep=1.0, seed=100)
    y[:60] = 0  # unequal priors
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    assert abs(head.priors_[0].item() - 0.5) > 0.04
    ca = certified_accuracy_gmm(head, RADII)
    mc, se, _, _ = independent_mc(head, RADII, 200_000, 0)
    assert np.all(np.abs(ca.estimate - mc) <= 4 * se + 1e-12), (ca.estimate, mc)
    assert np.all(np.diff(ca.estimate) <= 0)
    assert certified_accuracy_gmm(head, RADII, method="genz").estimate == pytest.approx(ca.estimate, rel=1e-12)


@pytest.mark.parametrize("norm", [2, math.inf, "mahalanobis"])
def test_k4_genz_and_qmc_match_monte_carlo(norm):
    Z, y = blobs(800, 4, 3, sep=1.5, seed=101)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    genz = certified_accuracy_gmm(head, RADII, norm=norm)
    qmc = certified_accuracy_gmm(head, RADII, norm=norm, method="qmc", n_samples=2**15)
    mc, se, Zq, yq = independent_mc(head, RADII, 100_000, 1, norm)
    assert genz.method.startswith("Genz") and qmc.method.startswith("indicator")
    for res in (genz, qmc):
        assert np.all(np.abs(res.estimate - mc) <= 4 * np.sqrt(se**2 + res.stderr**2) + 1e-9), (res.estimate, mc)
        assert np.all(res.lower_confidence(0.95) <= res.estimate)
    # Genz's smooth integrand: far more accurate than the indicator at the same cost
    assert np.all(genz.stderr[:-1] < qmc.stderr[:-1] / 10)
    assert np.all(np.abs(genz.estimate - qmc.estimate) <= 4 * np.hypot(genz.stderr, qmc.stderr) + 1e-12)
    # at ε = 0 it is the Bayes accuracy of Q: no classifier does better on Q, e.g. nearest mean
    nearest = ((Zq[:, None, :] - head.means_.numpy()[None]) ** 2).sum(-1).argmin(1)
    assert genz.estimate[0] >= (nearest == yq).mean() - 4 * se[0]
    assert genz.estimate[0] > (nearest == yq).mean() + 0.005  # the covariance matters here


def test_genz_tail_probabilities_agree_with_scipy():
    """Per-class orthant probabilities far in the tail, where an indicator sees nothing: against
    scipy's independent implementation of Genz's algorithm (Fortran MVNDST)."""
    Z, y = blobs(1500, 6, 8, sep=1.0, seed=7)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    from gmfast.distributional import _orthant_genz

    for eps in (0.0, 0.4):
        for mean, C, N in _tied_margin_laws(head, 2):
            reps = _orthant_genz(mean, C, N, np.array([eps]), 2**12, 8, 3)
            b = (mean - eps * N).numpy()
            want = stats.multivariate_normal(np.zeros(len(b)), C.numpy(), abseps=1e-14, releps=1e-6,
                                             maxpts=200_000).cdf(b)
            got = reps.mean()
            assert abs(got - want) <= 1e-3 * want + 6 * reps.std() / math.sqrt(8) + 1e-15, (eps, got, want)


def test_singular_margins_use_the_indicator_with_an_honest_bound():
    """K − 1 > d: the margins' covariance is singular (no Cholesky, no Genz)."""
    Z, y = blobs(1200, 6, 2, sep=2.0, seed=102)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    assert certified_accuracy_gmm(head, RADII, n_samples=20_000).method.startswith("Monte Carlo")  # auto
    qmc = certified_accuracy_gmm(head, RADII, method="qmc", n_samples=2**15)
    forced = certified_accuracy_gmm(head, RADII, method="genz", n_samples=2**15)
    assert qmc.method.startswith("indicator") and "singular" in forced.method
    np.testing.assert_array_equal(forced.estimate, qmc.estimate)
    mc, se, _, _ = independent_mc(head, RADII, 100_000, 2)
    assert np.all(np.abs(qmc.estimate - mc) <= 4 * np.sqrt(se**2 + qmc.stderr**2) + 1e-9), (qmc.estimate, mc)
    # where every point hit, the replicate spread is 0 but the bound is still below 1
    head2 = Head.from_params(np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]]), np.eye(2), np.array([0.3, 0.3, 0.4]))
    sure = certified_accuracy_gmm(head2, [0.0], method="qmc", n_samples=2**12)
    assert sure.estimate[0] == 1.0 and sure.stderr[0] == 0.0
    assert 0.99 < sure.lower_confidence(0.95)[0] < 1.0


def test_per_class_types_use_the_kernel():
    Z, y = blobs(600, 3, 3, sep=1.5, seed=103, per_class_cov=True)
    head = Head("full", shrinkage=0.0).fit(Z, y)
    ca = certified_accuracy_gmm(head, RADII, n_samples=40_000)
    assert ca.method.startswith("Monte Carlo") and (ca.stderr > 0).any()
    # independent: numpy draws from the fitted Gaussians, the DESIGN 1.4 radius in numpy
    rng = np.random.default_rng(4)
    mu, P, kappa = dense_params(head)
    cov, pri = head.covariances_.numpy(), head.priors_.numpy()
    n = 6000
    yq = rng.choice(3, size=n, p=pri)
    Zq = np.stack([rng.multivariate_normal(mu[k], cov[k]) for k in yq])
    pred, rad = bound_reference(Zq, mu, P, kappa)
    hit = (pred == yq)[:, None] & (rad[:, None] >= np.asarray(RADII)[None])
    ref, se = hit.mean(0), np.sqrt(hit.mean(0) * (1 - hit.mean(0)) / n)
    assert np.all(np.abs(ca.estimate - ref) <= 4 * np.hypot(se, ca.stderr) + 1e-9), (ca.estimate, ref)
    assert np.all(np.diff(ca.estimate) <= 0)
    lo = ca.lower_confidence(0.95)
    assert np.all(lo <= ca.estimate) and np.all(lo >= ca.estimate - 6 * ca.stderr - 2e-3)
    with pytest.raises(ValueError, match="tied"):
        certified_accuracy_gmm(head, RADII, method="genz")
    with pytest.raises(ValueError, match="radii"):
        certified_accuracy_gmm(head, [-1.0])


def test_sample_mixture_moments():
    Z, y = blobs(900, 3, 3, sep=2.0, seed=104, per_class_cov=True)
    for kind in ("full", "diag", "spherical", "tied"):
        head = Head(kind, shrinkage=0.0).fit(Z, y)
        z, yy = sample_mixture(head, 60_000, seed=1)
        counts = torch.bincount(yy, minlength=3)
        assert (counts - head.priors_ * 60_000).abs().max() <= 1  # stratified
        for k in range(3):
            zk = z[yy == k].numpy()
            cov = head.covariances_
            want = {"tied": cov, "full": cov[k] if cov.dim() == 3 else None,
                    "diag": torch.diag(cov[k]) if cov.dim() == 2 else None,
                    "spherical": cov[k] * torch.eye(3, dtype=torch.float64) if cov.dim() == 1 else None}[kind]
            np.testing.assert_allclose(zk.mean(0), head.means_[k].numpy(), atol=0.05)
            np.testing.assert_allclose(np.cov(zk.T), want.numpy(), atol=0.08)
    _, yi = sample_mixture(head, 30_000, seed=2, stratified=False)
    np.testing.assert_allclose(torch.bincount(yi).numpy() / 30_000, head.priors_.numpy(), atol=0.015)


# --------------------------------------------------------------------------- the KL bound


def test_tv_from_kl():
    kl = np.array([0.0, 1e-12, 1e-6, 0.01, 0.5, 1.5, 2.0, 10.0, 800.0, np.inf])
    tv = tv_from_kl(kl)
    pinsker, bh = np.sqrt(kl / 2), np.sqrt(1 - np.exp(-kl))
    want = np.minimum(pinsker, bh)
    want[-1] = 1.0
    np.testing.assert_allclose(tv, want, rtol=1e-12)
    assert tv_from_kl(0.0) == 0.0 and tv_from_kl(np.inf) == 1.0
    assert np.all(np.diff(tv) >= 0) and np.all(tv <= 1)
    assert tv_from_kl(0.01) == pytest.approx(math.sqrt(0.005), rel=1e-12)  # Pinsker for small KL
    assert tv_from_kl(10.0) == pytest.approx(math.sqrt(1 - math.exp(-10)), rel=1e-12)  # B–H for large
    assert tv_from_kl(1e-30) == pytest.approx(math.sqrt(5e-31), rel=1e-12)  # no cancellation
    assert tv_from_kl([[0.1, 0.2]]).shape == (1, 2)
    for bad in (-0.1, np.nan, [0.1, -1e-9]):
        with pytest.raises(ValueError, match="KL must be >= 0"):
            tv_from_kl(bad)


def _empirical_under(head, Z, y, radii):
    return certified_accuracy(head.certify(torch.tensor(Z)), y, radii)


def test_lower_bound_holds_on_a_mixture_with_shifted_means():
    """P = the fitted mixture with every class mean shifted by δ_k: with equal weights and
    covariance, KL(P‖Q) ≤ Σ π_k ½ δ_kᵀΣ⁻¹δ_k (joint convexity); the bound holds on P."""
    Z, y = blobs(1000, 3, 4, sep=2.0, seed=105)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    rng = np.random.default_rng(5)
    mu, S, pri = head.means_.numpy(), head.covariance_.numpy(), head.priors_.numpy()
    delta = rng.normal(size=(3, 4)) * 0.15
    kl = float(sum(pri[k] * 0.5 * delta[k] @ np.linalg.solve(S, delta[k]) for k in range(3)))
    lb = certified_accuracy_lower_bound(head, RADII, kl)
    ZP, yP = sample_q(mu, S, pri, 200_000, rng)
    ZP += delta[yP]
    emp = _empirical_under(head, ZP, yP, RADII)
    assert np.all(emp >= lb.estimate), (emp, lb.estimate)
    assert lb.estimate[0] > 0.5  # and it says something
    assert lb.details["tv"] == pytest.approx(float(tv_from_kl(kl)))
    # the same with the Monte Carlo estimator of CA_Q and its Clopper–Pearson term
    lb_mc = certified_accuracy_lower_bound(head, RADII, kl, method="mc", n_samples=50_000)
    assert np.all(emp >= lb_mc.estimate) and np.all(lb_mc.estimate <= lb.estimate + 0.01)


def test_lower_bound_holds_on_a_mixture_with_scaled_covariance():
    """P: covariances s²Σ. Per class KL(N(μ, s²Σ)‖N(μ, Σ)) = d/2 (s² − 1 − log s²), the same for
    every class, so KL(P‖Q) ≤ that (joint convexity)."""
    Z, y = blobs(1000, 4, 3, sep=2.5, seed=106)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    s2, d = 1.3, 3
    kl = d / 2 * (s2 - 1 - math.log(s2))
    lb = certified_accuracy_lower_bound(head, RADII, kl, n_samples=2**13)
    rng = np.random.default_rng(6)
    ZP, yP = sample_q(head.means_.numpy(), s2 * head.covariance_.numpy(), head.priors_.numpy(), 200_000, rng)
    emp = _empirical_under(head, ZP, yP, RADII)
    assert np.all(emp >= lb.estimate), (emp, lb.estimate)
    assert lb.estimate[0] > 0.4
    # a larger KL loosens; KL = inf gives the trivial bound 0
    assert np.all(certified_accuracy_lower_bound(head, RADII, 4 * kl, ca_q=lb.details["ca_q"]).estimate
                  <= lb.estimate)
    assert np.all(certified_accuracy_lower_bound(head, RADII, np.inf, ca_q=lb.details["ca_q"]).estimate == 0)


# --------------------------------------------------------------------------- diagnostics


def test_knn_kl_estimator():
    rng = np.random.default_rng(7)
    n = 5000
    P = rng.normal(size=(n, 2))
    scale, shift = np.array([1.5, 0.8]), np.array([0.5, 0.0])
    Q = rng.normal(size=(n, 2)) * scale + shift
    var = scale**2
    kl = 0.5 * np.sum(1 / var + shift**2 / var - 1 + np.log(var))  # KL(N(0, I) ‖ N(shift, diag var))
    # sampling sd of the estimate here (20 seeds): 14% of KL for k = 1, 8% for k = 4
    for k, tol in ((1, 0.3), (4, 0.2)):
        est = knn_kl_divergence(P, Q, k=k)
        assert abs(est - kl) <= tol * kl, (k, est, kl)
    assert abs(knn_kl_divergence(P, rng.normal(size=(n, 2)))) < 0.05
    with pytest.raises(ValueError, match="duplicate"):
        knn_kl_divergence(np.vstack([P[:10], P[:1]]), Q)


def test_gaussianity_and_loglik_diagnostics(tmp_path):
    rng = np.random.default_rng(8)
    Zg = rng.normal(size=(2000, 3)) + np.repeat(np.eye(3) * 4, [700, 700, 600], axis=0)
    yg = np.repeat([0, 1, 2], [700, 700, 600])
    head = Head("full", shrinkage=0.0).fit(Zg, yg)
    ks = mahalanobis_gaussianity(head, Zg, yg)
    assert set(ks) == {0, 1, 2} and min(p for _, _, p in ks.values()) > 1e-3
    Zt = Zg.copy()
    Zt[yg == 1] = 4 * np.eye(3)[1] + rng.standard_t(2, size=(700, 3))  # heavy tails
    head_t = Head("full", shrinkage=0.0).fit(Zt, yg)
    ks_t = mahalanobis_gaussianity(head_t, Zt, yg)
    assert ks_t[1][2] < 1e-6 and ks_t[0][2] > 1e-3 and ks_t[2][2] > 1e-3
    for kind in ("tied", "diag", "spherical"):
        assert min(p for _, _, p in mahalanobis_gaussianity(Head(kind, shrinkage=0.0).fit(Zg, yg), Zg, yg).values()) > 1e-3
    # log-likelihood: against scipy's densities
    pri, mu, cov = head.priors_.numpy(), head.means_.numpy(), head.covariances_.numpy()
    lj = np.stack([np.log(pri[k]) + stats.multivariate_normal(mu[k], cov[k]).logpdf(Zg) for k in range(3)], 1)
    assert heldout_log_likelihood(head, Zg, yg) == pytest.approx(lj[np.arange(2000), yg].mean(), rel=1e-10)
    assert heldout_log_likelihood(head, Zg) == pytest.approx(np.logaddexp.reduce(lj, 1).mean(), rel=1e-10)
    assert heldout_log_likelihood(head, Zg, yg) > heldout_log_likelihood(head_t, Zt, yg)
    z, yy = sample_mixture(head, 3000)
    assert abs(joint_kl_estimate(head, z, yy)) < 0.1  # samples of Q itself
    path = plot_mahalanobis_qq(head_t, Zt, yg, tmp_path / "qq" / "q.png")
    assert path.read_bytes()[:8] == PNG


# --------------------------------------------------------------------------- report


def test_report(tmp_path):
    Z, y = blobs(900, 3, 4, sep=2.0, seed=109)
    head = Head("tied", shrinkage=0.0).fit(Z[:600], y[:600])
    res = report(head, Z[600:], y[600:], RADII, out_dir=tmp_path, n_samples=2**13)
    text = format_report(res)
    assert "k-NN estimate (not a guarantee)" in text and "ESTIMATE" in text and "lower bound" in text
    np.testing.assert_array_equal(res["empirical"], certified_accuracy(head.certify(Z[600:]), y[600:], RADII))
    assert np.all(res["lower_bound"] <= res["ca_q"] + 1e-12) and np.all(res["ca_q_stderr"] >= 0)
    assert all((tmp_path / f).read_bytes()[:8] == PNG for f in ("certified_accuracy.png", "mahalanobis_qq.png"))
    assert len(text.splitlines()) >= 5 + len(RADII)
    res2 = report(head, Z[600:], y[600:], RADII, kl=0.01, n_samples=2**13)
    assert res2["kl_source"] == "given" and res2["tv"] == pytest.approx(math.sqrt(0.005))
    assert "valid if KL" in format_report(res2) and res2["plots"] == []
    # a multi-prototype head: CA_Q by Monte Carlo, no per-class Gaussianity check
    mp = MultiPrototypeHead(2, max_iter=300).fit(Z[:600], y[:600])
    res3 = report(mp, Z[600:], y[600:], RADII, kl=0.02, out_dir=tmp_path / "mp", n_samples=20_000)
    assert res3["ca_q_method"].startswith("Monte Carlo") and res3["gaussianity"] is None
    assert [p.rsplit("/", 1)[-1] for p in res3["plots"]] == ["certified_accuracy.png"]
    assert "Gaussianity" not in format_report(res3)


def test_bounds_keeps_its_public_names():
    """gmfast.bounds (public API) re-exports the same objects from the modules that now hold them."""
    import gmfast
    from gmfast import diagnostics, distributional, mixture
    from gmfast import report as rep

    b = gmfast.bounds
    homes = {"CAResult": distributional, "certified_accuracy_gmm": distributional, "tv_from_kl": distributional,
             "certified_accuracy_lower_bound": distributional, "sample_mixture": mixture,
             "heldout_log_likelihood": diagnostics, "knn_kl_divergence": diagnostics,
             "joint_kl_estimate": diagnostics, "mahalanobis_gaussianity": diagnostics,
             "plot_mahalanobis_qq": rep, "report": rep, "format_report": rep}
    assert sorted(b.__all__) == sorted(homes)
    for name, home in homes.items():
        assert getattr(b, name) is getattr(home, name), name
    assert b.tv_from_kl(0.5) == pytest.approx(0.5)


def test_mixture_of_names_what_it_accepts():
    from gmfast.mixture import mixture_of

    with pytest.raises(TypeError, match="expected a fitted GaussianMixtureHead or MultiPrototypeHead; got Linear"):
        mixture_of(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got Linear"):
        sample_mixture(torch.nn.Linear(2, 2), 3)
