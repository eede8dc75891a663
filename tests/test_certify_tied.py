"""Tied (linear) certificates: exact radius in four norms, tightness, attacks, fp soundness."""

import math

import mpmath
import numpy as np
import pytest
import torch
from helpers import blobs, linear_radius_bruteforce, mp_linear_radius
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis as LDA

from gmfast import GaussianMixtureHead as Head

BACKENDS = ["reference", "cpu"]
NORMS = [2, math.inf, 1, "mahalanobis"]


@pytest.fixture(scope="module")
def fitted():
    Z, y = blobs(2000, 6, 5, sep=1.5, seed=21)
    return Z, y, Head("tied", shrinkage=0.0).fit(Z, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_radius_equals_bruteforce_with_sklearn_coefficients(fitted, backend, norm):
    Z, y, head = fitted
    lda = LDA(solver="lsqr").fit(Z, y)  # independent W = Σ⁻¹μ, b
    pred_ref, rad_ref, bind, runner = linear_radius_bruteforce(Z, lda.coef_, lda.intercept_, norm, lda.covariance_)
    exact = head.certify(torch.tensor(Z), norm=norm, fp_sound=False, backend=backend)
    sound = head.certify(torch.tensor(Z), norm=norm, backend=backend)
    assert (exact.prediction.numpy() == pred_ref).all()
    np.testing.assert_allclose(exact.radius.numpy(), rad_ref, rtol=1e-8, atol=1e-12)
    # the fp-sound radius is below the exact one by a rounding-sized amount only
    assert (sound.radius.numpy() <= exact.radius.numpy()).all()
    np.testing.assert_allclose(sound.radius.numpy(), rad_ref, rtol=1e-9, atol=1e-11)
    # the data has rows whose binding class is not the runner-up, and they are right
    differs = bind != runner
    assert differs.sum() >= 20
    runner_only = np.array([
        (Z[i] @ (lda.coef_[pred_ref[i]] - lda.coef_[runner[i]]) + lda.intercept_[pred_ref[i]] - lda.intercept_[runner[i]])
        for i in range(len(Z))]) / np.array([
            math.sqrt((lda.coef_[pred_ref[i]] - lda.coef_[runner[i]]) @ lda.covariance_ @ (lda.coef_[pred_ref[i]] - lda.coef_[runner[i]]))
            if norm == "mahalanobis" else np.linalg.norm(lda.coef_[pred_ref[i]] - lda.coef_[runner[i]],
                                                          {2: 2, math.inf: 1, 1: np.inf}[norm])
            for i in range(len(Z))])
    assert (exact.radius.numpy()[differs] < runner_only[differs] * (1 - 1e-6)).all()


def _optimal_step(head, z, c, j, norm):
    """Unit-cost direction that decreases the margin m_cj fastest in the threat norm."""
    A = head.classifier_params.A.numpy()
    da = A[c] - A[j]
    if norm == 2:
        return -da / np.linalg.norm(da)
    if norm == math.inf:
        return -np.sign(da)
    if norm == 1:
        i = np.abs(da).argmax()
        e = np.zeros_like(da)
        e[i] = -np.sign(da[i])
        return e
    S = head.covariance_.numpy()
    return -S @ da / math.sqrt(da @ S @ da)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_tight_along_optimal_direction(fitted, backend, norm):
    Z, y, head = fitted
    Zt = torch.tensor(Z[:300])
    cert = head.certify(Zt, norm=norm, backend=backend)
    A = head.classifier_params.A.numpy()
    b = head.classifier_params.beta.numpy()
    _, rad, bind, _ = linear_radius_bruteforce(Z[:300], A, b, norm, head.covariance_.numpy())
    checked = 0
    for i in range(300):
        R = cert.radius[i].item()
        if R < 1e-6:
            continue
        c = cert.prediction[i].item()
        v = _optimal_step(head, Z[i], c, bind[i], norm)
        inside = torch.tensor(np.stack([Z[i] + R * (1 - 1e-3) * v, Z[i] + R * (1 + 1e-3) * v]))
        p_in, p_out = head.predict(inside, backend=backend).tolist()
        assert p_in == c, f"row {i}: flipped inside the certified radius"
        assert p_out != c, f"row {i}: a step of 1.001 R along the optimal direction did not flip: radius not tight"
        checked += 1
    assert checked > 250


@pytest.mark.parametrize("norm", NORMS)
def test_random_directions_never_flip_inside(fitted, norm):
    Z, y, head = fitted
    rng = np.random.default_rng(5)
    Zs = Z[:200]
    cert = head.certify(torch.tensor(Zs), norm=norm)
    S = head.covariance_.numpy()
    L = np.linalg.cholesky(S)
    for i in range(200):
        R = cert.radius[i].item()
        v = rng.normal(size=(500, Zs.shape[1]))
        if norm == "mahalanobis":
            v = v @ L.T  # δᵀΣ⁻¹δ = ‖L⁻¹δ‖²: δ = L w with ‖w‖ = 1
            v /= np.sqrt(np.einsum("nd,de,ne->n", v, np.linalg.inv(S), v))[:, None]
        else:
            v /= np.linalg.norm(v, ord={2: 2, math.inf: np.inf, 1: 1}[norm], axis=1)[:, None]
        pts = torch.tensor(Zs[i] + 0.9999 * R * v)
        assert (head.predict(pts) == cert.prediction[i]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [2, math.inf, 1])
def test_fp_sound_near_the_boundary(backend, dtype, norm):
    """Points within rounding distance of a decision boundary: the returned radius is never
    above the exact radius of the float64 classifier at the exact input point."""
    Z, y = blobs(400, 4, 6, sep=2.0, seed=31)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    A = head.classifier_params.A.numpy()
    b = head.classifier_params.beta.numpy()
    rng = np.random.default_rng(0)
    pts = []
    for z0 in Z[:60]:
        L = A @ z0 + b
        c, j = np.argsort(-L)[:2]
        da = A[c] - A[j]
        zb = z0 - (L[c] - L[j]) / (da @ da) * da  # on the c/j boundary (up to float64 rounding)
        for s in (0.0, 1e-9, 1e-7, 1e-6, 1e-5):
            pts.append(zb + s * np.linalg.norm(zb) * rng.normal(size=zb.shape))
    X = torch.tensor(np.array(pts)).to(dtype)
    sound = head.certify(X, norm=norm, backend=backend)
    loose = head.certify(X, norm=norm, backend=backend, fp_sound=False)
    violations_loose = 0
    for i in range(X.shape[0]):
        c_ex, r_ex = mp_linear_radius(X[i].double().numpy(), A, b, norm)
        r = mpmath.mpf(sound.radius[i].item())
        assert r <= r_ex, f"point {i}: returned {r} > exact {r_ex}"
        if sound.prediction[i].item() != c_ex:
            assert sound.radius[i].item() == 0.0
        violations_loose += mpmath.mpf(loose.radius[i].item()) > r_ex
    if dtype == torch.float32:
        # the points really are within rounding distance: without the correction some
        # returned radii exceed the exact ones (this is what fp_sound is for)
        assert violations_loose > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_dtype_device_and_unpacking(fitted, backend):
    Z, y, head = fitted
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        pred, rad = head.certify(torch.tensor(Z[:10]).to(dt), backend=backend)
        assert pred.dtype == torch.int64 and rad.dtype == torch.float32 and rad.shape == (10,)
    cert = head.certify(Z[:10], backend=backend)  # numpy float64 in
    assert cert.radius.dtype == torch.float64 and len(cert) == 10
    empty = head.certify(torch.zeros(0, 5), backend=backend)
    assert empty.prediction.shape == (0,) and empty.radius.shape == (0,)


def test_float32_radius_rounded_down():
    from gmfast._fp import round_down_to

    r64 = torch.tensor(np.random.default_rng(0).uniform(0, 10, 10_000))
    mine = round_down_to(r64, torch.float32)
    assert mine.dtype == torch.float32
    assert (mine.double() <= r64).all()
    assert ((r64 - mine.double()) <= r64 * 2.0**-23).all()  # at most one float32 ulp below
    assert (r64.float().double() > r64).any()  # round-to-nearest alone would round some up
    # the edges of the integer step (one less in the bit pattern): zero, exact values, float32
    # subnormals and their smallest one, values past float32's largest, and +inf
    tiny, big = 2.0**-149, float(torch.finfo(torch.float32).max)
    edge = torch.tensor([0.0, 1.0, 0.1, tiny, 0.7 * tiny, 1.3 * tiny, 1e-40, 2.0**-126 * (1 - 2**-30), big,
                         big * (1 + 2.0**-30), 1e300, math.inf], dtype=torch.float64)
    got = round_down_to(edge, torch.float32).double()
    want = torch.tensor([0.0, 1.0, float(np.nextafter(np.float32(0.1), np.float32(0))), tiny, 0.0, tiny,
                         float(np.float32(1e-40)) if float(np.float32(1e-40)) <= 1e-40
                         else float(np.nextafter(np.float32(1e-40), np.float32(0))),
                         2.0**-126 - tiny, big, big, big, math.inf], dtype=torch.float64)
    assert torch.equal(got, want), (got, want)


def test_norm_errors(fitted):
    Z, y, head = fitted
    with pytest.raises(ValueError, match="norm must be one of"):
        head.certify(Z[:2], norm=3)
    full = Head("full", shrinkage=0.0).fit(Z, y)
    with pytest.raises(ValueError, match="certifies norm=2 only"):
        full.certify(Z[:2], norm=math.inf)


@pytest.mark.parametrize("flag", [True, False, np.bool_(True), torch.tensor(True)])
def test_a_bool_is_not_a_norm(fitted, flag):
    """``norm=True`` used to be read as ``norm=1`` (``True == 1``) and gave ℓ1 radii."""
    Z, y, head = fitted
    with pytest.raises(ValueError, match="a bool is not a norm"):
        head.certify(Z[:2], norm=flag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_radii_do_not_depend_on_memory_layout(fitted, backend, dtype, norm):
    """The same values, contiguous, with a row stride, or column-major (transposed), give
    bit-identical predictions and radii."""
    Z, y, head = fitted
    X = torch.tensor(Z[:300], dtype=dtype)
    strided = torch.cat([X, X], 1)[:, : X.shape[1]]
    colmajor = X.T.contiguous().T
    want = head.certify(X, norm=norm, backend=backend)
    for other in (strided, colmajor):
        assert not other.is_contiguous()
        got = head.certify(other, norm=norm, backend=backend)
        assert torch.equal(got.prediction, want.prediction) and torch.equal(got.radius, want.radius)
