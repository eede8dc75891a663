"""Float32 working copies across float32's whole exponent range (issue 13.1).

The rounding model of every backend treats a float64 parameter rounded to float32 as a
relative error ``≤ u``; that is false for subnormal results and meaningless for overflow.
These tests attack it with heads whose parameters and latents sweep the float32 range
(the subnormal band down to 2⁻¹⁴⁹, the overflow edge near 3.4e38), and check every
certificate against the stored float64 classifier evaluated **exactly** (rationals;
mpmath for the eigenvalue of a full pair):

* whenever ``R > 0``, the prediction is the exact argmax (lowest index on ties);
* for every other class ``j``, the certificate's own exact margin bound holds on the whole
  ball: tied ``m_cj(z) ≥ R‖a_c − a_j‖₂``; per-class
  ``q_cj(z) − ‖g_cj(z)‖R − ½λ_cj R² ≥ 0`` with the exact gradient ``g`` and curvature
  ``λ_cj = λ_max(P_c − P_j)⁺`` (``q(z+δ) ≥`` that for every ``‖δ‖ ≤ R``).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction as F

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmfast import GaussianMixtureHead as Head
from gmfast import ops
from gmfast._validate import NonFiniteWarning

KINDS = ("tied", "full", "diag", "spherical")
F32_MAX = float(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------------------
# The exact reference
# --------------------------------------------------------------------------------------


def _fr(x) -> F:
    return F(float(x))


def _lam_max_up(H) -> F:
    """An upper bound on ``max(0, λ_max(H))`` for an exact rational symmetric H (mpmath at
    60 digits, raised by far more than its error)."""
    with mpmath.workdps(60):
        M = mpmath.matrix([[mpmath.mpf(x.numerator) / x.denominator for x in row] for row in H])
        ev = mpmath.eigsy(M, eigvals_only=True)
        top = max(ev)
        fro = mpmath.sqrt(sum(x * x for x in M))
        up = top + mpmath.mpf(10) ** -40 * fro
    return max(F(0), F(mpmath.nstr(up, 55, min_fixed=-math.inf, max_fixed=math.inf)))


class Exact:
    """The stored float64 classifier of a head, evaluated in rational arithmetic."""

    def __init__(self, head):
        p = head.classifier_params
        p = p.master or p
        self.kind = head.covariance_type
        if self.kind == "tied":
            self.A = [[_fr(v) for v in row] for row in p.A.tolist()]
            self.beta = [_fr(v) for v in p.beta.tolist()]
            self.K = len(self.beta)
        else:
            self.mu = [[_fr(v) for v in row] for row in p.mu.tolist()]
            self.kappa = [_fr(v) for v in p.kappa.tolist()]
            self.K = len(self.kappa)
            P = p.prec.tolist()
            d = len(self.mu[0])
            if self.kind == "full":
                self.P = [[[_fr(v) for v in row] for row in Pk] for Pk in P]
            elif self.kind == "diag":
                self.P = [[[_fr(Pk[i]) if i == j else F(0) for j in range(d)] for i in range(d)] for Pk in P]
            else:
                self.P = [[[_fr(Pk) if i == j else F(0) for j in range(d)] for i in range(d)] for Pk in P]
            self._lam = {}

    def scores(self, z):
        if self.kind == "tied":
            return [sum((a * x for a, x in zip(ak, z)), bk) for ak, bk in zip(self.A, self.beta)]
        return [self.kappa[k] - self._quad(k, z) / 2 for k in range(self.K)]

    def _grad(self, k, z):  # P_k (z − μ_k)
        w = [x - m for x, m in zip(z, self.mu[k])]
        return [sum(pij * wj for pij, wj in zip(row, w)) for row in self.P[k]]

    def _quad(self, k, z):
        w = [x - m for x, m in zip(z, self.mu[k])]
        return sum(wi * ui for wi, ui in zip(w, self._grad(k, z)))

    def lam(self, c, j):
        if (c, j) not in self._lam:
            H = [[a - b for a, b in zip(rc, rj)] for rc, rj in zip(self.P[c], self.P[j])]
            if self.kind == "full":
                self._lam[c, j] = _lam_max_up(H)
            else:  # diagonal: the largest diagonal entry, exactly
                self._lam[c, j] = max(F(0), max(H[i][i] for i in range(len(H))))
        return self._lam[c, j]

    def check(self, z, pred: int, R: float, what: str) -> None:
        """Fail unless (pred, R) is a valid certificate at the exact point z."""
        if not R > 0:
            return
        assert math.isfinite(R) or self.kind == "tied", f"{what}: infinite radius {R}"
        s = self.scores(z)
        best = max(s)
        argmax = s.index(best)
        assert pred == argmax, f"{what}: R={R:.3g} > 0 but predicted {pred}, exact argmax {argmax}"
        Rf = _fr(R) if math.isfinite(R) else None
        for j in range(self.K):
            if j == pred:
                continue
            q = s[pred] - s[j]
            if self.kind == "tied":
                diff = [a - b for a, b in zip(self.A[pred], self.A[j])]
                n2 = sum(v * v for v in diff)
                if Rf is None:
                    assert n2 == 0 and q > 0, f"{what}: R=inf but class {j} can overtake"
                    continue
                assert q > 0 and q * q >= Rf * Rf * n2, f"{what}: class {j} flips within R={R:.6g}"
            else:
                gc, gj = self._grad(pred, z), self._grad(j, z)
                g2 = sum((b - a) ** 2 for a, b in zip(gc, gj))
                rest = q - self.lam(pred, j) * Rf * Rf / 2
                assert rest >= 0 and rest * rest >= g2 * Rf * Rf, f"{what}: class {j} flips within R={R:.6g}"


# --------------------------------------------------------------------------------------
# Heads and points at a given scale
# --------------------------------------------------------------------------------------


def _head_at(kind, d, K, scale, param_scale, seed):
    """A head via from_params: means of size ``scale``, covariances ``(scale·param_scale)²``
    times a random well-conditioned shape (so A ~ 1/(scale·param_scale²), P ~ 1/(scale·param_scale)²)."""
    g = np.random.default_rng(seed)
    sd = scale * param_scale
    means = g.normal(size=(K, d)) * scale
    if kind == "tied":
        M = g.normal(size=(d, d)) / math.sqrt(d) + np.eye(d) * 1.5
        cov = (M @ M.T) * sd * sd
    elif kind == "full":
        cov = np.empty((K, d, d))
        for k in range(K):
            M = g.normal(size=(d, d)) / math.sqrt(d) + np.eye(d) * 1.5
            cov[k] = (M @ M.T) * sd * sd
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
    elif kind == "diag":
        cov = g.uniform(0.5, 2.0, size=(K, d)) * sd * sd
    else:
        cov = g.uniform(0.5, 2.0, size=K) * sd * sd
    priors = np.full(K, 1.0 / K)
    return Head.from_params(torch.tensor(means), torch.tensor(cov), torch.tensor(priors), kind)


def _points(head, B, seed):
    """Float32 latents near the decision boundaries (pairwise midpoints pulled in) and a few
    typical ones; infinite rows (overflow of the cast) are dropped."""
    g = np.random.default_rng(seed + 1)
    mu = head.means_.numpy()
    K, d = mu.shape
    a, b = g.integers(0, K, size=B), g.integers(0, K, size=B)
    t = 0.5 + g.normal(size=B)[:, None] * np.where(g.random(size=(B, 1)) < 0.5, 1e-3, 0.3)
    scale = np.abs(mu).max()
    Z = t * mu[a] + (1 - t) * mu[b] + g.normal(size=(B, d)) * scale * 0.05
    Z = torch.tensor(Z).float()
    return Z[torch.isfinite(Z).all(1)]


def _certify(head, Z, backend, monkeypatch=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        if backend == "triton":
            # the Triton kernels under the interpreter take CPU tensors; the dispatcher only
            # routes CUDA tensors to them, so route this call by hand
            with monkeypatch.context() as m:
                m.setitem(ops._DEVICE, "triton", None)
                m.setitem(ops._status, "triton", (True, "ok"))
                return head.certify(Z, backend="triton")
        return head.certify(Z, backend=backend)


def _check_all(head, Z, backend, what, monkeypatch=None):
    ex = Exact(head)
    cert = _certify(head, Z, backend, monkeypatch)
    pred, rad = cert.prediction.tolist(), cert.radius.double().tolist()
    for i, z in enumerate(Z.double().tolist()):
        ex.check([_fr(v) for v in z], pred[i], rad[i], f"{what} row {i}")
    return cert


def _backends():
    out = ["reference", "cpu"]
    try:
        import gmfast.triton  # noqa: F401
    except ImportError:
        pass
    else:
        out.append("triton")
    return out


# --------------------------------------------------------------------------------------
# The reported cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["spherical", "diag", "full"])
@pytest.mark.parametrize("scale", [1e20, 1e22])
def test_fit_on_huge_latents(kind, scale, backend):
    """Per-class heads fitted with .fit on latents of scale 1e20–1e22 (precisions below
    float32's normal range): certified float32 near-boundary points get the exact class."""
    g = torch.Generator().manual_seed(3)
    K, d, n = 3, 4, 120
    y = torch.arange(n) % K
    X = (torch.randn(K, d, generator=g, dtype=torch.float64)[y] * 3 + torch.randn(n, d, generator=g,
                                                                                      dtype=torch.float64)) * scale
    head = Head(kind, shrinkage=0.1).fit(X, y)
    Z = _points(head, 60, seed=7)
    cert = _check_all(head, Z, backend, f"{kind} fit x{scale:g} {backend}")
    assert (cert.radius > 0).sum() >= len(Z) // 3  # the attack certifies: it is not vacuous


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_spherical_subnormal_precisions(backend):
    """from_params with precisions ~2⁻¹⁴⁸ (float32 subnormals that round to 1 or 2 ulps):
    predictions are those of the stored classifier, radii hold."""
    d = 3
    means = torch.tensor([[0.0, 0.0, 0.0], [3e22, 1e22, -2e22]], dtype=torch.float64)
    cov = torch.tensor([2.0**148, 2.0**147.3], dtype=torch.float64)
    head = Head.from_params(means, cov, torch.tensor([0.5, 0.5], dtype=torch.float64), "spherical")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(200, 1, generator=g, dtype=torch.float64)
    Z = (t * means[1] + torch.randn(200, d, generator=g, dtype=torch.float64) * 1e21).float()
    cert = _check_all(head, Z, backend, f"spherical 2^-148 {backend}")
    ex = Exact(head)
    exact = [max(range(2), key=lambda k, s=ex.scores([_fr(v) for v in z]): (s[k], -k)) for z in Z.double().tolist()]
    assert cert.prediction.tolist() == exact  # every prediction, certified or not
    assert (cert.radius > 0).any()


def test_forward_and_probabilities_use_the_stored_classifier_when_float32_cannot_hold_it():
    """``predict_proba``/``forward`` on float32 inputs of a head whose float32 copy would be
    subnormal agree with the float64 evaluation (and with ``predict``), not with a different
    classifier."""
    means = torch.tensor([[0.0, 0.0, 0.0], [3e22, 1e22, -2e22]], dtype=torch.float64)
    cov = torch.tensor([2.0**148, 2.0**147.3], dtype=torch.float64)
    head = Head.from_params(means, cov, torch.tensor([0.5, 0.5], dtype=torch.float64), "spherical")
    g = torch.Generator().manual_seed(1)
    Z = (torch.rand(64, 1, generator=g, dtype=torch.float64) * means[1]).float()
    p32, p64 = head.predict_proba(Z), head.predict_proba(Z.double())
    torch.testing.assert_close(p32.double(), p64, rtol=1e-12, atol=1e-12)
    assert torch.equal(p32.argmax(1), head.predict(Z))
    torch.testing.assert_close(head(Z).double(), head(Z.double()), rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tied_subnormal_parameters_huge_inputs(backend):
    """Tied head whose A rounds to float32 subnormals, float32 inputs near 3e38."""
    d, K = 3, 3
    g = np.random.default_rng(5)
    means = torch.tensor(g.normal(size=(K, d)))
    cov = torch.tensor(np.diag([1e40, 2e40, 3e40]))
    head = Head.from_params(means, cov, torch.full((K,), 1.0 / K, dtype=torch.float64), "tied")
    assert 0 < head.classifier_params.A.abs().max() < torch.finfo(torch.float32).tiny
    Z = torch.tensor(g.uniform(-1, 1, size=(100, d)) * 3.3e38).float()
    cert = _check_all(head, Z, backend, f"tied subnormal {backend}")
    assert (cert.radius > 0).any()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_overflowing_scores_run_in_float64(kind, backend):
    """Finite float32 inputs whose float32 scores overflow get the float64 answer (not an
    abstention) and a valid certificate."""
    head = _head_at(kind, 3, 3, 1.0, 1.0, seed=2)
    Z = torch.tensor([[3e38, -3e38, 1e38], [2e38, 2e38, 2e38]], dtype=torch.float32)
    cert = _check_all(head, Z, backend, f"{kind} overflow {backend}")
    assert (cert.prediction >= 0).all()


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def _sweep(kind, backend, scale_exp, spread_exp, seed, monkeypatch):
    """A head with means of size ``2^scale_exp`` and standard deviations ``2^spread_exp``
    times that: precisions ``P ~ 2^-2(scale+spread)``, tied ``A ~ 2^-(scale+2·spread)``, scores
    of order ``2^-2·spread`` (a head as fitted at that scale when ``spread`` is small)."""
    K, d = (3, 2) if backend == "triton" else (3, 3)
    try:
        head = _head_at(kind, d, K, 2.0**scale_exp, 2.0**spread_exp, seed)
    except ValueError as exc:  # parameters beyond float64 are refused at construction, with a reason
        assert any(w in str(exc) for w in ("finite", "singular", "positive", "zero")), exc
        return
    Z = _points(head, 8 if backend == "triton" else 24, seed)
    _check_all(head, Z, backend, f"{kind} {backend} scale=2^{scale_exp} spread=2^{spread_exp}", monkeypatch)


# latents 2^-80 … 2^127 (the float32 overflow edge), weighted towards scales whose natural
# parameters (P ~ 1/scale², A ~ 1/scale) fall into or below float32's subnormal band
_SCALES = st.one_of(st.integers(-80, 127), st.integers(56, 127))
_SPREADS = st.one_of(st.integers(-6, 6), st.integers(-40, 40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), backend=st.sampled_from(["reference", "cpu"]), scale_exp=_SCALES,
       spread_exp=_SPREADS, seed=st.integers(0, 2**16))
def test_fuzz_float32_range(kind, backend, scale_exp, spread_exp, seed, monkeypatch):
    _sweep(kind, backend, scale_exp, spread_exp, seed, monkeypatch)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale_exp,spread_exp", [(73, 0), (100, -3), (-66, 2), (126, 0), (10, 30)])
def test_triton_float32_range(kind, scale_exp, spread_exp, monkeypatch):
    if "triton" not in _backends():
        pytest.skip("triton is not importable")
    _sweep(kind, "triton", scale_exp, spread_exp, seed=abs(scale_exp + spread_exp), monkeypatch=monkeypatch)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), backend=st.sampled_from(_backends()), scale_exp=_SCALES, spread_exp=_SPREADS,
       seed=st.integers(0, 2**16))
def test_fuzz_float32_range_long(kind, backend, scale_exp, spread_exp, seed, monkeypatch):
    _sweep(kind, backend, scale_exp, spread_exp, seed, monkeypatch)
