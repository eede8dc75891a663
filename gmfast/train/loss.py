"""The trainable tied Gaussian-mixture head and the loss on its normalised margin.

A tied head with means ``μ_k`` and shared precision ``P = Σ⁻¹`` (equal priors while
training) classifies by ``ℓ_k(z) = a_kᵀz + β_k``, ``a_k = P μ_k``, ``β_k = −½ a_kᵀμ_k``
(DESIGN 1.2). Its exact ℓ2 latent radius at ``z`` with label ``c`` is (DESIGN 1.3)

    R(z) = min_{j≠c} r_j(z),   r_j(z) = (ℓ_c(z) − ℓ_j(z)) / ‖a_c − a_j‖₂,

the signed distance from ``z`` to each pairwise decision hyperplane, negative when ``j``
beats ``c``. On a 1-Lipschitz encoder ``R`` is an input-space radius as well, so training
pushes ``min_j r_j`` past a target ``ε`` with the *offset cross-entropy on the normalised
margin*:

    loss = log(1 + Σ_{j≠c} exp(−t (r_j − ε))) / t,

a smooth version of the hinge ``max(0, ε − min_j r_j)`` (``t`` is its sharpness, in inverse
radius units; as ``t → ∞`` it is the hinge). It is the cross-entropy of the logits
``(0 for c, −t(r_j − ε) for j ≠ c)``, the normalised-margin analogue of the offset losses
of Lipschitz networks (GloRo, Leino et al. 2021; Prach & Lampert 2022).

Covariance options: ``"isotropic"`` (``P = I``: the radius does not depend on the scale,
so one shared variance is the same classifier; the head refitted with ``shrinkage=1``
matches it) and ``"learned"`` (``P = LᵀL + δI`` with a learned ``L``, refitted with
Ledoit–Wolf shrinkage).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

COVARIANCES = ("isotropic", "learned")


class TiedPrototypeHead(nn.Module):
    """Means ``(K, d)`` and, for ``covariance="learned"``, a precision factor ``L (d, d)``."""

    def __init__(self, latent: int, classes: int, covariance: str = "isotropic", *, scale: float = 1.0,
                 generator=None):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}; got {covariance!r}")
        self.covariance = covariance
        self.means = nn.Parameter(scale * torch.randn(classes, latent, generator=generator) / latent ** 0.5)
        self.factor = nn.Parameter(torch.eye(latent)) if covariance == "learned" else None

    def precision(self) -> torch.Tensor | None:
        if self.factor is None:
            return None
        L = self.factor
        return L.t() @ L + 1e-4 * torch.eye(L.shape[0], dtype=L.dtype, device=L.device)

    def linear(self):
        """``(A (K, d), β (K,))`` of the tied classifier with equal priors."""
        P = self.precision()
        A = self.means if P is None else self.means @ P
        beta = -0.5 * (A * self.means).sum(dim=1)
        return A, beta

    def forward(self, z):
        """Logits ``ℓ_k(z)`` (K per row): the tied head's scores up to a common term."""
        A, beta = self.linear()
        return z @ A.t() + beta


def normalised_margins(z, y, A, beta):
    """``r (B, K)``: ``r_j = (ℓ_y − ℓ_j)/‖a_y − a_j‖₂`` for ``j ≠ y``, ``+inf`` at ``j = y``.

    ``min_j r_j`` is the exact ℓ2 radius of the tied classifier ``(A, β)`` at ``z`` when it
    predicts ``y`` (and minus the distance to the nearest boundary that would make ``y``
    win otherwise).
    """
    logits = z @ A.t() + beta
    gap = (A[y][:, None, :] - A[None, :, :]).norm(dim=-1)  # (B, K), 0 at j = y
    own = F.one_hot(y, A.shape[0]).bool()
    r = (logits.gather(1, y[:, None]) - logits) / gap.masked_fill(own, 1.0)
    return r.masked_fill(own, float("inf"))


def margin_loss(r, target: float, temperature: float):
    """Offset cross-entropy on the normalised margins (module docstring); ``r`` from
    :func:`normalised_margins`, reduced by the mean."""
    others = (-temperature * (r - target)).masked_fill(torch.isinf(r), float("-inf"))
    # log(1 + Σ exp(x_j)) = logsumexp over [0, x_j]
    zero = torch.zeros_like(others[:, :1])
    return torch.logsumexp(torch.cat([zero, others], dim=1), dim=1).mean() / temperature
