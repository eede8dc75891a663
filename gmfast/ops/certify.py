"""The certify contracts, dispatched to a backend.

Every backend module (:data:`gmfast.ops.MODULES`: ``reference``, ``cpu``, ``triton``,
``cuda``) implements, for inputs already validated and cast to the working dtype T:

``tied_certify(Z, A, beta, inv, fp) -> (pred, radius)``
    Z (B, d), A (K, d), beta (K,) in T; inv (K, K) float64 lower bounds on
    ``1/‖a_c − a_j‖_q``, ``None`` when only predictions are wanted. Returns pred (B,) int64
    (-1: a non-finite logit) and radius (B,) float64 or None.

``perclass_certify(Z, p, lam, fp) -> (pred, radius)``
    p a :class:`gmfast.params.PerClassParams` in T, lam (K, K) float64 curvature table
    (``None``: predictions only).

In both, ``fp`` is the rounding-error model (:class:`gmfast._fp.TiedErrorModel`,
:class:`gmfast._fp.PerClassErrorModel`: coefficients and the constants of
:mod:`gmfast._fp`) or ``None`` for ``fp_sound=False``: the one encoding of ``fp_sound``.
The math of each is in the reference backend (``gmfast/ops/_reference.py``).

The multi-prototype contract ``multiproto_certify(Z, A, beta, inv, fp, comp_class,
class_table)`` has the reference as its only backend.
"""

from __future__ import annotations

import torch

from gmfast._fp import TiedErrorModel, perclass_error_model
from gmfast.ops import call, kernel_module
from gmfast.params import PerClassParams, TiedParams, curvature_table, tied_denominators, tied_error_model


def tied_certify(Z: torch.Tensor, p: TiedParams, norm, *, fp_sound: bool, need_radius: bool,
                 backend: str | None):
    def run(Z, p):
        table = fp = None
        if need_radius:
            inv_hat, inv_lo = tied_denominators(p, norm)
            table = inv_lo if fp_sound else inv_hat
            if fp_sound:
                fp = _tied_error_model(p, Z.shape[1], Z.dtype)
        return call("tied_certify", backend, Z, p.A, p.beta, table, fp)

    return in_range(run, Z, p)


def _tied_error_model(p: TiedParams, d: int, T: torch.dtype) -> TiedErrorModel:
    """:func:`gmfast.params.tied_error_model`, kept with ``p``'s other per-working-copy tables
    (``p.tables``, whose norm keys it cannot collide with): a few small tensor operations that
    cost as much as the kernel on small batches."""
    key = ("error_model", d, T)
    if key not in p.tables:
        p.tables[key] = tied_error_model(p, d, T)
    return p.tables[key]


def perclass_certify(Z: torch.Tensor, p: PerClassParams, *, fp_sound: bool, need_radius: bool,
                     backend: str | None, curvature: str = "auto"):
    def run(Z, p):
        lam = fp = None
        if need_radius:
            lam_hat, lam_up, _ = curvature_table(p, curvature)
            lam = lam_up if fp_sound else lam_hat
            if fp_sound:
                fp = perclass_error_model(Z.shape[1], Z.dtype)
        return call("perclass_certify", backend, Z, p, lam, fp)

    return in_range(run, Z, p)


def multiproto_certify(Z: torch.Tensor, p: TiedParams, comp_class: torch.Tensor, class_table: torch.Tensor, norm,
                       *, fp_sound: bool = True):
    """Sound certified radius of the multi-prototype classifier (see :mod:`gmfast.multiproto`).

    ``p`` holds the component parameters (``A`` (C, d), ``β`` (C,)) in the working dtype of
    ``Z`` (B, d), as the tied head's; ``comp_class`` (C,), ``class_table`` (K, M) on ``Z``'s
    device. Returns pred (B,) int64, radius (B,) float64, component (B,) int64.
    """
    if Z.dtype != torch.float64 and not p.cast_ok:  # see in_range
        Z, p = Z.to(torch.float64), p.widened()
    inv_hat, inv_lo = tied_denominators(p, norm)
    fp = tied_error_model(p, Z.shape[1], Z.dtype) if fp_sound else None
    # the reference is the only backend with this contract
    return call("multiproto_certify", "reference", Z, p.A, p.beta, inv_lo if fp_sound else inv_hat, fp,
                comp_class, class_table)


def multiproto_epilogue(logits: torch.Tensor, z_norm_up: torch.Tensor | None, inv: torch.Tensor,
                        fp: TiedErrorModel | None, comp_class: torch.Tensor, class_table: torch.Tensor):
    """The multi-prototype epilogue on precomputed component logits (the reference
    backend's; see its docstring there)."""
    return kernel_module("reference").multiproto_epilogue(logits, z_norm_up, inv, fp, comp_class, class_table)


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
    if pred.numel() and int(pred.min()) < 0:  # a reduction first: nonzero costs more on a batch
        redo = (pred < 0).nonzero().reshape(-1)
        pred_w, radius_w = run(Z.index_select(0, redo).to(torch.float64), p.widened())
        pred[redo] = pred_w
        if radius is not None:
            radius[redo] = radius_w
    return pred, radius
