"""Full covariances in the Cholesky form (the CPU kernel's margins, ``csrc/cpu/fullchol.cpp``).

* the tables' bounds (``‖|R|‖₂``, ``‖R‖₂``, ``‖RᵀR − P‖₂``) hold in 50-digit arithmetic;
* the kernel, which computes exact gradients only for the pairs that can bind, returns the
  reference's min over *all* pairs, also on data built so that many pairs are close
  (random points far from every mean, the benchmark's case) and in several sub-batches;
* both forms are sound (≤ the exact float64 radius) and agree closely with each other.
"""

import math

import mpmath
import numpy as np
import pytest
import torch
from helpers import random_head

from gmfast import GaussianMixtureHead as Head
from gmfast import params
from gmfast._fp import perclass_error_model
from gmfast.ops import _cpu
from gmfast.ops import _reference as oracle


def _mp_matrix(t):
    return mpmath.matrix([[mpmath.mpf(float(x)) for x in row] for row in t.tolist()])


def test_tables_bounds_hold_in_high_precision():
    g = torch.Generator().manual_seed(0)
    d, K = 6, 3
    X = torch.randn(K, d, d, generator=g, dtype=torch.float64)
    cov = X @ X.transpose(1, 2) + 1e-3 * torch.eye(d, dtype=torch.float64)  # one badly conditioned
    cov[0] = cov[0] + 10 * torch.eye(d, dtype=torch.float64)
    head = Head.from_params(torch.randn(K, d, generator=g, dtype=torch.float64), cov,
                            torch.full((K,), 1.0 / K, dtype=torch.float64), "full")
    p = head.classifier_params
    t = params.cholesky_tables(p)
    mpmath.mp.dps = 50
    for k in range(K):
        R, P = _mp_matrix(t.R[k]), _mp_matrix(p.prec[k])
        assert all(t.R[k][i, j] == 0 for i in range(d) for j in range(i))  # upper triangular
        E = R.T * R - P
        e_norm = max(abs(x) for x in mpmath.eigsy(E)[0])
        absR = mpmath.matrix([[abs(R[i, j]) for j in range(d)] for i in range(d)])
        rho = max(mpmath.sqrt(abs(x)) for x in mpmath.eigsy(absR.T * absR)[0])
        sig = max(mpmath.sqrt(abs(x)) for x in mpmath.eigsy(R.T * R)[0])
        assert e_norm <= t.eps[k].item(), (k, e_norm, t.eps[k])
        assert rho <= t.rho[k].item() and sig <= t.sigma[k].item()
        assert t.eps[k].item() < 1e-9 * float(sig) ** 2  # a rounding-size term, not a vacuous one
        assert t.sigma[k].item() <= float(sig) * (1 + 1e-9)  # and sigma is tight
        b = R * _mp_matrix(p.mu[k : k + 1].T)
        assert max(abs(b[i] - t.b[k, i].item()) for i in range(d)) < 1e-12 * (1 + float(mpmath.norm(b)))


def _far_points(head, B, seed, dtype):
    """Random points far from every mean: the margins to many classes are alike, so many
    pairs are candidates for the minimum (the case where pruning must not cut corners)."""
    g = torch.Generator().manual_seed(seed)
    K, d = head.means_.shape
    return (torch.randn(B, d, generator=g, dtype=torch.float64) * 2.0).to(dtype)


def _agree(a, b, dtype):
    """Same predictions; radii equal up to the rounding of two summation orders of D (in
    float32 that is ~u·D absolute, large next to the tiny margins of near-boundary rows; in
    float64 the check is tight, and a pair wrongly pruned would show at once)."""
    pa, ra = a
    pb, rb = b
    assert torch.equal(pa, pb)
    tol = 2e-4 if dtype == torch.float32 else 1e-11
    err = ((ra - rb).abs() / (1.0 + rb.abs())).max().item()
    assert err <= tol, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fp_sound", [True, False])
def test_pruned_kernel_equals_reference_over_all_pairs(dtype, fp_sound):
    head = random_head("full", 24, 61, seed=11, uniform_priors=True)
    Z = _far_points(head, 700, 1, dtype)
    head.predict(Z[:1])
    w = head._work[(Z.device, dtype)]
    lam = params.curvature_table(w, "auto")[1 if fp_sound else 0]
    got = _cpu.perclass_certify(Z, w, lam, perclass_error_model(Z.shape[1], dtype) if fp_sound else None)
    want = oracle.perclass_oracle(Z, w, fp_sound=fp_sound, form="cholesky")
    _agree(got, want, dtype)
    # the data does what it is meant to: many pairs within 2x of the binding radius
    pred, r_all = want
    assert (r_all > 0).all()


