"""Triton kernels against the reference, run on CPU tensors by ``TRITON_INTERPRET=1``.

conftest.py selects the interpreter before anything imports triton. The interpreter is
slow and computes reduced-precision ``tl.dot`` wrongly, so shapes are small, tiles large,
and only float32/float64 are used (the kernels use IEEE ``tl.dot`` for those anyway).

Two kinds of checks:

* agreement with the reference: predictions equal except at near-ties; radii within a
  tolerance derived from the rounding-error bounds (see :func:`tied_tolerance` and
  :func:`perclass_tolerance`);
* soundness directly: the kernels' fp-sound radius never exceeds the float64 reference's
  plain radius (≈ the exact one) by more than a relative 1e-6, including at points placed
  within rounding distance of a decision boundary.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from gmfast import params  # noqa: E402
from gmfast._fp import norm_upper, perclass_error_model  # noqa: E402
from gmfast.ops import _reference as oracle  # noqa: E402
from gmfast.ops import _triton  # noqa: E402
from gmfast.smoothing import _count  # noqa: E402
from gmfast.triton import perclass as tpc  # noqa: E402
from gmfast.triton import smoothing as tsm  # noqa: E402
from gmfast.triton import tied as ttied  # noqa: E402
from helpers import random_head  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("these tests run the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

SHAPES = list(itertools.product((0, 1, 7, 33), (1, 3, 17), (2, 3, 37)))
NORMS = (2, math.inf, 1, "mahalanobis")
DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def random_params(kind, d, K, seed):
    """Float64 master parameters of a random head of ``kind``."""
    return random_head(kind, d, K, seed).classifier_params


def sample(means, B, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    K, d = means.shape
    y = torch.randint(0, K, (B,), generator=g)
    Z = (means.double()[y] + torch.randn(B, d, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    if noncontig:  # every other column of a wider buffer
        wide = torch.zeros(B, 2 * d, dtype=dtype)
        wide[:, ::2] = Z
        Z = wide[:, ::2]
    return Z


def describe(mask, *arrays):
    idx = np.nonzero(mask)[0]
    parts = [f"{int(mask.sum())} mismatches, first rows {idx[:5].tolist()}"]
    parts += [f"{np.asarray(a)[idx[:3]].tolist()}" for a in arrays]
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Tied
# --------------------------------------------------------------------------------------


def tied_tolerance(Z, p, pred, inv_hat):
    """Largest difference two correct evaluations of the tied radius can have, per row.

    Each computed logit is within ``e_k = α_k‖z‖ + ε_k`` of the exact one (Higham's bound,
    any summation order), so two evaluations' margins to ``j`` differ by at most
    ``2(e_c + e_j)``; their fp-sound corrections differ by less than one more ``e_c + e_j``
    (different ``‖z‖`` bounds, different ``|m̂|``). Hence ``3(e_c + e_j)/N_cj`` per ``j``, and the
    min over ``j`` moves by at most the max over ``j`` (skipping ``inv = ∞``: no such pair in
    random heads). Plus 1e-12 relative for the float64 epilogue.
    """
    B, d = Z.shape
    if B == 0:
        return np.zeros(0)
    alpha, eps = params.tied_error_coefficients(p, d, Z.dtype)
    e = norm_upper(Z)[:, None] * alpha[None, :] + eps[None, :]
    c = pred.clamp_min(0)
    pair = (e.gather(1, c[:, None]) + e) * inv_hat[c]
    pair = torch.where(torch.isfinite(pair), pair, torch.zeros_like(pair))
    return (3.0 * pair.amax(1)).numpy()


def near_tie_tied(Z, p, pa, pb):
    """Rows where two predictions may legitimately differ: the two classes' float64 logits
    are within the sum of their rounding-error bounds (``2(e_a + e_b)``)."""
    B, d = Z.shape
    L = params.tied_linear_logits(Z.double(), p.master)
    alpha, eps = params.tied_error_coefficients(p, d, Z.dtype)
    e = norm_upper(Z)[:, None] * alpha[None, :] + eps[None, :]
    a, b = pa.clamp_min(0)[:, None], pb.clamp_min(0)[:, None]
    gap = (L.gather(1, a) - L.gather(1, b)).abs()[:, 0]
    return (gap <= 2.0 * (e.gather(1, a) + e.gather(1, b))[:, 0]).numpy()


def check_tied(Z, p, norm, fp_sound, what, split=None, gemm=None):
    B, d = Z.shape
    inv_hat, inv_lo = params.tied_denominators(p, norm)
    fp = params.tied_error_model(p, d, Z.dtype) if fp_sound else None
    pa, ra = ttied.tied_certify(Z, p.A, p.beta, inv_lo if fp_sound else inv_hat, fp, split=split, gemm=gemm)
    pb, rb = oracle.tied_oracle(Z, p, norm, fp_sound=fp_sound)
    assert pa.dtype == torch.int64 and ra.dtype == torch.float64 and pa.shape == ra.shape == (B,)
    diff = (pa != pb).numpy()
    ok_tie = near_tie_tied(Z, p, pa, pb) if B else np.zeros(0, bool)
    bad = diff & ~ok_tie
    assert not bad.any(), f"{what}: predictions differ away from ties: " + describe(bad, pa, pb)
    same = ~diff
    tol = tied_tolerance(Z, p, pb, inv_hat) + 1e-12 * (1.0 + rb.abs().numpy())
    err = (ra - rb).abs().numpy()
    bad = same & ~(err <= tol)
    assert not bad.any(), f"{what}: radii differ beyond the rounding bound: " + describe(bad, ra, rb, tol)
    # predict-only gives the same predictions and no radius
    pp, rp = ttied.tied_certify(Z, p.A, p.beta, None, None, split=split, gemm=gemm)
    assert rp is None and torch.equal(pp, pa), f"{what}: predict-only differs"
    return pa, ra


@pytest.mark.parametrize("B,d,K", SHAPES)
def test_tied_equals_reference(B, d, K):
    master = random_params("tied", d, K, seed=B + 10 * d + 100 * K)
    for dtype in DTYPES:
        p = master.to("cpu", dtype)
        Z = sample(master.A.new_zeros(K, d) + 0.2 * master.A, B, dtype, seed=1, noncontig=(B % 2 == 1))
        for norm, fp_sound in itertools.product(NORMS, (True, False)):
            check_tied(Z, p, norm, fp_sound, f"tied {dtype} norm={norm} fp_sound={fp_sound}")


@pytest.mark.parametrize("gemm", ["triton", "torch"])
@pytest.mark.parametrize("K", [3, 37, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_two_kernel_path(K, dtype, gemm):
    """The GEMM + epilogue path (chosen for large K) agrees as well, also across K tiles,
    with the Triton GEMM and with torch's (cuBLAS on a GPU)."""
    master = random_params("tied", 5, K, seed=K)
    p = master.to("cpu", dtype)
    Z = sample(0.3 * master.A, 45, dtype, seed=2, noncontig=True)
    for norm, fp_sound in itertools.product((2, math.inf), (True, False)):
        pa, ra = check_tied(Z, p, norm, fp_sound, f"split K={K} {dtype} norm={norm} gemm={gemm}", split=True,
                            gemm=gemm)
        if K <= ttied.FUSED_MAX_K:
            pf, rf = ttied.tied_certify(Z, p.A, p.beta, *_tied_tables(p, norm, fp_sound, Z), split=False)
            assert torch.equal(pf, pa)
            assert torch.allclose(rf, ra, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def _tied_tables(p, norm, fp_sound, Z):
    inv_hat, inv_lo = params.tied_denominators(p, norm)
    if not fp_sound:
        return inv_hat, None
    return inv_lo, params.tied_error_model(p, Z.shape[1], Z.dtype)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_sound_near_boundary(split, dtype):
    """Points within rounding distance of a facet: the fp-sound radius in the working dtype
    never exceeds the float64 plain radius (≈ exact) by more than 1e-6 relative, and is 0
    when the float64 prediction differs."""
    d, K = 17, 7
    master = random_params("tied", d, K, seed=5)
    p = master.to("cpu", dtype)
    g = torch.Generator().manual_seed(3)
    A, beta = master.A, master.beta
    Z0 = torch.randn(40, d, generator=g, dtype=torch.float64) * 2
    L = Z0 @ A.T + beta
    top2 = L.topk(2, dim=1).indices
    c, j = top2[:, 0], top2[:, 1]
    v = A[c] - A[j]
    m = (L.gather(1, c[:, None]) - L.gather(1, j[:, None]))[:, 0]
    # project onto the facet m_cj = 0, then step back by distances from 1e-9 to 1e-1
    t = torch.logspace(-9, -1, 40, dtype=torch.float64)
    Z = Z0 - ((m / (v * v).sum(1)) - t / v.norm(dim=1))[:, None] * v
    Z = Z.to(dtype)
    inv_hat, inv_lo = params.tied_denominators(p, 2)
    pa, ra = ttied.tied_certify(Z, p.A, p.beta, inv_lo, params.tied_error_model(p, d, dtype), split=split)
    p64 = master.to("cpu", torch.float64)
    pe, re = oracle.tied_oracle(Z.double(), p64, 2, fp_sound=False)
    assert_sound(pa, ra, pe, re, "tied near boundary")
    assert (ra > 0).any(), "some points far enough from the facet must be certified"


def assert_sound(pa, ra, pe, re, what):
    same = (pa == pe).numpy()
    over = same & ~(ra.numpy() <= re.numpy() * (1 + 1e-6))
    assert not over.any(), f"{what}: radius exceeds the exact one: " + describe(over, ra, re)
    wrong = ~same & (ra.numpy() != 0)
    assert not wrong.any(), f"{what}: a class differing from the exact argmax was certified: " + describe(
        wrong, pa, pe, ra)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_sound_random(dtype):
    master = random_params("tied", 17, 37, seed=11)
    p = master.to("cpu", dtype)
    Z = sample(0.2 * master.A, 33, dtype, seed=4)
    for norm in NORMS:
        pa, ra = ttied.tied_certify(Z, p.A, p.beta, *_tied_tables(p, norm, True, Z))
        pe, re = oracle.tied_oracle(Z.double(), master.to("cpu", torch.float64), norm, fp_sound=False)
        assert_sound(pa, ra, pe, re, f"tied norm={norm}")


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_nonfinite_rows(split, dtype):
    d, K = 3, 5
    master = random_params("tied", d, K, seed=7)
    p = master.to("cpu", dtype)
    Z = sample(0.2 * master.A, 9, dtype, seed=5)
    Z[1, 0] = float("nan")
    Z[3, 2] = float("inf")
    Z[5, 1] = -float("inf")
    # finite input at the edge of the range: whether its logits overflow depends on the
    # summation order, so only "like the reference, or -1" is required of it
    Z[7] = torch.finfo(dtype).max / 2 * torch.sign(p.A[0])
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[1, 3, 5]] = True
    for fp_sound in (True, False):
        pa, ra = ttied.tied_certify(Z, p.A, p.beta, *_tied_tables(p, 2, fp_sound, Z), split=split)
        assert (pa[bad] == -1).all() and (ra[bad] == 0).all(), (pa, ra)
        pb, rb = oracle.tied_oracle(Z, p, 2, fp_sound=fp_sound)
        assert pa[7] == -1 or pa[7] == pb[7]
        if fp_sound:
            assert ra[7] == 0  # ‖z‖² overflows: no finite error bound, no certificate
        keep = ~bad
        keep[7] = False
        assert torch.equal(pa[keep], pb[keep])
        assert torch.allclose(ra[keep], rb[keep], rtol=1e-4, atol=1e-6)
    pp, _ = ttied.tied_certify(Z, p.A, p.beta, None, None, split=split)
    assert (pp[bad] == -1).all() and torch.equal(pp, pa)


