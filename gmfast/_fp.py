"""Rigorous floating-point error bounds shared by every certificate path (DESIGN 1.5).

gmfast certifies the classifier defined by its float64 parameters *evaluated exactly*.
Kernels evaluate it in a working precision ``T`` (float32 or float64); the quantities
here turn a computed value into a one-sided bound on the exact one.

The workhorse is Higham's inner-product bound (Accuracy and Stability of Numerical
Algorithms, 2nd ed., Lemma 3.1 and eq. 3.5): for any summation order, with or without FMA,

    |fl(xᵀy) − xᵀy| ≤ γ_n |x|ᵀ|y| ≤ γ_n ‖x‖₂‖y‖₂,   γ_n = n·u / (1 − n·u),

where ``u`` is the unit roundoff of the precision the products and sums are done in.
Rounding a float64 parameter to ``T`` before the product is one more factor ``(1 + δ)``
per term, which is why the kernels use ``γ_{d+2}`` or more for a length-``d`` product.

Underflow: the relative model ``fl(x·y) = xy(1 + δ)`` fails for subnormal results; the full
model (Higham eq. 2.8) adds an absolute ``η`` per product, ``|η| ≤`` half the smallest
subnormal (:func:`underflow_unit`). Every bound here carries such a term too: far below any
realistic margin, but it keeps the guarantee unconditional.

Error terms are combined in float64 (the ``O(K)`` epilogue). The few float64 operations
that combine them are covered by the explicit slack factors below, each documented where
it is used; none of them is tuned: they are generous, and their effect on a radius is a
relative change of order ``1e-15``.
"""

from __future__ import annotations

import enum
import functools
import math
import sys
from typing import NamedTuple

import numpy as np
import torch

#: unit roundoff of float64; every epilogue operation is done in float64.
U64 = 2.0**-53

_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


# half the smallest subnormal, as a float64; for float64 itself that half (2^-1075) is not
# representable and would round to 0, so the smallest subnormal 2^-1074 bounds it instead
_UNDERFLOW = {
    torch.float64: 2.0**-1074,
    torch.float32: 2.0**-150,
    torch.float16: 2.0**-25,
    torch.bfloat16: 2.0**-134,
}


def underflow_unit(dtype: torch.dtype) -> float:
    """A (nonzero) bound on the absolute error a product in ``dtype`` may add on underflow."""
    try:
        return _UNDERFLOW[dtype]
    except KeyError:
        raise TypeError(f"expected a floating dtype, got {dtype}") from None


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of a floating dtype (half the machine epsilon)."""
    try:
        return _UNIT_ROUNDOFF[dtype]
    except KeyError:
        raise TypeError(f"expected a floating dtype, got {dtype}") from None


def gamma(n: int, u: float) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``; an error if ``n·u ≥ 1`` (no bound exists)."""
    nu = n * u
    if nu >= 0.5:
        raise ValueError(
            f"no rounding-error bound for a length-{n} product at unit roundoff {u:g}: "
            "the latent dimension is too large for this precision; use float64 inputs"
        )
    return nu / (1.0 - nu)


def slack_up(k: int = 4) -> float:
    """Factor ``1 + k·2u₆₄`` that lifts a float64 result of ``≤ k`` roundings above the exact one."""
    return 1.0 + 2.0 * k * U64


def slack_down(k: int = 4) -> float:
    """Factor ``1 − k·2u₆₄`` that pushes a float64 result of ``≤ k`` roundings below the exact one."""
    return 1.0 - 2.0 * k * U64