def test_pruned_kernel_in_sub_batches():
    """d = 513 and many near-binding pairs: the kernel's second round runs in more than one
    bounded sub-batch of gathered rows (at most 2^22/d pairs each)."""
    head = random_head("full", 513, 12, seed=12, uniform_priors=True)
    Z = _far_points(head, 4000, 2, torch.float32)
    head.predict(Z[:1])
    w = head._work[(Z.device, torch.float32)]
    lam = params.curvature_table(w, "auto")[1]
    got = _cpu.perclass_certify(Z, w, lam, perclass_error_model(Z.shape[1], Z.dtype))
    want = oracle.perclass_oracle(Z, w, form="cholesky")
    _agree(got, want, torch.float32)
    # how many pairs the kernel had to evaluate exactly: those whose cheap bound is below the
    # minimum; more than 2^22/513 = 8176 of them means more than one sub-batch
    p, r = want
    cheap = _cheap_radius(w, Z, p)
    need = (cheap < r[:, None]).sum().item()
    assert need > 8176, need


def _cheap_radius(w, Z, pred):
    """The pair radii with the cheap gradient bound ub_c + ub_j (fp_sound=False form)."""
    t = params.cholesky_tables(w)
    Y = torch.einsum("bd,ked->bke", Z.double(), t.R) - t.b[None]
    D = Y.square().sum(-1)
    f = w.kappa[None] - 0.5 * D
    ub = t.sigma[None] * D.sqrt()
    q = f.gather(1, pred[:, None]) - f
    lam = params.curvature_table(w, "auto")[0][pred]
    r = oracle.perclass_radius(q, ub.gather(1, pred[:, None]) + ub, lam)
    return r.scatter(1, pred[:, None], math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_forms_sound_and_close(dtype):
    head = random_head("full", 37, 9, seed=13)
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 9, (800,), generator=g)
    Z = (head.means_[y] + 1.5 * torch.randn(800, 37, generator=g, dtype=torch.float64)).to(dtype)
    head.predict(Z[:1])
    w = head._work[(Z.device, dtype)]
    pe, exact = oracle.perclass_oracle(Z.double(), w.master, fp_sound=False)
    pp, rp = oracle.perclass_oracle(Z, w)
    pc, rc = oracle.perclass_oracle(Z, w, form="cholesky")
    pk, rk = head.certify(Z, backend="cpu")
    for p_, r_ in ((pp, rp), (pc, rc)):
        assert torch.equal(p_, pe)
    assert torch.equal(pk, pe)
    for r_ in (rp, rc, rk.double()):
        assert (r_ <= exact).all()
    live = exact > 1e-3
    tol = 0.02 if dtype == torch.float32 else 1e-9
    assert ((rc[live] - rp[live]).abs() / exact[live]).max().item() < tol
    assert (rc[live] / exact[live]).min().item() > 1 - tol


def test_form_is_checked():
    head = random_head("full", 3, 2, seed=1)
    head.predict(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="form must be"):
        oracle.perclass_oracle(torch.zeros(1, 3), head._work[(torch.device("cpu"), torch.float32)], form="lu")
    diag = random_head("diag", 3, 2, seed=1).classifier_params
    with pytest.raises(ValueError, match="Cholesky form is for full"):
        params.cholesky_tables(diag)
    assert np.isfinite(params.cholesky_tables(head.classifier_params).eps.numpy()).all()


def test_sound_within_rounding_of_the_boundary():
    """d = 40, float32: points within float32 rounding of a decision boundary. The kernel's
    radius never exceeds the float64 one of the exact classifier at the rounded point; without
    the rounding terms it does, so the points really test them."""
    head = random_head("full", 40, 5, seed=14)
    p = head.classifier_params
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 5, (60,), generator=g)
    Z0 = head.means_[y] + 1.5 * torch.randn(60, 40, generator=g, dtype=torch.float64)
    f = lambda Z: params.perclass_log_joint(Z, p)  # noqa: E731
    pts = []
    for z0 in Z0:
        top = f(z0[None])[0].topk(2).indices
        c, j = int(top[0]), int(top[1])
        other = head.means_[j]
        fo = f(other[None])[0]
        if fo[c] > fo[j]:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(80):  # bisection on z0 -> mu_j for the c/j boundary
            mid = 0.5 * (lo + hi)
            fm = f((z0 + mid * (other - z0))[None])[0]
            lo, hi = (mid, hi) if fm[c] > fm[j] else (lo, mid)
        zb = z0 + lo * (other - z0)
        for s in (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
            pts.append(zb + s * torch.randn(40, generator=g, dtype=torch.float64))
    X = torch.stack(pts).float()
    _, exact = oracle.perclass_oracle(X.double(), p, fp_sound=False, curvature="exact")
    sound = head.certify(X, backend="cpu").radius.double()
    assert (sound <= exact).all(), (sound - exact).max()
    live = sound > 0  # the farther points get positive radii, close to the exact ones
    assert live.sum() >= 40 and (sound[live] / exact[live]).median() > 0.5
    loose = head.certify(X, backend="cpu", fp_sound=False).radius.double()
    assert (loose > exact).any()