# --------------------------------------------------------------------------------------
# Per-class
# --------------------------------------------------------------------------------------


def perclass_tolerance(rb_plain, rb_sound):
    """Largest difference two correct evaluations of the per-class radius can have.

    The reference's fp-sound radius is the formula evaluated at ``q`` lowered and ``‖g‖``
    raised by rigorous bounds on how far a computed ``q``, ``‖g‖`` can be from the exact
    ones; the radius is monotone in both. Any other correct evaluation's ``(q, g)`` lies
    within that box around the exact values, so two evaluations differ by at most twice the
    gap between the plain and the sound radius, plus the other evaluation's own gap from its
    different accumulation order (a factor 3 in all), plus 1e-12 relative for float64.
    """
    gap = (rb_plain - rb_sound).abs().numpy()
    return 3.0 * gap + 1e-12 * (1.0 + rb_plain.abs().numpy())


def check_perclass(Z, p, what):
    B = Z.shape[0]
    out = {}
    for fp_sound in (True, False):
        lam_hat, lam_up, _ = params.curvature_table(p, "exact")
        lam = lam_up if fp_sound else lam_hat
        pa, ra = tpc.perclass_certify(Z, p, lam, perclass_error_model(Z.shape[1], Z.dtype) if fp_sound else None)
        pb, rb = oracle.perclass_oracle(Z, p, fp_sound=fp_sound, curvature="exact")
        assert pa.dtype == torch.int64 and ra.dtype == torch.float64 and pa.shape == ra.shape == (B,)
        out[fp_sound] = (pa, ra, pb, rb)
    pa, ra, pb, rb_sound = out[True]
    rb_plain = out[False][3]
    scores = params.perclass_log_joint(Z.double(), p.master) if B else torch.zeros(0, p.K, dtype=torch.float64)
    for fp_sound, (pa, ra, pb, rb) in out.items():
        diff = (pa != pb).numpy()
        if B:
            sa = scores.gather(1, pa.clamp_min(0)[:, None])[:, 0]
            sb = scores.gather(1, pb.clamp_min(0)[:, None])[:, 0]
            tie = ((sa - sb).abs() <= (1e-4 if Z.dtype == torch.float32 else 1e-10) * (1 + sb.abs())).numpy()
        else:
            tie = np.zeros(0, bool)
        bad = diff & ~tie
        assert not bad.any(), f"{what} fp_sound={fp_sound}: predictions differ away from ties: " + describe(
            bad, pa, pb)
        tol = perclass_tolerance(rb_plain, rb_sound)
        err = (ra - rb).abs().numpy()
        bad = ~diff & ~(err <= tol)
        assert not bad.any(), f"{what} fp_sound={fp_sound}: radii differ: " + describe(bad, ra, rb, tol)
    pp, rp = tpc.perclass_certify(Z, p, None, None)
    assert rp is None and torch.equal(pp, out[True][0]), f"{what}: predict-only differs"


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
@pytest.mark.parametrize("B,d,K", SHAPES)
def test_perclass_equals_reference(kind, B, d, K):
    master = random_params(kind, d, K, seed=B + 10 * d + 100 * K)
    for dtype in DTYPES:
        p = master.to("cpu", dtype)
        Z = sample(master.mu, B, dtype, seed=1, noncontig=(B % 2 == 1))
        check_perclass(Z, p, f"{kind} {dtype} B={B} d={d} K={K}")


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
def test_perclass_sound(kind):
    """fp-sound float32 radius ≤ the float64 plain radius (the formula ≈ exactly), and 0
    where the float32 class differs from the float64 one; points near the boundary too."""
    d, K = 9, 6
    master = random_params(kind, d, K, seed=21)
    p = master.to("cpu", torch.float32)
    p64 = master.to("cpu", torch.float64)
    Z = sample(master.mu, 60, torch.float64, seed=6)
    # pull half the points toward the midpoint of their two best classes: near-boundary
    f = params.perclass_log_joint(Z, p64)
    top2 = f.topk(2, dim=1).indices
    mid = 0.5 * (master.mu[top2[:, 0]] + master.mu[top2[:, 1]])
    Z[::2] = mid[::2] + (Z[::2] - mid[::2]) * 1e-3
    Z = Z.float()
    lam_up = params.curvature_table(p, "exact")[1]
    pa, ra = tpc.perclass_certify(Z, p, lam_up, perclass_error_model(Z.shape[1], Z.dtype))
    pe, re = oracle.perclass_oracle(Z.double(), p64, fp_sound=False, curvature="exact")
    assert_sound(pa, ra, pe, re, f"{kind} sound")
    assert (ra > 0).any()


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
def test_perclass_nonfinite_rows(kind):
    master = random_params(kind, 4, 3, seed=8)
    p = master.to("cpu", torch.float32)
    Z = sample(master.mu, 8, torch.float32, seed=3)
    Z[2, 1] = float("nan")
    Z[4, 0] = float("inf")
    Z[6] = 1e30  # finite input whose quadratic scores overflow in float32
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[2, 4, 6]] = True
    lam = params.curvature_table(p, "exact")[1]
    pa, ra = tpc.perclass_certify(Z, p, lam, perclass_error_model(Z.shape[1], Z.dtype))
    assert (pa[bad] == -1).all() and (ra[bad] == 0).all(), (pa, ra)
    pb, rb = oracle.perclass_oracle(Z[~bad], p, fp_sound=True, curvature="exact")
    assert torch.equal(pa[~bad], pb)
    assert torch.allclose(ra[~bad], rb, rtol=1e-4, atol=1e-6)


