"""The certify contracts, dispatched to a backend.

Every backend implements, for inputs already validated and cast to the working dtype:

``tied_certify(Z, A, beta, inv, alpha, eps) -> (pred, radius)``
    Z (B, d), A (K, d), beta (K,) in the working dtype T; inv (K, K) float64 lower
    bounds on ``1/‖a_c − a_j‖_q``; alpha, eps (K,) float64 rounding-error coefficients
    (``|ℓ̂_k − ℓ_k| ≤ α_k‖z‖ + ε_k``), both ``None`` for ``fp_sound=False``; ``inv`` is
    ``None`` when only predictions are wanted. Returns pred (B,) int64 (-1: overflow) and
    radius (B,) float64 or None. See :func:`gmfast._reference.tied_certify`.

``perclass_certify(Z, params, lam, fp_sound) -> (pred, radius)``
    params a :class:`gmfast._reference.PerClassParams` in the working dtype, lam (K, K)
    float64 curvature table (``None``: predictions only). See
    :func:`gmfast._reference.perclass_certify`.
"""

from __future__ import annotations

import torch

from gmfast import _reference as ref
from gmfast._fp import perclass_error_model
from gmfast.ops import kernel_module, resolve


def tied_certify(Z: torch.Tensor, p: ref.TiedParams, norm, *, fp_sound: bool, need_radius: bool,
                 backend: str | None):
    name = resolve(backend, Z.device)

    def run(Z, p):
        if name == "reference":
            return ref.tied_certify(Z, p, norm, fp_sound=fp_sound, need_radius=need_radius)
        table = fp = None
        if need_radius:
            inv_hat, inv_lo = ref.tied_denominators(p, norm)
            table = inv_lo if fp_sound else inv_hat
            if fp_sound:
                fp = ref.tied_error_model(p, Z.shape[1], Z.dtype)
        return kernel_module(name).tied_certify(Z, p.A, p.beta, table, fp)

    return in_range(run, Z, p)


def perclass_certify(Z: torch.Tensor, p: ref.PerClassParams, *, fp_sound: bool, need_radius: bool,
                     backend: str | None, curvature: str = "auto"):
    name = resolve(backend, Z.device)

    def run(Z, p):
        if name == "reference":
            return ref.perclass_certify(Z, p, fp_sound=fp_sound, need_radius=need_radius, curvature=curvature)
        lam = fp = None
        if need_radius:
            lam_hat, lam_up, _ = ref.curvature_table(p, curvature)
            lam = lam_up if fp_sound else lam_hat
            if fp_sound:
                fp = perclass_error_model(Z.shape[1], Z.dtype)
        return kernel_module(name).perclass_certify(Z, p, lam, fp)

    return in_range(run, Z, p)


def in_range(run, Z: torch.Tensor, p):
    """``run(Z, p)`` where the float32 rounding model holds, in float64 where it does not.

    The error bounds of every backend assume that each parameter rounded to float32 is the
    float64 one up to a relative ``u``, and that a computation which leaves float32's range
    shows it (an ``inf`` or NaN score: prediction -1). So:

    * a working copy whose cast is not relative (a parameter that is subnormal or overflows
      in float32, ``p.cast_ok`` false) runs in float64 (the input is exact in float64);
    * rows that come back -1 from a float32 run (a score overflowed, or a NaN/Inf input) are
      run again in float64: a finite input then gets its class and radius, a non-finite one
      is -1 again.

    Predictions as well as radii are then those of the stored float64 classifier's error
    analysis; nothing relies on float32 values outside its normal range.
    """
    if Z.dtype == torch.float64:
        return run(Z, p)
    if not p.cast_ok:
        return run(Z.to(torch.float64), p.widened())
    pred, radius = run(Z, p)
    redo = (pred < 0).nonzero().reshape(-1)
    if redo.numel():
        pred_w, radius_w = run(Z.index_select(0, redo).to(torch.float64), p.widened())
        pred[redo] = pred_w
        if radius is not None:
            radius[redo] = radius_w
    return pred, radius
