"""Fitting, classification and probabilities against scikit-learn and float64 brute force."""

import math

import numpy as np
import pytest
import torch
from helpers import blobs
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal, norm
from sklearn.covariance import ledoit_wolf
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis as LDA
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis as QDA

import gmfast
from gmfast import GaussianMixtureHead as Head


@pytest.mark.parametrize("K,d", [(2, 3), (5, 8), (10, 1)])
def test_tied_matches_lda(K, d):
    Z, y = blobs(600, K, d, seed=K * 10 + d)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    lda = LDA(store_covariance=True).fit(Z, y)
    np.testing.assert_allclose(head.means_.numpy(), lda.means_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(head.covariance_.numpy(), lda.covariance_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.priors_.numpy(), lda.priors_, rtol=1e-14)
    Zt = torch.tensor(Z)
    np.testing.assert_allclose(head.predict_proba(Zt).numpy(), lda.predict_proba(Z), atol=1e-9)
    assert (head.predict(Zt).numpy() == lda.predict(Z)).all()
    # the linear logits are sklearn's decision function (lsqr solver: coef = Σ⁻¹μ)
    lsqr = LDA(solver="lsqr").fit(Z, y)
    if K > 2:
        np.testing.assert_allclose(head.classifier_params.A.numpy(), lsqr.coef_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(head.classifier_params.beta.numpy(), lsqr.intercept_, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("lam", [0.1, 0.7])
def test_tied_float_shrinkage_matches_lda_lsqr(lam):
    Z, y = blobs(400, 4, 6, seed=3)
    head = Head("tied", shrinkage=lam).fit(Z, y)
    lda = LDA(solver="lsqr", shrinkage=lam, store_covariance=True).fit(Z, y)
    np.testing.assert_allclose(head.covariance_.numpy(), lda.covariance_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.predict_proba(torch.tensor(Z)).numpy(), lda.predict_proba(Z), atol=1e-9)


def test_tied_ledoit_wolf_is_lw_of_class_centred_residuals():
    Z, y = blobs(300, 3, 40, seed=4)
    head = Head("tied", shrinkage="ledoit-wolf").fit(Z, y)
    R = Z - np.stack([Z[y == k].mean(0) for k in range(3)])[y]
    cov, lam = ledoit_wolf(R, assume_centered=True)
    assert head.shrinkage_ == pytest.approx(lam, rel=1e-9)
    np.testing.assert_allclose(head.covariance_.numpy(), cov, rtol=1e-9, atol=1e-12)


def test_full_matches_qda():
    Z, y = blobs(3000, 3, 4, seed=5, per_class_cov=True)
    head = Head("full", shrinkage=0.0).fit(Z, y)
    qda = QDA(store_covariance=True).fit(Z, y)
    for k in range(3):
        # gmfast is the maximum-likelihood estimate (divide by n_k); scikit-learn's QDA has
        # divided by n_k − 1 in some versions and by n_k in others: read its divisor off it.
        Xk = Z[y == k]
        ratio = qda.covariance_[k][0, 0] / Xk[:, 0].var()
        assert min(abs(ratio - 1), abs(ratio - len(Xk) / (len(Xk) - 1))) < 1e-9
        np.testing.assert_allclose(head.covariances_[k].numpy() * ratio, qda.covariance_[k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.means_.numpy(), qda.means_, atol=1e-12)
    agree = (head.predict(torch.tensor(Z)).numpy() == qda.predict(Z)).mean()
    assert agree > 0.995
    # the log-joint is exactly log π_k + log N(z; μ_k, Σ_k), checked with scipy
    logp = np.stack([np.log(head.priors_[k].item()) + multivariate_normal(head.means_[k].numpy(),
                     head.covariances_[k].numpy()).logpdf(Z) for k in range(3)], 1)
    np.testing.assert_allclose(head(torch.tensor(Z)).numpy(), logp, rtol=1e-10, atol=1e-8)
    post = np.exp(logp - logp.max(1, keepdims=True))
    np.testing.assert_allclose(head.predict_proba(torch.tensor(Z)).numpy(), post / post.sum(1, keepdims=True),
                               atol=1e-10)


def test_full_ledoit_wolf_per_class():
    Z, y = blobs(200, 2, 30, seed=6, per_class_cov=True)
    head = Head("full", shrinkage="ledoit-wolf").fit(Z, y)
    for k in range(2):
        cov, lam = ledoit_wolf(Z[y == k])
        np.testing.assert_allclose(head.covariances_[k].numpy(), cov, rtol=1e-9, atol=1e-12)
        assert head.shrinkage_[k].item() == pytest.approx(lam, rel=1e-9)


@pytest.mark.parametrize("kind", ["diag", "spherical"])
def test_diag_spherical_log_joint_bruteforce(kind):
    Z, y = blobs(500, 3, 5, seed=7, per_class_cov=True)
    head = Head(kind, priors="uniform", shrinkage=0.0).fit(Z, y)
    logp = np.zeros((len(Z), 3))
    for k in range(3):
        Xk = Z[y == k]
        var = Xk.var(0)
        if kind == "spherical":
            var = np.full(5, var.mean())
        logp[:, k] = math.log(1 / 3) + norm(Xk.mean(0), np.sqrt(var)).logpdf(Z).sum(1)
    np.testing.assert_allclose(head(torch.tensor(Z)).numpy(), logp, rtol=1e-10, atol=1e-9)
    assert (head.predict(torch.tensor(Z)).numpy() == logp.argmax(1)).all()


def test_tied_log_joint_is_gaussian_log_density():
    Z, y = blobs(300, 3, 4, seed=8)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    logp = np.stack([np.log(head.priors_[k].item()) + multivariate_normal(head.means_[k].numpy(),
                     head.covariance_.numpy()).logpdf(Z) for k in range(3)], 1)
    np.testing.assert_allclose(head(torch.tensor(Z)).numpy(), logp, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("kind", ["tied", "full", "diag", "spherical"])
def test_streaming_equals_one_shot(kind):
    Z, y = blobs(1000, 4, 6, seed=9, per_class_cov=True)
    Z = Z + 1e4  # a large offset: raw-moment formulas would lose ~8 digits here
    one = Head(kind, shrinkage=0.0).fit(Z, y)
    stream = Head(kind, shrinkage=0.0)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 1000), 12, replace=False))
    for part in np.split(np.arange(1000), cuts):
        stream.partial_fit(Z[part], y[part])
    stream.finalize()
    np.testing.assert_allclose(stream.means_.numpy(), one.means_.numpy(), rtol=1e-14)
    np.testing.assert_allclose(stream.covariances_.numpy(), one.covariances_.numpy(), rtol=1e-9, atol=1e-12)
    # against a two-pass float64 computation
    ref = np.stack([np.cov(Z[y == k].T, bias=True) for k in range(4)])
    got = stream.covariances_.numpy()
    if kind == "full":
        np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    elif kind == "diag":
        np.testing.assert_allclose(got, np.diagonal(ref, axis1=1, axis2=2), rtol=1e-8)


@settings(max_examples=25, deadline=None)
@given(K=st.integers(2, 5), d=st.integers(1, 6), nbatch=st.integers(1, 6), seed=st.integers(0, 10_000),
       lw=st.booleans())
def test_streaming_property(K, d, nbatch, seed, lw):
    Z, y = blobs(40 * K, K, d, seed=seed)
    kind, shrink = ("tied", "ledoit-wolf") if lw else ("tied", 0.0)
    one = Head(kind, shrinkage=shrink).fit(Z, y)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(Z)), nbatch)
    st_ = Head(kind, shrinkage=shrink)
    for p in parts:
        st_.partial_fit(Z[p], y[p])
    st_.finalize()
    np.testing.assert_allclose(st_.covariance_.numpy(), one.covariance_.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(st_.shrinkage_, one.shrinkage_, rtol=1e-8, atol=1e-12)


def test_float32_input_and_numpy_and_uniform_priors():
    Z, y = blobs(200, 3, 4, seed=10)
    h64 = Head("tied", priors="uniform", shrinkage=0.0).fit(Z, y)
    h32 = Head("tied", priors="uniform", shrinkage=0.0).fit(torch.tensor(Z, dtype=torch.float32), torch.tensor(y))
    np.testing.assert_allclose(h32.priors_.numpy(), np.full(3, 1 / 3))
    # statistics are float64 whatever the input dtype: only the input rounding differs
    np.testing.assert_allclose(h32.means_.numpy(), h64.means_.numpy(), rtol=1e-6, atol=1e-6)
    out = h32.predict_proba(Z.astype(np.float32))
    assert out.dtype == torch.float32 and out.shape == (200, 3)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Head("nope", shrinkage=0.0), "covariance_type must be one of"),
        (lambda: Head(priors="flat"), "priors must be one of"),
        (lambda: Head(shrinkage=1.5), "shrinkage must be 'auto', 'ledoit-wolf' or a float in"),
        (lambda: Head(shrinkage=True), "shrinkage must be 'auto', 'ledoit-wolf' or a float in"),
        (lambda: Head("diag", shrinkage="lw"), "shrinkage must be one of"),
        (lambda: Head(backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fit_errors_name_the_problem():
    Z, y = blobs(100, 3, 4, seed=11)
    with pytest.raises(ValueError, match="same length"):
        Head().fit(Z, y[:-1])
    with pytest.raises(TypeError, match="floating"):
        Head().fit(Z.astype(np.int64), y)
    with pytest.raises(TypeError, match="integer class labels"):
        Head().fit(Z, y.astype(float))
    with pytest.raises(ValueError, match="at least 2 classes"):
        Head().fit(Z, np.zeros(100, dtype=int))
    with pytest.raises(ValueError, match=r"classes \[1\] have no samples"):
        Head().fit(Z, np.where(y == 1, 2, y))
    bad = Z.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        Head().fit(bad, y)
    few = np.concatenate([np.nonzero(y == k)[0][:3] for k in range(3)])
    with pytest.raises(ValueError, match="use shrinkage"):
        Head("full", shrinkage=0.0).fit(Z[few], y[few])  # 3 samples per class in 4 dimensions: singular
    Head("full", shrinkage=0.1).fit(Z[few], y[few])  # ... which shrinkage fixes
    with pytest.raises(ValueError, match="at least 2 samples per class"):
        Head("diag", shrinkage=0.0).fit(Z[:4], np.array([0, 1, 2, 2]))
    with pytest.raises(gmfast.NotFittedError, match="not fitted"):
        Head().predict(Z)
    with pytest.raises(gmfast.NotFittedError, match="not fitted"):
        Head().means_
    head = Head().fit(Z, y)
    with pytest.raises(ValueError, match="has 5 features per row, but the head was fitted with 4"):
        head.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="has 5 features"):
        head.partial_fit(np.zeros((2, 5)), np.zeros(2, dtype=int))
    with pytest.raises(AttributeError, match="use covariances_"):
        Head("full", shrinkage=0.0).fit(Z, y).covariance_


def test_shared_loader_helpers_and_unfitted_certifier():
    """fit's public helpers (shared with the certifier) and the certifier's fittedness check."""
    from gmfast.fit import device_of, split_batch

    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert split_batch((x, y)) == (x, y) and split_batch({"x": x, "y": y, "w": 1}) == (x, y)
    with pytest.raises(TypeError, match="my_loader must yield .* got Tensor"):
        split_batch(x, "my_loader")
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    assert device_of(torch.nn.ReLU(), "meta") == torch.device("meta")
    with pytest.raises(gmfast.NotFittedError, match="GaussianMixtureHead is not fitted yet"):
        gmfast.Certifier(torch.nn.Linear(2, 2), Head("tied", shrinkage=0.0), lipschitz=1.0)


@pytest.mark.parametrize("kind", ["tied", "full", "diag", "spherical"])
def test_default_shrinkage_fits_rank_deficient_pixels_soundly(kind):
    """The head's first call works where the maximum-likelihood covariance is singular (raw
    digits pixels: constant pixels), and the radii stay sound for the classifier it stores."""
    from helpers import bound_reference, dense_params, linear_radius_bruteforce
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:500], y[:500]
    if kind != "spherical":  # (a spherical variance averages over pixels: never zero here)
        with pytest.raises(ValueError, match="zero variance|singular"):
            Head(kind, shrinkage=0.0).fit(X, y)
    head = Head(kind).fit(X, y)
    lam = torch.as_tensor(head.shrinkage_)
    assert bool(((lam > 0) & (lam < 1)).all())
    if kind == "tied":  # the intensity is sklearn's Ledoit-Wolf on the class-centred residuals
        R = X - head.means_.numpy()[y]
        np.testing.assert_allclose(float(lam), ledoit_wolf(R, assume_centered=True)[1], rtol=1e-6)
    elif kind in ("diag", "spherical"):  # the pooled (tied) intensity, for every class
        np.testing.assert_allclose(lam.numpy(), float(Head("tied").fit(X, y).shrinkage_), rtol=1e-12)
    assert float((head.predict(X) == torch.as_tensor(y)).double().mean()) > 0.8
    cert = head.certify(X[:80])
    if kind == "tied":
        p = head.classifier_params
        ref_pred, ref_r = linear_radius_bruteforce(X[:80], p.A.numpy(), p.beta.numpy(), 2)[:2]
    else:
        ref_pred, ref_r = bound_reference(X[:80], *dense_params(head))
    r = cert.radius.double().numpy()
    assert (r <= ref_r * (1 + 1e-9)).all() and (r > 0).mean() > 0.5
    np.testing.assert_array_equal(cert.prediction.numpy()[r > 0], ref_pred[r > 0])