def test_perclass_full_chunks(monkeypatch):
    """The full kind in several row chunks (bounded U scratch) equals one chunk."""
    master = random_params("full", 5, 4, seed=9)
    p = master.to("cpu", torch.float32)
    Z = sample(master.mu, 50, torch.float32, seed=2)
    lam = params.curvature_table(p, "exact")[1]
    one = tpc.perclass_certify(Z, p, lam, perclass_error_model(Z.shape[1], Z.dtype))
    monkeypatch.setattr(ttied, "_CHUNK_ELEMS", 16 * 5 * 4)  # 16 rows per chunk
    many = tpc.perclass_certify(Z, p, lam, perclass_error_model(Z.shape[1], Z.dtype))
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# --------------------------------------------------------------------------------------
# Smoothing counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 37, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_smoothing_counts(K, dtype):
    d, inputs = 6, 5
    master = random_params("tied", d, K, seed=K)
    p = master.to("cpu", dtype)
    g = torch.Generator().manual_seed(1)
    owner = torch.randint(0, inputs, (70,), generator=g).sort().values
    Z = sample(0.2 * master.A, 70, dtype, seed=3, noncontig=True)
    Z[4, 0] = float("nan")  # not a class: dropped
    owner[9] = inputs  # out of range: dropped
    counts = tsm.smoothing_counts(Z, owner, inputs, p.A, p.beta)
    logits = params.tied_linear_logits(Z, p)
    labels = torch.where(torch.isfinite(logits).all(1), logits.argmax(1), torch.full((70,), -1))
    labels[9] = -1
    expect = _count(labels, owner.clamp_max(inputs - 1), inputs, K)
    # a different summation order may flip an exact near-tie; none in random data
    assert torch.equal(counts, expect), (counts - expect).abs().sum()
    assert int(counts.sum()) == 68
    again = tsm.smoothing_counts(Z, owner, inputs, p.A, p.beta, counts=counts.clone())
    assert torch.equal(again, 2 * expect)
    assert torch.equal(_triton.smoothing_counts(Z, owner, inputs, p.A, p.beta), expect)


