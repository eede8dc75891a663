"""Multi-prototype heads: EM fit, the sound best-component radius (attacks, line search, mpmath),
M = 1 is the tied head, compare_prototypes."""

import math

import mpmath
import numpy as np
import pytest
import torch
from helpers import dual_norm
from scipy import stats
from scipy.special import logsumexp

from gmfast import GaussianMixtureHead as Head
from gmfast._validate import NonFiniteWarning, NotFittedError
from gmfast.diagnostics import heldout_log_likelihood
from gmfast.distributional import certified_accuracy_gmm
from gmfast.multiproto import ConvergenceWarning, MultiPrototypeHead, compare_prototypes, format_prototype_table

NORMS = [2, math.inf, 1, "mahalanobis"]


def two_modes(n, seed, d=2, noise=1.0):
    """Three classes, each two well-separated clusters (XOR-like: no class mean separates)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[[0, 0], [6, 6]], [[6, 0], [0, 6]], [[3, 12], [12, 3]]], dtype=float)
    centers = np.concatenate([centers, np.zeros((3, 2, d - 2))], axis=2)
    y = rng.integers(0, 3, n)
    m = rng.integers(0, 2, n)
    return centers[y, m] + noise * rng.normal(size=(n, d)), y


@pytest.fixture(scope="module")
def fitted():
    Z, y = two_modes(3000, 0, d=3, noise=1.6)
    return Z, y, MultiPrototypeHead(2, shrinkage=0.1).fit(Z, y)


def np_params(head):
    p = head.classifier_params
    return p.A.numpy(), p.beta.numpy(), head.component_class_.numpy()


def np_predict(head, X):
    """The classifier argmax_k max_m ℓ_km in float64 numpy (lowest index on ties)."""
    A, b, cls = np_params(head)
    return cls[(X @ A.T + b).argmax(-1)]


def np_radius(head, X, norm):
    """R = max over components m of the predicted class of min over other-class components j of
    (ℓ_m − ℓ_j)⁺ / ‖a_m − a_j‖_q, float64 numpy."""
    A, b, cls = np_params(head)
    S = head.covariance_.numpy()
    L = X @ A.T + b
    c = cls[L.argmax(1)]
    D = A[:, None] - A[None]
    N = np.sqrt(np.einsum("mji,il,mjl->mj", D, S, D)) if norm == "mahalanobis" else dual_norm(D, norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (L[:, :, None] - L[:, None, :]) / N[None]  # (B, m, j)
    r = np.where(cls[None, None, :] == c[:, None, None], np.inf, r)
    r_m = np.maximum(r.min(2), 0.0)
    r_m = np.where(cls[None, :] == c[:, None], r_m, -1.0)
    return c, r_m.max(1)


# --------------------------------------------------------------------------- fitting


def test_two_components_fit_better_and_classify_better():
    Z, y = two_modes(3000, 0)
    Zt, yt = two_modes(3000, 1)
    rows = compare_prototypes(Z, y, Zt, yt, Ms=(1, 2), radii=(0.0, 0.5, 1.0))
    one, two = rows
    assert two["loglik"] > one["loglik"] + 0.5  # a much closer fit (nats per sample)
    assert two["clean_accuracy"] > 0.97 > 0.9 > one["clean_accuracy"]  # one Gaussian per class cannot separate
    assert two["accuracy"][0] == two["clean_accuracy"] and np.all(np.diff(two["accuracy"]) <= 0)
    assert np.all(two["accuracy"] > one["accuracy"]) and two["components"] == 6 and one["components"] == 3
    text = format_prototype_table(rows)
    assert "held-out LL" in text and len(text.splitlines()) == 5


@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_em_is_monotone_and_reaches_a_fixed_point(shrinkage):
    Z, y = two_modes(1500, 2, d=3, noise=2.0)  # overlapping components: a real EM run
    head = MultiPrototypeHead(2, shrinkage=shrinkage, tol=1e-11, max_iter=2000).fit(Z, y)
    h = np.array(head.objective_history_)
    assert head.converged_ and len(h) >= 3 and np.all(np.diff(h) >= -1e-11), np.diff(h).min()
    w, mu, cls, S = (head.component_weights_.numpy(), head.component_means_.numpy(),
                     head.component_class_.numpy(), head.covariance_.numpy())
    # independent E-step (scipy densities) then M-step: the fitted parameters are its fixed point
    n, d = Z.shape
    scatter = np.zeros((d, d))
    for k in range(3):
        comps = np.flatnonzero(cls == k)
        Xk = Z[y == k]
        lg = np.stack([np.log(w[m]) + stats.multivariate_normal(mu[m], S).logpdf(Xk) for m in comps], 1)
        r = np.exp(lg - logsumexp(lg, 1, keepdims=True))
        np.testing.assert_allclose(r.sum(0) / len(Xk), w[comps], atol=1e-6)
        mk = (r.T @ Xk) / r.sum(0)[:, None]
        np.testing.assert_allclose(mk, mu[comps], atol=1e-5)
        for j, m in enumerate(comps):
            R = (Xk - mk[j]) * np.sqrt(r[:, j:j + 1])
            scatter += R.T @ R
    Sw = scatter / n
    base = Head("tied", shrinkage=0.0).fit(Z, y).covariance_.numpy()
    want = (1 - shrinkage) * Sw + shrinkage * np.trace(base) / d * np.eye(d)
    np.testing.assert_allclose(S, want, atol=1e-5)
    np.testing.assert_allclose(np.bincount(cls, weights=w), 1.0, rtol=1e-12)
    # the objective is the penalised log-likelihood of the returned parameters
    ll = heldout_log_likelihood(head, Z, y)
    pen = 0.0 if shrinkage == 0 else 0.5 * shrinkage / (1 - shrinkage) * (
        np.linalg.slogdet(S)[1] + np.trace(base) / d * np.trace(np.linalg.inv(S)))
    assert head.objective_ == pytest.approx(ll - pen, rel=1e-9)


@pytest.mark.parametrize("shrinkage", [0.0, 0.2, "ledoit-wolf"])
def test_one_component_is_the_tied_head(shrinkage):
    Z, y = two_modes(800, 3, d=4)
    mp = MultiPrototypeHead(1, shrinkage=shrinkage).fit(Z, y)
    tied = Head("tied", shrinkage=shrinkage).fit(Z, y)
    assert torch.equal(mp.component_means_, tied.means_) and torch.equal(mp.covariance_, tied.covariance_)
    assert mp.shrinkage_ == tied.shrinkage_ and mp.n_iter_ == 0
    for dtype in (torch.float64, torch.float32):
        X = torch.tensor(Z, dtype=dtype)
        for norm in NORMS:
            a, b = mp.certify(X, norm=norm), tied.certify(X, norm=norm, backend="reference")
            assert torch.equal(a.prediction, b.prediction)
            assert torch.equal(a.radius, b.radius), norm
        torch.testing.assert_close(mp(X), tied(X))
    assert torch.equal(mp.predict(Z), tied.predict(Z))


def test_forward_is_the_mixture_density(fitted):
    Z, y, head = fitted
    w, mu, cls, S = (head.component_weights_.numpy(), head.component_means_.numpy(),
                     head.component_class_.numpy(), head.covariance_.numpy())
    pri = head.priors_.numpy()
    X = Z[:300]
    want = np.stack([logsumexp(np.stack([np.log(pri[k] * w[m]) + stats.multivariate_normal(mu[m], S).logpdf(X)
                                         for m in np.flatnonzero(cls == k)]), 0) for k in range(3)], 1)
    np.testing.assert_allclose(head(torch.tensor(X)).numpy(), want, rtol=1e-10)
    # the decision rule is the best component, not the density's argmax
    assert (head.predict(X).numpy() == np_predict(head, X)).all()


# --------------------------------------------------------------------------- certificate


@pytest.mark.parametrize("norm", NORMS)
def test_radius_matches_the_numpy_formula(fitted, norm):
    Z, y, head = fitted
    X = torch.tensor(Z[:1000])
    c_ref, r_ref = np_radius(head, Z[:1000], norm)
    exact = head.certify(X, norm=norm, fp_sound=False)
    sound = head.certify(X, norm=norm)
    assert (exact.prediction.numpy() == c_ref).all() and (sound.prediction.numpy() == c_ref).all()
    np.testing.assert_allclose(exact.radius.numpy(), r_ref, rtol=1e-9, atol=1e-12)
    assert (sound.radius <= exact.radius).all()
    np.testing.assert_allclose(sound.radius.numpy(), r_ref, rtol=1e-9, atol=1e-11)
    _, _, cls = np_params(head)
    assert (cls[sound.extra["component"].numpy()] == c_ref).all()


def test_the_max_over_the_class_components_pays():
    """Class 0 has two clusters in a row facing class 1: at a point nearer the far cluster, the
    winning component's polyhedron ends at its own facet, the other component's much later."""
    rng = np.random.default_rng(9)
    centers = np.array([[0.0, 0.0], [3.0, 0.0], [9.0, 0.0], [4.0, 9.0]])
    lab = np.array([0, 0, 1, 2])
    which = rng.integers(0, 4, 2000)
    Z, y = centers[which] + 0.7 * rng.normal(size=(2000, 2)), lab[which]
    head = MultiPrototypeHead(2).fit(Z, y)
    X = np.column_stack([np.linspace(-1, 1.5, 50), np.zeros(50)])
    cert = head.certify(torch.tensor(X))
    A, b, cls = np_params(head)
    win = (X @ A.T + b).argmax(1)
    by_other = cert.extra["component"].numpy() != win
    assert by_other.sum() >= 10 and (cert.prediction == 0).all()
    # the winner alone (the polyhedron of the argmax component) certifies less there
    L = X @ A.T + b
    others = np.flatnonzero(cls != 0)
    gap = np.linalg.norm(A[win][:, None] - A[others], axis=2)
    r_win = np.min((L[np.arange(50), win][:, None] - L[:, others]) / gap, 1)
    gain = cert.radius.numpy()[by_other] / r_win[by_other]
    assert np.all(gain > 1) and gain.max() > 1.4
    np.testing.assert_allclose(cert.radius.numpy(), np_radius(head, X, 2)[1], rtol=1e-9)


def _directions(head, z, c, norm, rng, n_random=200):
    """Random unit directions plus, for every component m of class c and every component j of
    another class, the direction that decreases ℓ_m − ℓ_j fastest per unit of the threat norm."""
    A, _, cls = np_params(head)
    d = A.shape[1]
    dirs = [rng.normal(size=(n_random, d))]
    for m in np.flatnonzero(cls == c):
        for j in np.flatnonzero(cls != c):
            g = A[m] - A[j]
            if norm == 2:
                dirs.append(-g[None])
            else:  # l-inf: −sign(g) is the maximiser of the decrease gᵀ(−v) over ‖v‖∞ ≤ 1
                dirs.append(-np.sign(g)[None])
    V = np.concatenate(dirs)
    return V / (np.linalg.norm(V, axis=1, keepdims=True) if norm == 2 else np.abs(V).max(1, keepdims=True))


def _first_flip(head, z, c, V, t_max, n=400):
    """Per direction, the first t in (0, t_max] with a different prediction (fine grid then
    bisection, float64); inf if none."""
    ts = np.linspace(0, t_max, n + 1)[1:]
    P = z[None, None] + ts[None, :, None] * V[:, None, :]
    flip = np_predict(head, P) != c
    out = np.full(len(V), np.inf)
    for i in np.flatnonzero(flip.any(1)):
        j = flip[i].argmax()
        lo, hi = (ts[j - 1] if j else 0.0), ts[j]
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if np_predict(head, z + mid * V[i]) != c else (mid, hi)
        out[i] = hi
    return out


@pytest.mark.parametrize("norm", [2, math.inf])
def test_radius_is_never_beaten(fitted, norm):
    """Nothing flips strictly inside R along random and worst-case directions, and a fine line
    search never finds the decision boundary closer than R."""
    Z, y, head = fitted
    Zt, _ = two_modes(120, 4, d=3, noise=1.6)
    cert = head.certify(torch.tensor(Zt), norm=norm)
    rng = np.random.default_rng(0)
    checked, slack = 0, []
    for i in range(len(Zt)):
        R, c = float(cert.radius[i]), int(cert.prediction[i])
        if R == 0:
            continue
        V = _directions(head, Zt[i], c, norm, rng)
        for frac in (0.5, 0.9, 0.999, 1 - 1e-7):
            assert (np_predict(head, Zt[i] + frac * R * V) == c).all(), f"row {i}: flipped at {frac} R"
        first = _first_flip(head, Zt[i], c, V, 4 * R)
        assert first.min() >= R, (i, first.min(), R)
        slack.append(first.min() / R)
        checked += 1
    assert checked >= 80
    assert np.median(slack) < 1.5  # and it is not vacuous


def test_the_attack_finds_a_flip_just_beyond_an_exact_radius():
    """The harness can fail: with M = 1 the radius is exact, and 1.001 R along the worst
    direction crosses the boundary for every certified point."""
    Z, y = two_modes(1500, 5, d=3, noise=1.6)
    head = MultiPrototypeHead(1).fit(Z, y)
    cert = head.certify(torch.tensor(Z[:100]))
    rng = np.random.default_rng(1)
    for i in range(100):
        R, c = float(cert.radius[i]), int(cert.prediction[i])
        if R == 0:
            continue
        V = _directions(head, Z[i], c, 2, rng, n_random=0)
        assert not (np_predict(head, Z[i] + 1.001 * R * V) == c).all(), i
        assert _first_flip(head, Z[i], c, V, 2 * R).min() == pytest.approx(R, rel=1e-6)


def test_float32_near_boundaries_is_sound():
    """Float32 points within rounding distance of a facet between components of different
    classes: the sound radius never exceeds the exact one (mpmath, 50 digits) at the point."""
    Z, y = two_modes(2000, 6, d=3, noise=1.6)
    head = MultiPrototypeHead(2).fit(Z, y)
    A, b, cls = np_params(head)
    rng = np.random.default_rng(2)
    pts = []
    for _ in range(150):
        z0 = Z[rng.integers(len(Z))] + rng.normal(size=3)
        L = A @ z0 + b
        m = int(L.argmax())
        j = int(rng.choice(np.flatnonzero(cls != cls[m])))
        g = A[m] - A[j]
        z = z0 - (L[m] - L[j]) / (g @ g) * g  # onto ℓ_m = ℓ_j
        pts.append(z + rng.normal(size=3) * 1e-6 * rng.choice([0.0, 1.0, 10.0]))
    X = torch.tensor(np.array(pts), dtype=torch.float32)
    cert = head.certify(X)
    assert (cert.radius > 0).sum() >= 30 and (cert.radius == 0).sum() >= 10
    with mpmath.workdps(50):
        Am = [[mpmath.mpf(float(v)) for v in row] for row in A]
        bm = [mpmath.mpf(float(v)) for v in b]
        for x, c_hat, r_hat in zip(X.double().numpy(), cert.prediction.tolist(), cert.radius.tolist()):
            xm = [mpmath.mpf(float(v)) for v in x]
            L = [mpmath.fsum(a * v for a, v in zip(row, xm)) + bb for row, bb in zip(Am, bm)]
            top = max(L)
            c = int(cls[min(i for i in range(len(L)) if L[i] == top)])
            best = mpmath.mpf(0)
            for m in np.flatnonzero(cls == c):
                r = mpmath.inf
                for j in np.flatnonzero(cls != c):
                    den = mpmath.sqrt(mpmath.fsum((Am[m][i] - Am[j][i]) ** 2 for i in range(3)))
                    r = min(r, (L[m] - L[j]) / den)
                best = max(best, r)
            assert mpmath.mpf(r_hat) <= best, (x, r_hat, best)
            if r_hat > 0:
                assert c_hat == c


def test_certified_accuracy_of_the_multiprototype_mixture():
    """CA_Q by gmfast's Monte Carlo against numpy draws from the component mixture and the
    numpy radius formula."""
    Z, y = two_modes(2000, 7, d=3, noise=1.6)
    head = MultiPrototypeHead(2).fit(Z, y)
    radii = [0.0, 0.5, 1.0, 2.0]
    ca = certified_accuracy_gmm(head, radii, n_samples=40_000)
    assert ca.method.startswith("Monte Carlo")
    rng = np.random.default_rng(3)
    w, mu, cls, S = (head.component_weights_.numpy(), head.component_means_.numpy(),
                     head.component_class_.numpy(), head.covariance_.numpy())
    n = 40_000
    comp = rng.choice(len(w), size=n, p=head.priors_.numpy()[cls] * w)
    X = mu[comp] + rng.normal(size=(n, 3)) @ np.linalg.cholesky(S).T
    c, r = np_radius(head, X, 2)
    hit = (c == cls[comp])[:, None] & (r[:, None] >= np.asarray(radii)[None])
    ref, se = hit.mean(0), hit.std(0) / math.sqrt(n)
    assert np.all(np.abs(ca.estimate - ref) <= 4 * np.hypot(se, ca.stderr) + 1e-9), (ca.estimate, ref)


# --------------------------------------------------------------------------- API


def test_errors_and_edge_cases():
    with pytest.raises(ValueError, match="n_components"):
        MultiPrototypeHead(0)
    head = MultiPrototypeHead(3)
    with pytest.raises(NotFittedError, match="not fitted"):
        head.priors_
    with pytest.raises(NotFittedError, match="not fitted"):
        head.certify(np.zeros((2, 2)))
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(12, 2))
    y = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    head.fit(Z, y)  # class 0 has 2 samples: 2 components there
    assert head.n_components_.tolist() == [2, 3]
    with pytest.raises(ValueError, match="features"):
        head.certify(np.zeros((2, 3)))
    with pytest.warns(NonFiniteWarning):
        cert = head.certify(np.array([[np.nan, 0.0], [0.0, 0.0]]))
    assert cert.prediction[0] == -1 and cert.radius[0] == 0 and cert.prediction[1] >= 0
    Zo, yo = two_modes(600, 8, d=3, noise=2.5)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        slow = MultiPrototypeHead(3, max_iter=2, tol=0.0).fit(Zo, yo)
    assert not slow.converged_ and slow.n_iter_ == 2
    with pytest.warns(ConvergenceWarning, match="one step"):
        MultiPrototypeHead(2, max_iter=1).fit(Zo, yo)


@pytest.mark.parametrize("kind", ["multi", "tied", "full"])
def test_working_copy_is_built_once_under_concurrency(kind, fitted, monkeypatch):
    """Both heads share one base: concurrent first calls build the (device, dtype) working copy
    once (double-checked under the base's lock) and every caller gets that copy."""
    import threading
    import time

    Z, y, multi = fitted
    head = multi if kind == "multi" else Head(kind, shrinkage=0.1).fit(Z, y)
    head._set_state(head._state)  # a fresh state: no working copies yet
    built = []
    original = type(head)._working_copy

    def slow(self, device, dtype):
        built.append(dtype)
        time.sleep(0.05)  # hold the window open: without the lock every thread would build
        return original(self, device, dtype)

    monkeypatch.setattr(type(head), "_working_copy", slow)
    X = torch.tensor(Z[:64], dtype=torch.float32)
    barrier = threading.Barrier(6)
    seen = []

    def call():
        barrier.wait()
        seen.append(head._prepare(X)[1])

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [torch.float32]
    assert len(seen) == 6 and all(w is seen[0] for w in seen)
    assert list(head._work) == [(X.device, torch.float32)]


@pytest.mark.parametrize("kind", ["multi", "tied"])
def test_heads_copy_and_pickle(kind, fitted):
    """deepcopy/pickle drop the lock and the working copies and rebuild them: the copy certifies
    exactly as the original, and refitting the copy leaves the original alone."""
    import copy
    import pickle

    Z, y, multi = fitted
    head = multi if kind == "multi" else Head(kind, shrinkage=0.1).fit(Z, y)
    X = torch.tensor(Z[:100], dtype=torch.float32)
    a = head.certify(X)
    for twin in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        assert twin._work == {} and twin._lock is not head._lock
        b = twin.certify(X)
        assert torch.equal(a.prediction, b.prediction) and torch.equal(a.radius, b.radius)
    twin = copy.deepcopy(head)
    twin._set_state(None)
    with pytest.raises(NotFittedError, match=f"this {type(head).__name__} is not fitted yet"):
        twin.certify(X)
    assert torch.equal(head.certify(X).radius, a.radius)