def cast_is_relative(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether rounding every entry of ``t`` to ``dtype`` has relative error ``≤ u``.

    The kernels' error bounds treat each parameter rounded to the working precision as
    ``θ̃ = θ(1 + δ)``, ``|δ| ≤ u``. That holds for zero and for values in ``dtype``'s normal
    range only: below it the result is subnormal and the error is absolute (up to half the
    smallest subnormal, i.e. up to 50% relative, or 100% when it flushes to 0), above it the
    result is ``inf``. Callers give such parameters a float64 working copy instead
    (:meth:`gmfast.params.TiedParams.to`), where the cast is the identity.
    """
    if dtype == torch.float64 or t.numel() == 0:
        return True
    fi = torch.finfo(dtype)
    a = t.detach().abs().double()
    return bool(((a == 0) | ((a >= fi.tiny) & (a <= fi.max))).all())


def norm_upper(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Upper bound on the exact Euclidean norm along ``dim``, as float64.

    ``s = fl(Σx_i²)`` in float64 (any float input is exact in float64). Each square adds at
    most ``η₆₄`` absolutely (underflow) and the sum has relative error ``≤ γ_{n+1}``, so
    ``Σx² ≤ (s + 2nη₆₄)(1 + γ_{n+2})``; two more roundings for the square root and the
    product are covered by ``(1 + 4u₆₄)``. The kernels use the same formula
    (``csrc/common.h: norm_up_from_ss``).
    """
    n = x.shape[dim] if x.dim() else 1
    x = x.double()
    ss = (x * x).sum(dim)
    return torch.sqrt((ss + 2.0 * n * _UNDERFLOW[torch.float64]) * (1.0 + gamma(n + 2, U64))) * (1.0 + 4.0 * U64)


def round_down_to(r64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast nonnegative float64 radii to ``dtype`` rounding toward zero, never up.

    A round-to-nearest cast can return a value above the certified float64 radius; such
    entries step one ulp toward zero so the returned radius stays a lower bound (the largest
    ``dtype`` value ``≤`` the float64 one). For a nonnegative float the next value toward zero
    is the one whose bit pattern, read as an integer, is one less (``inf`` steps to the
    largest finite value, the smallest subnormal to 0), so the step is an integer
    subtraction of the comparison's outcome: one pass, no data-dependent branch (the float32
    cast of the radii cost as much as a small certify call when it went through
    ``nextafter`` and ``where``).
    """
    if dtype == torch.float64:
        return r64
    if dtype == torch.float32 and r64.dtype == torch.float64:
        if r64.device.type == "cpu" and r64.dim() == 1 and r64.is_contiguous():
            # the compiled loop (csrc/bindings.cpp: round_down_f32, the same rule as below,
            # ~10x faster at B = 8192) when the CPU kernels are loaded
            C = sys.modules.get("gmfast._C")
            if C is not None:
                return torch.from_numpy(C.round_down_f32(r64.detach().numpy()))
        r = r64.to(dtype)
        if r.device.type == "cpu":  # numpy: a fraction of torch's per-op cost on small batches
            f = r.numpy()
            f.view(np.int32)[...] -= f > r64.numpy()
        else:
            r.view(torch.int32).sub_((r.double() > r64).to(torch.int32))
        return r
    r = r64.to(dtype)
    too_big = r.double() > r64
    if bool(too_big.any()):
        r = torch.where(too_big, torch.nextafter(r, torch.zeros_like(r)), r)
    return r


# --------------------------------------------------------------------------------------
# The kernel interface: constants' layout, covariance-kind codes (mirrored, field for
# field, by csrc/constants.h; tests/test_constants.py checks that the two agree)
# --------------------------------------------------------------------------------------


class CovKind(enum.IntEnum):
    """Per-class covariance kinds as the kernels number them (``PerClassKind`` in C++)."""

    FULL = 0
    DIAG = 1
    SPHERICAL = 2

    @classmethod
    def of(cls, name: str) -> "CovKind":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"per-class kind must be 'full', 'diag' or 'spherical'; got {name!r}") from None


#: Bound on ``‖z‖`` from ``ss = fl(Σz²)`` accumulated in T: ``√((ss + norm_eta2)·norm_g1)·norm_up``.
NORM_FIELDS = ("norm_eta2", "norm_g1", "norm_up")
#: The float64 constants of the tied epilogue, in the order the kernels read them.
TIED_FIELDS = NORM_FIELDS + ("up4", "two_u64", "down4")
#: The float64 constants of the per-class epilogues (DESIGN 1.4), in the order the kernels
#: read them. ``u``: unit roundoff of T; ``g = γ_{d+4}(u)``, ``gd = γ_d(u)``; ``S = 1 + 4g``;
#: underflow allowances ``nu`` (on computed norms), ``tiny_u`` (on û), ``tiny_d`` (on D̂);
#: the rest are float64 slack factors of the epilogue (:func:`slack_up`, :func:`slack_down`).
PERCLASS_FIELDS = NORM_FIELDS + ("u", "g", "S", "nu", "tiny_u", "tiny_d", "three_u", "half_S", "four_u64", "one_u",
                                 "down8", "gd", "up4")


def norm_constants(d: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """``(2dη_T, 1 + γ_{d+2}(u_T), 1 + 4u₆₄)``: the :data:`NORM_FIELDS` for ``d`` features.

    ``Σz² ≤ (ss + 2dη)(1 + γ_{d+2})`` for ``ss = fl(Σz²)`` in T (each square may add ``η``
    on underflow, the sum is within ``γ_{d+1}``); the float64 square root and product add
    ``≤ 4`` roundings. :func:`norm_upper` is the same bound for ``T = float64``.
    """
    return 2.0 * d * underflow_unit(dtype), 1.0 + gamma(d + 2, unit_roundoff(dtype)), 1.0 + 4.0 * U64


@functools.lru_cache(maxsize=256)
def tied_constants(d: int, dtype: torch.dtype) -> tuple[float, ...]:
    """The :data:`TIED_FIELDS` for ``d`` features in working dtype ``dtype``."""
    return norm_constants(d, dtype) + (slack_up(4), 2.0 * U64, slack_down(4))


@functools.lru_cache(maxsize=256)
def perclass_constants(d: int, dtype: torch.dtype) -> tuple[float, ...]:
    """The :data:`PERCLASS_FIELDS` for ``d`` features in working dtype ``dtype``.

    The derivation of each term is in :func:`gmfast.ops._reference.perclass_certify`;
    every backend reads these values, none derives its own.
    """
    u = unit_roundoff(dtype)
    g = gamma(d + 4, u)
    S = 1.0 + 4.0 * g
    eta = underflow_unit(dtype)
    n = float(d + 4)
    nu = math.sqrt(2.0 * n * eta)
    tiny_u = 2.0 * n**1.5 * eta
    tiny_d = 2.0 * n * eta
    return norm_constants(d, dtype) + (u, g, S, nu, tiny_u, tiny_d, 3.0 * u, 0.5 * S, 4.0 * U64, 1.0 + u,
                                       slack_down(8), gamma(d, u), slack_up(4))


def perclass_constant_map(d: int, dtype: torch.dtype) -> dict[str, float]:
    """:func:`perclass_constants` by field name (for the pure-PyTorch epilogue)."""
    return dict(zip(PERCLASS_FIELDS, perclass_constants(d, dtype)))


class TiedErrorModel(NamedTuple):
    """Rounding-error data of a tied certify call (``None`` in its place: ``fp_sound=False``).

    ``alpha``, ``eps`` (K,) float64: ``|ℓ̂_k − ℓ_k| ≤ α_k‖z‖ + ε_k``; ``consts``: the
    :data:`TIED_FIELDS`.
    """

    alpha: torch.Tensor
    eps: torch.Tensor
    consts: tuple


class PerClassErrorModel(NamedTuple):
    """Rounding-error data of a per-class certify call (``None`` in its place:
    ``fp_sound=False``): ``consts``, the :data:`PERCLASS_FIELDS`."""

    consts: tuple


def perclass_error_model(d: int, dtype: torch.dtype) -> PerClassErrorModel:
    """The per-class rounding-error model for ``d`` features in working dtype ``dtype``."""
    return PerClassErrorModel(perclass_constants(d, dtype))