def test_smoothing_counts_empty():
    p = random_params("tied", 3, 4, seed=0).to("cpu", torch.float32)
    out = tsm.smoothing_counts(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 2, p.A, p.beta)
    assert out.shape == (2, 4) and int(out.sum()) == 0


# --------------------------------------------------------------------------------------
# Backend module and launcher checks
# --------------------------------------------------------------------------------------


def test_backend_module_contract():
    ok, why = _triton.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in why
    master = random_params("tied", 3, 4, seed=1)
    p = master.to("cpu", torch.float32)
    Z = sample(master.A, 5, torch.float32, seed=0)
    pa, ra = _triton.tied_certify(Z, p.A, p.beta, *_tied_tables(p, 2, True, Z))
    pb, rb = oracle.tied_oracle(Z, p, 2)
    assert torch.equal(pa, pb) and torch.allclose(ra, rb, rtol=1e-4, atol=1e-6)
    q = random_params("diag", 3, 4, seed=1).to("cpu", torch.float32)
    pa, ra = _triton.perclass_certify(Z, q, params.curvature_table(q, "exact")[1],
                                      perclass_error_model(Z.shape[1], Z.dtype))
    pb, rb = oracle.perclass_oracle(Z, q, curvature="exact")
    assert torch.equal(pa, pb) and torch.allclose(ra, rb, rtol=1e-4, atol=1e-6)


