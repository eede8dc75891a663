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
from gmfast.ops import kernel_module, resolve


def tied_certify(Z: torch.Tensor, p: ref.TiedParams, norm, *, fp_sound: bool, need_radius: bool,
                 backend: str | None):
    name = resolve(backend, Z.device)
    if name == "reference":
        return ref.tied_certify(Z, p, norm, fp_sound=fp_sound, need_radius=need_radius)
    table = alpha = eps = None
    if need_radius:
        inv_hat, inv_lo = ref.tied_denominators(p, norm)
        table = inv_lo if fp_sound else inv_hat
        if fp_sound:
            alpha, eps = ref.tied_error_coefficients(p, Z.shape[1], Z.dtype)
    return kernel_module(name).tied_certify(Z, p.A, p.beta, table, alpha, eps)


def perclass_certify(Z: torch.Tensor, p: ref.PerClassParams, *, fp_sound: bool, need_radius: bool,
                     backend: str | None, curvature: str = "auto"):
    name = resolve(backend, Z.device)
    if name == "reference":
        return ref.perclass_certify(Z, p, fp_sound=fp_sound, need_radius=need_radius, curvature=curvature)
    lam = None
    if need_radius:
        lam_hat, lam_up, _ = ref.curvature_table(p, curvature)
        lam = lam_up if fp_sound else lam_hat
    return kernel_module(name).perclass_certify(Z, p, lam, fp_sound)
