"""The compiled CPU backend equals the reference on many shapes; it is deterministic.

Heads are built from random parameters (``from_params``) so every shape is cheap. The
``full`` type is exercised where ``K·d²`` stays small (its parameters are K×d×d float64);
large K with d = 513 is covered by the tied, diag and spherical types.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import random_head

from gmfast._fp import round_down_to
from gmfast.certificate import Certificate
from gmfast.ops import _cpu
from gmfast.ops import _reference as oracle

SHAPES = [(B, d, K) for B, d, K in itertools.product((0, 1, 7, 4097), (1, 3, 64, 513), (2, 3, 1001))
          if B * d * K <= 4097 * 64 * 1001]


def sample(head, B, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    K, d = head.means_.shape
    y = torch.randint(0, K, (B,), generator=g)
    Z = head.means_[y] + torch.randn(B, d, generator=g, dtype=torch.float64) * 1.5
    Z = Z.to(dtype)
    if noncontig:  # every other column of a wider buffer
        wide = torch.zeros(B, 2 * d, dtype=dtype)
        wide[:, ::2] = Z
        Z = wide[:, ::2]
        assert not Z.is_contiguous() or B <= 1
    return Z


def assert_same(a, b, Z, head, dtype, what):
    """Predictions equal except at near-ties; radii equal up to the rounding difference of
    two summation orders (both are sound; each is ≤ the exact radius)."""
    scores = head.predict_log_proba(Z.double()).numpy() if Z.shape[0] else np.zeros((0, 2))
    top2 = -np.sort(-scores, axis=1)[:, :2] if scores.shape[1] >= 2 else scores
    gap = (top2[:, 0] - top2[:, 1]) if len(top2) else np.zeros(0)
    tie = gap < (1e-3 if dtype == torch.float32 else 1e-9)
    pa, pb = a.prediction.numpy(), b.prediction.numpy()
    mism = (pa != pb) & ~tie
    assert not mism.any(), f"{what}: {mism.sum()} predictions differ away from ties, first at {np.nonzero(mism)[0][:5]}"
    ok = pa == pb
    ra, rb = a.radius.double().numpy()[ok], b.radius.double().numpy()[ok]
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    bad = np.abs(ra - rb) > tol * (1.0 + np.abs(rb))
    assert not bad.any(), (f"{what}: {bad.sum()} radii differ; first {np.nonzero(bad)[0][:5]}: "
                           f"{ra[bad][:3]} vs {rb[bad][:3]}")


@pytest.mark.parametrize("B,d,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_cpu_equals_reference(B, d, K, dtype):
    head = random_head("tied", d, K, seed=B + d + K)
    Z = sample(head, B, dtype, seed=1, noncontig=(B % 2 == 1))
    for norm in (2, math.inf, 1, "mahalanobis"):
        a = head.certify(Z, norm=norm, backend="cpu")
        b = head.certify(Z, norm=norm, backend="reference")
        assert_same(a, b, Z, head, dtype, f"tied norm={norm}")
    # predict-only runs the same GEMM and argmax as certify
    assert torch.equal(head.predict(Z, backend="cpu"), head.certify(Z, backend="cpu").prediction)


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
@pytest.mark.parametrize("B,d,K", [s for s in SHAPES if s[0] * s[1] * s[2] <= 7 * 513 * 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perclass_cpu_equals_reference(kind, B, d, K, dtype):
    if kind == "full" and K * d * d > 5_000_000:
        d = 3  # full parameters are K·d² float64: keep them small (see module docstring)
    head = random_head(kind, d, K, seed=B + d + K)
    Z = sample(head, B, dtype, seed=2, noncontig=(B % 2 == 1))
    a = head.certify(Z, backend="cpu")
    assert_same(a, reference_as_cpu(head, Z), Z, head, dtype, kind)


def reference_as_cpu(head, Z):
    """The reference in the form the cpu kernel computes: for full covariances the margins of
    the Cholesky form (the kernel's pruning of pairs must not change the result)."""
    if head.covariance_type != "full":
        return head.certify(Z, backend="reference")
    head.predict(Z[:1])  # the working copy for Z's dtype
    pred, radius = oracle.perclass_oracle(Z, head._work[(Z.device, Z.dtype)], form="cholesky")
    return Certificate(prediction=pred, radius=round_down_to(radius, Z.dtype), norm=2)


@pytest.mark.parametrize("kind", ["tied", "full", "diag", "spherical"])
def test_deterministic_across_runs_threads_and_gemm(kind):
    head = random_head(kind, 33, 17, seed=3)
    Z = sample(head, 3001, torch.float32, seed=4)
    first = head.certify(Z, backend="cpu")
    again = head.certify(Z, backend="cpu")
    assert torch.equal(first.prediction, again.prediction) and torch.equal(first.radius, again.radius)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = head.certify(Z, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(first.prediction, one.prediction) and torch.equal(first.radius, one.radius)
    # the GEMM policy changes the summation order only: results agree to rounding
    for policy in ("blas", "portable", "micro"):
        try:
            _cpu.set_gemm_policy(policy)
            other = head.certify(Z, backend="cpu")
        finally:
            _cpu.set_gemm_policy("auto")
        assert_same(other, first, Z, head, torch.float32, f"policy={policy}")


def test_cpu_is_sound_under_every_gemm():
    """Every GEMM path keeps every radius below the exact (float64, fp_sound=False) one."""
    head = random_head("tied", 40, 7, seed=5)
    Z = sample(head, 2000, torch.float32, seed=6)
    exact = head.certify(Z.double(), fp_sound=False, backend="reference").radius
    for policy in ("blas", "portable", "micro"):
        try:
            _cpu.set_gemm_policy(policy)
            r = head.certify(Z, backend="cpu").radius.double()
        finally:
            _cpu.set_gemm_policy("auto")
        assert (r <= exact).all()


def test_bad_buffers_are_named():
    C = _cpu._load()
    Z = np.zeros((3, 4), np.float32)
    A = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"A: expected shape \(\*, 4\), got \(2, 5\)"):
        C.tied_certify_f32(Z, A, np.zeros(2, np.float32), None, None, None)
    with pytest.raises(ValueError, match="beta: expected dtype float32, got float64"):
        C.tied_certify_f32(Z, np.zeros((2, 4), np.float32), np.zeros(2), None, None, None)
    with pytest.raises(ValueError, match="alpha and eps must both be given"):
        C.tied_certify_f32(Z, np.zeros((2, 4), np.float32), np.zeros(2, np.float32), None, np.zeros(2), None)
    with pytest.raises(ValueError, match="kind: expected 0"):
        C.perclass_certify_f32(Z, 7, np.zeros((2, 4), np.float32), np.zeros(2, np.float32),
                               np.zeros(2), np.zeros(2), np.zeros(2), None, None)
    with pytest.raises(ValueError, match=r"consts: expected shape \(16\), got \(3,\)"):
        C.perclass_certify_f32(Z, 1, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32),
                               np.zeros(2), np.zeros(2), np.zeros(2), None, np.zeros(3))