def test_launchers_check_inputs(monkeypatch):
    p = random_params("tied", 3, 4, seed=1).to("cpu", torch.float32)
    Z = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="dtype"):
        ttied.tied_certify(Z.double(), p.A, p.beta, None, None)
    with pytest.raises(ValueError, match="alpha, eps"):
        fp = params.tied_error_model(p, 3, torch.float32)
        ttied.tied_certify(Z, p.A, p.beta, torch.zeros(4, 4, dtype=torch.float64), fp._replace(eps=fp.eps[:2]))
    with pytest.raises(TypeError, match="float16"):
        ttied.tied_certify(Z.half(), p.A.half(), p.beta.half(), None, None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        ttied.tied_certify(Z, p.A, p.beta, None, None)


# --------------------------------------------------------------------------------------
# GPU compilation without a GPU
# --------------------------------------------------------------------------------------

_AOT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gmfast.triton import perclass as P, smoothing as S, tied as T

def compile_(fn, types, consts, **opts):
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    const = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options=dict(enable_fp_fusion=T.FP_FUSION, **opts))

f64 = "*fp64"
for dt in ("fp32", "fp64"):
    p = "*" + dt
    compile_(T._gemm_nt_bias_kernel, dict(X=p, sxm="i64", sxk="i64", Y=p, BIAS=p, OUT=p, SS=p, M="i32", N="i32",
             Kd="i32"), dict(WRITE_SS=True, BM=64, BN=64, BK=16), num_warps=4)
    compile_(T._tied_fused_kernel, dict(Z=p, szb="i64", szd="i64", A=p, BETA=p, INV=f64, ALPHA=f64, EPS=f64, CST=f64,
             PRED="*i64", RAD=f64, B="i32", d="i32", K="i32"),
             dict(NEED_RADIUS=True, FP_SOUND=True, BM=64, BK=16, BD=32), num_warps=4)
    if dt == "fp32":
        compile_(T._tied_epilogue_kernel, dict(L=p, SS=p, INV=f64, ALPHA=f64, EPS=f64, CST=f64, PRED="*i64", RAD=f64,
                 R="i32", K="i32"), dict(NEED_RADIUS=True, FP_SOUND=True, BM=32, BK=128), num_warps=4)
        for kind in (0, 1, 2):
            compile_(P._perclass_kernel, dict(Z=p, szb="i64", szd="i64", U=p, su="i64", MU=p, PREC=p, KAPPA=f64,
                     PABS=f64, MUN=f64, LAM=f64, CST=f64, PRED="*i64", RAD=f64, R="i32", d="i32", K="i32"),
                     dict(KIND=kind, NEED_RADIUS=True, FP_SOUND=True, BM=16, BC=8, BD=16), num_warps=4)
        compile_(S._count_kernel, dict(Z=p, szb="i64", szd="i64", A=p, BETA=p, OWNER="*i64", COUNTS="*i64", N="i32",
                 d="i32", K="i32", num_inputs="i32"), dict(BM=64, BK=64, BD=32), num_warps=4)
print("compiled")
"""


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_kernels_compile_for_sm90():
    """Every kernel (the GPU tile shapes, fp-sound variants) compiles to an sm_90 cubin with
    Triton's own toolchain: catches what the interpreter accepts but the compiler does not."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and ("ptxas" in run.stderr and "not found" in run.stderr.lower()):
        pytest.skip(f"Triton's ptxas is unavailable here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stdout[-3000:] + run.stderr[-6000:]
