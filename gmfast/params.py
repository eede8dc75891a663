"""The certified classifier's parameters and the tables its certificates read (DESIGN 1.2–1.5).

The classifier is defined by float64 parameters derived once, deterministically, from the
fitted means, covariances and priors (:func:`prepare_tied`, :func:`prepare_perclass`):

* ``tied``: ``ℓ_k(z) = a_kᵀz + β_k`` with ``A = μ Σ⁻¹`` and ``β_k = log π_k − ½ a_kᵀμ_k``;
* per-class: ``f_k(z) = κ_k − ½ (z−μ_k)ᵀ P_k (z−μ_k)`` with ``P_k`` the float64 inverse of
  ``Σ_k`` (symmetrised, checked positive definite) and ``κ_k = log π_k + ½ log det P_k``.

``c(z) = argmax_k`` (lowest index on ties). A radius ``R`` returned for ``z`` guarantees that
this classifier, evaluated in exact arithmetic, predicts ``c`` on the whole open ball of
radius ``R`` around ``z``, whatever the rounding of the computation that produced ``R``.

This module holds those parameters, their working copies in the kernels' precision, the
differentiable log-joint (the heads' ``forward``) and every float64 table a certificate
path needs (denominators, error coefficients, curvature, Cholesky form). The certify
epilogues themselves are backends: :mod:`gmfast.ops` (the pure-PyTorch one is
``gmfast/ops/_reference.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from gmfast._fp import (U64, TiedErrorModel, cast_is_relative, gamma, norm_upper, slack_down, slack_up,
                        tied_constants, underflow_unit, unit_roundoff)

LOG_2PI = math.log(2.0 * math.pi)

#: Rows per block are chosen so that a block's largest temporary has about this many
#: elements: memory stays bounded for any batch size.
BLOCK_ELEMS = 1 << 20


# --------------------------------------------------------------------------------------
# Precision policy
# --------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working precision for inputs of ``dtype``: float64 stays, anything else runs in float32.

    float16/bfloat16 inputs are exact in float32, so certifying them in float32 certifies
    the very point the user passed.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_matmul_is_ieee(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` are plain IEEE float32 (no TF32 / bf16).

    The rounding-error bounds assume IEEE float32 products. A user who enabled TF32 or
    bf16 matmuls globally would silently break them, so callers then work in float64.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backends = torch.backends
    if device.type == "cuda":
        if backends.cuda.matmul.allow_tf32:
            return False
        prec = getattr(backends.cuda.matmul, "fp32_precision", "none")
    else:
        prec = getattr(getattr(backends, "mkldnn", None), "matmul", None)
        prec = getattr(prec, "fp32_precision", "none") if prec is not None else "none"
    return prec in ("none", "ieee")


def working_dtype(Z: torch.Tensor) -> torch.dtype:
    T = compute_dtype(Z.dtype)
    if T == torch.float32 and not fp32_matmul_is_ieee(Z.device):
        return torch.float64
    return T


# --------------------------------------------------------------------------------------
# 1.2 Derived parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TiedParams:
    """Derived float64 parameters of the tied (linear) classifier. K classes, d features."""

    A: torch.Tensor  # (K, d)  a_k = Σ⁻¹ μ_k
    beta: torch.Tensor  # (K,)  log π_k − ½ a_kᵀ μ_k
    W: torch.Tensor  # (d, d) L⁻¹ with Σ = L Lᵀ: zᵀΣ⁻¹z = ‖W z‖², for the log-joint only
    logdet: float  # log det Σ
    cov: torch.Tensor  # (d, d) Σ, for the Mahalanobis threat model
    a_norm_up: torch.Tensor  # (K,) ≥ ‖a_k‖₂
    beta_abs: torch.Tensor  # (K,) |β_k|
    tables: dict = field(default_factory=dict, compare=False)  # norm -> (1/N̂, ≤1/N), float64 (K, K)
    master: "TiedParams | None" = field(default=None, compare=False)  # the float64 original
    #: whether A and β are the master's up to a relative rounding (:func:`gmfast._fp.cast_is_relative`)
    cast_ok: bool = field(default=True, compare=False)
    wide: dict = field(default_factory=dict, compare=False)  # cache of :meth:`widened`

    def to(self, device, dtype) -> "TiedParams":
        """Working copy: A, β, W in ``dtype`` on ``device``; error-bound data stays float64.

        Tables are always computed from the float64 master (the certified classifier), then
        moved: a float32 copy of ``A`` defines a different classifier. ``cast_ok`` records
        whether the error model's relative-rounding assumption holds for this copy's cast.
        """
        m = self.master or self
        # contiguous once here: LAPACK results come back column-major, and a kernel would
        # otherwise copy them on every call
        mv = lambda t, dt: t.to(device=device, dtype=dt).contiguous()  # noqa: E731
        return replace(
            self, A=mv(self.A, dtype), beta=mv(self.beta, dtype), W=mv(self.W, dtype),
            cov=mv(self.cov, torch.float64), a_norm_up=mv(self.a_norm_up, torch.float64),
            beta_abs=mv(self.beta_abs, torch.float64), tables={}, master=m, wide={},
            cast_ok=cast_is_relative(m.A, dtype) and cast_is_relative(m.beta, dtype),
        )

    def widened(self) -> "TiedParams":
        """The float64 working copy on this copy's device (cached)."""
        if self.A.dtype == torch.float64:
            return self
        if "f64" not in self.wide:
            self.wide["f64"] = (self.master or self).to(self.A.device, torch.float64)
        return self.wide["f64"]


def prepare_tied(means: torch.Tensor, cov: torch.Tensor, priors: torch.Tensor) -> TiedParams:
    L = torch.linalg.cholesky(cov)
    A = torch.cholesky_solve(means.T.contiguous(), L).T.contiguous()
    beta = torch.log(priors) - 0.5 * (A * means).sum(1)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    W = torch.linalg.solve_triangular(L, eye, upper=False)
    logdet = float(2.0 * torch.log(torch.diagonal(L)).sum())
    return TiedParams(A=A, beta=beta, W=W, logdet=logdet, cov=cov,
                      a_norm_up=norm_upper(A), beta_abs=beta.abs())


@dataclass(frozen=True)
class PerClassParams:
    """Derived float64 parameters of a per-class quadratic classifier.

    ``kind`` is ``"full"`` (``prec`` (K,d,d)), ``"diag"`` (``prec`` (K,d), the diagonal of
    ``P_k``) or ``"spherical"`` (``prec`` (K,), ``P_k = prec_k I``).
    """

    kind: str
    mu: torch.Tensor  # (K, d)
    prec: torch.Tensor
    prec_mu: torch.Tensor  # (K, d) P_k μ_k
    kappa: torch.Tensor  # (K,) log π_k + ½ log det P_k
    prec_abs_up: torch.Tensor  # (K,) ≥ ‖|P_k|‖₂ (spectral norm of the elementwise |P_k|)
    mu_norm_up: torch.Tensor  # (K,) ≥ ‖μ_k‖₂
    curvature: dict = field(default_factory=dict, compare=False)  # mode -> (λ̂, λ⁺), (K, K)
    cholesky: dict = field(default_factory=dict, compare=False)  # cache of cholesky_tables
    master: "PerClassParams | None" = field(default=None, compare=False)  # the float64 original
    #: whether every parameter rounded to the working dtype (μ, P, Pμ and, for ``full``, the
    #: Cholesky tables R, Rμ) is the master's up to a relative rounding
    cast_ok: bool = field(default=True, compare=False)
    wide: dict = field(default_factory=dict, compare=False)  # cache of :meth:`widened`

    @property
    def K(self) -> int:
        return int(self.mu.shape[0])

    def to(self, device, dtype) -> "PerClassParams":
        """Working copy: μ, P, Pμ in ``dtype`` on ``device``; error-bound data stays float64
        (see :meth:`TiedParams.to`)."""
        m = self.master or self
        cast = [m.mu, m.prec, m.prec_mu]
        if m.kind == "full" and dtype != torch.float64:
            t = cholesky_tables(m)
            cast += [t.R, t.b]
        mv = lambda t, dt: t.to(device=device, dtype=dt).contiguous()  # noqa: E731 (see TiedParams.to)
        return replace(
            self, mu=mv(self.mu, dtype), prec=mv(self.prec, dtype), prec_mu=mv(self.prec_mu, dtype),
            kappa=mv(self.kappa, torch.float64), prec_abs_up=mv(self.prec_abs_up, torch.float64),
            mu_norm_up=mv(self.mu_norm_up, torch.float64), curvature={}, cholesky={},
            master=m, wide={}, cast_ok=all(cast_is_relative(t, dtype) for t in cast),
        )

    def widened(self) -> "PerClassParams":
        """The float64 working copy on this copy's device (cached)."""
        if self.mu.dtype == torch.float64:
            return self
        if "f64" not in self.wide:
            self.wide["f64"] = (self.master or self).to(self.mu.device, torch.float64)
        return self.wide["f64"]


def prepare_perclass(kind: str, means: torch.Tensor, cov: torch.Tensor, priors: torch.Tensor) -> PerClassParams:
    d = means.shape[1]
    if kind == "full":
        L = torch.linalg.cholesky(cov)
        P = torch.cholesky_inverse(L)
        P = (0.5 * (P + P.transpose(1, 2))).contiguous()  # exactly symmetric: the classifier's P_k
        LP, info = torch.linalg.cholesky_ex(P)
        if bool((info != 0).any()):
            k = int((info != 0).nonzero()[0, 0])
            raise ValueError(f"the precision of class {k} is not positive definite in float64; use shrinkage > 0")
        half_logdet = torch.log(torch.diagonal(LP, dim1=1, dim2=2)).sum(1)
        prec_mu = torch.einsum("kij,kj->ki", P, means)
        absP = P.abs()
        # ‖|P|‖₂ ≤ min(‖P‖_F, max row sum of |P|) (|P| is symmetric, so ‖·‖₁ = ‖·‖∞)
        pabs = torch.minimum(torch.linalg.matrix_norm(P), absP.sum(2).amax(1)) * slack_up(d + 4)
    elif kind == "diag":
        P = 1.0 / cov
        half_logdet = 0.5 * torch.log(P).sum(1)
        prec_mu = P * means
        pabs = P.amax(1)
    elif kind == "spherical":
        P = 1.0 / cov
        half_logdet = 0.5 * d * torch.log(P)
        prec_mu = P[:, None] * means
        pabs = P.clone()
    else:
        raise ValueError(f"unknown per-class kind {kind!r}")
    kappa = torch.log(priors) + half_logdet
    return PerClassParams(kind=kind, mu=means, prec=P, prec_mu=prec_mu, kappa=kappa,
                          prec_abs_up=pabs, mu_norm_up=norm_upper(means))


# --------------------------------------------------------------------------------------
# 1.2 Log-joint (the nn.Module forward), differentiable
# --------------------------------------------------------------------------------------


def tied_linear_logits(Z: torch.Tensor, p: TiedParams) -> torch.Tensor:
    """``ℓ = Z Aᵀ + β`` (B, K) in ``p``'s dtype."""
    return torch.addmm(p.beta, Z, p.A.T)


def tied_log_joint(Z: torch.Tensor, p: TiedParams) -> torch.Tensor:
    """``log π_k + log N(z; μ_k, Σ)`` = ``ℓ_k − ½‖Wz‖² − ½ log det Σ − d/2 log 2π``."""
    d = Z.shape[1]
    quad = (Z @ p.W.T).square().sum(1, keepdim=True)
    return tied_linear_logits(Z, p) - 0.5 * quad - 0.5 * (p.logdet + d * LOG_2PI)


def quadratic_terms(Zb: torch.Tensor, p: PerClassParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class residuals and gradients for a row block: ``w_k = z − μ_k``, ``u_k = P_k w_k``.

    Returns (W, U), each (b, K, d). ``u_k`` is formed as ``P_k z − P_k μ_k`` so the full
    case is one batched GEMM, as in the kernels.
    """
    Wr = Zb[:, None, :] - p.mu[None, :, :]
    if p.kind == "full":
        U = torch.einsum("bd,kde->bke", Zb, p.prec) - p.prec_mu[None]
    elif p.kind == "diag":
        U = p.prec[None] * Wr
    else:
        U = p.prec[None, :, None] * Wr
    return Wr, U


def perclass_log_joint(Z: torch.Tensor, p: PerClassParams) -> torch.Tensor:
    """``κ_k − ½ (z−μ_k)ᵀP_k(z−μ_k) − d/2 log 2π`` (B, K), blocked over rows."""
    B, d = Z.shape
    bs = max(1, BLOCK_ELEMS // max(1, p.K * d))
    kappa = p.kappa.to(Z.dtype)
    if B <= bs:  # one block: stay differentiable without in-place writes
        Wr, U = quadratic_terms(Z, p)
        return kappa - 0.5 * (Wr * U).sum(-1) - 0.5 * d * LOG_2PI
    return torch.cat([perclass_log_joint(Z[i:i + bs], p) for i in range(0, B, bs)])


# --------------------------------------------------------------------------------------
# 1.3 Tied: exact radius
# --------------------------------------------------------------------------------------


def tied_denominators(p: TiedParams, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """K×K reciprocal tables ``1/N̂[c, j]`` and a lower bound on ``1/‖a_c − a_j‖_q``, float64.

    ``q`` is the dual exponent of the threat norm (2→2, ∞→1, 1→∞); Mahalanobis uses
    ``‖Σ^{1/2}(a_c − a_j)‖₂``. Kernels multiply margins by these (a multiply is much cheaper
    than a divide in the epilogue). Computed once per norm and cached on ``p``. Where
    ``a_c = a_j`` the reciprocal is ``+inf`` (class ``j`` can never overtake ``c``).

    The lower bound is ``fl(1/N⁺)(1 − 2u)`` with ``N⁺ ≥`` the exact norm; error bounds for
    ``N⁺`` (all float64, ``u = u₆₄``):

    * q = 2 via the Gram matrix ``G = A Aᵀ``: each ``G_ij`` is an inner product, off by at
      most ``γ_d ‖a_i‖‖a_j‖``; so ``N² = G_cc + G_jj − 2G_cj`` is off by at most
      ``γ_{d+3}(‖a_c‖ + ‖a_j‖)²`` (three more roundings in the combination).
    * Mahalanobis via ``G = A Σ Aᵀ``: ``|fl(AΣAᵀ) − AΣAᵀ| ≤ γ_{2d}|A||Σ||A|ᵀ`` entrywise
      and ``|a_i|ᵀ|Σ||a_j| ≤ ‖Σ‖_F‖a_i‖‖a_j‖``.
    * q = 1: a sum of ``d`` nonnegative terms, each a rounded |difference|:
      relative error ``≤ γ_{d+1}``.
    * q = ∞: one rounded subtraction: relative error ``≤ u``.
    """
    if norm in p.tables:
        return p.tables[norm]
    if p.master is not None:
        inv_hat, inv_lo = tied_denominators(p.master, norm)
        p.tables[norm] = (inv_hat.to(p.A.device), inv_lo.to(p.A.device))
        return p.tables[norm]
    A = p.A
    K, d = A.shape
    an = p.a_norm_up
    pair = (an[:, None] + an[None, :]) ** 2
    if norm == 2 or norm == "mahalanobis":
        if norm == 2:
            G = A @ A.T
            err = gamma(d + 3, U64) * pair
        else:
            G = A @ p.cov @ A.T
            err = gamma(2 * d + 3, U64) * torch.linalg.matrix_norm(p.cov) * slack_up(d) * pair
        dg = torch.diagonal(G)
        n2 = (dg[:, None] + dg[None, :] - 2.0 * G).clamp_min(0)
        n_hat = n2.sqrt()
        # each of the ≤ 2d (Mahalanobis: 2d²) products behind an entry of G may underflow,
        # adding η₆₄ each; three entries combine into N²
        err = err + 6.0 * (d * d if norm == "mahalanobis" else d) * underflow_unit(torch.float64)
        n_up = (n2 + err).sqrt() * slack_up(2)
    elif norm == math.inf:
        n_hat = torch.cdist(A[None], A[None], p=1)[0]
        n_up = n_hat * (1.0 + gamma(d + 2, U64))
    elif norm == 1:
        n_hat = torch.cdist(A[None], A[None], p=math.inf)[0]
        n_up = n_hat * slack_up(2)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    inv_hat = 1.0 / n_hat  # 1/0 = +inf on purpose
    inv_lo = (1.0 / n_up) * slack_down(1)
    inv_hat.fill_diagonal_(math.inf)
    inv_lo.fill_diagonal_(math.inf)
    p.tables[norm] = (inv_hat, inv_lo)
    return p.tables[norm]


def tied_error_coefficients(p: TiedParams, d: int, T: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α, ε)`` with ``|ℓ̂_k − ℓ_k| ≤ α_k ‖z‖ + ε_k`` for logits computed in ``T``.

    ``ℓ̂_k = fl(β̃_k + Σ_i ã_ki z_i)`` with ``ã, β̃`` the float64 parameters rounded to ``T``:
    an inner product of length ``d + 1`` whose terms carry one extra rounding each, so
    ``|ℓ̂_k − ℓ_k| ≤ γ_{d+2}(|a_k|ᵀ|z| + |β_k|) ≤ γ_{d+2}(‖a_k‖‖z‖ + |β_k|)``, plus
    ``2(d+2)η`` for products that underflow.
    """
    g = gamma(d + 2, unit_roundoff(T))
    return g * p.a_norm_up, g * p.beta_abs + 2.0 * (d + 2) * underflow_unit(T)


def tied_error_model(p: TiedParams, d: int, T: torch.dtype) -> TiedErrorModel:
    """The tied rounding-error model of the certify contract: :func:`tied_error_coefficients`
    and the epilogue's constants (:func:`gmfast._fp.tied_constants`)."""
    return TiedErrorModel(*tied_error_coefficients(p, d, T), tied_constants(d, T))


# --------------------------------------------------------------------------------------
# 1.4 Per-class covariances: sound radius
# --------------------------------------------------------------------------------------


def curvature_table(p: PerClassParams, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """``λ[c, j] = max(0, λ_max(P_c − P_j))``: estimate ``λ̂`` and sound upper bound ``λ⁺``.

    ``mode``: ``"exact"`` (symmetric eigensolver per unordered pair, float64), ``"weyl"``
    (``λ_max(P_c) − λ_min(P_j)``, one eigensolve per class; ≥ the exact value by Weyl's
    inequality), or ``"auto"`` (exact when the eigensolves are cheap). ``diag`` and
    ``spherical`` are always exact (a max over coordinates).

    Rounding: the eigensolver is backward stable, each computed eigenvalue is exact for a
    matrix within ``p(d)·u₆₄·‖H‖₂`` of ``H``; we add ``16(d+1)u₆₄‖Ĥ‖_F`` (``p(d) = 16(d+1)``
    is generous for LAPACK's tridiagonal QR/divide-and-conquer) plus the rounding of forming
    ``Ĥ = P_c − P_j`` (``u₆₄(‖P_c‖_F + ‖P_j‖_F)``).

    Returns ``(λ̂, λ⁺, mode_used)``, each table float64 (K, K), zero on the diagonal.
    """
    if mode not in ("auto", "exact", "weyl"):
        raise ValueError(f"curvature must be 'auto', 'exact' or 'weyl'; got {mode!r}")
    K = p.K
    d = p.mu.shape[1]
    if p.kind != "full":
        mode_used = "exact"
    elif mode == "auto":
        pairs = K * (K - 1) // 2
        mode_used = "exact" if pairs * 10.0 * d**3 <= 4e9 else "weyl"
    else:
        mode_used = mode
    if mode_used in p.curvature:
        return p.curvature[mode_used] + (mode_used,)
    if p.master is not None:
        lam, up, _ = curvature_table(p.master, mode_used)
        p.curvature[mode_used] = (lam.to(p.mu.device), up.to(p.mu.device))
        return p.curvature[mode_used] + (mode_used,)
    P = p.prec
    if p.kind == "spherical":
        lam = P[:, None] - P[None, :]
        up = lam + U64 * (P[:, None].abs() + P[None, :].abs())
    elif p.kind == "diag":
        lam = torch.empty(K, K, dtype=torch.float64, device=P.device)
        up = torch.empty_like(lam)
        step = max(1, BLOCK_ELEMS // max(1, K * d))
        for i in range(0, K, step):
            diff = P[i:i + step, None, :] - P[None, :, :]
            lam[i:i + step] = diff.amax(-1)
            up[i:i + step] = (diff + U64 * (P[i:i + step, None, :] + P[None, :, :])).amax(-1)
    elif mode_used == "weyl":
        ev = torch.linalg.eigvalsh(P)
        fro = torch.linalg.matrix_norm(P)
        slack = 16 * (d + 1) * U64 * fro
        lam = ev[:, -1][:, None] - ev[:, 0][None, :]
        up = (ev[:, -1] + slack)[:, None] - (ev[:, 0] - slack)[None, :]
    else:
        lam = torch.zeros(K, K, dtype=torch.float64, device=P.device)
        up = torch.zeros_like(lam)
        fro = torch.linalg.matrix_norm(P)
        iu = torch.triu_indices(K, K, 1)
        step = max(1, BLOCK_ELEMS // max(1, d * d))
        for s in range(0, iu.shape[1], step):
            c, j = iu[0, s:s + step], iu[1, s:s + step]
            H = P[c] - P[j]
            ev = torch.linalg.eigvalsh(H)
            slack = 16 * (d + 1) * U64 * torch.linalg.matrix_norm(H) + U64 * (fro[c] + fro[j])
            lam[c, j], lam[j, c] = ev[:, -1], -ev[:, 0]
            up[c, j], up[j, c] = ev[:, -1] + slack, -ev[:, 0] + slack
    lam = lam.clamp_min(0).fill_diagonal_(0.0)
    up = up.clamp_min(0).fill_diagonal_(0.0)
    p.curvature[mode_used] = (lam, up)
    return lam, up, mode_used


@dataclass(frozen=True)
class CholeskyTables:
    """The Cholesky form of a full-covariance head (float64, from the master parameters).

    ``R_k`` is upper triangular with ``R_kᵀR_k ≈ P_k`` (``R_k = chol(P_k)ᵀ``), so
    ``D_k = ‖R_k(z−μ_k)‖²`` up to ``ε_k‖z−μ_k‖²``: half the multiply-adds of ``P_k(z−μ_k)``
    and a sum of squares (no cancellation). Bounds, each rigorous in float64:

    * ``rho_k ≥ ‖|R_k|‖₂`` as ``min(‖R‖_F, √(‖R‖₁‖R‖_∞))``;
    * ``eps_k ≥ ‖R_kᵀR_k − P_k‖₂``: the residual ``Ê = fl(fl(RᵀR) − P)`` is computed, and
      ``‖E‖₂ ≤ ‖Ê‖_F(1 + u₆₄) + γ_d(u₆₄)·rho²`` (error of the product and the subtraction),
      so nothing rests on the backward error of the factorisation itself;
    * ``sigma_k ≥ ‖R_k‖₂``: ``‖R‖₂² = λ_max(P + E) ≤ λ_max(P) + eps``, with the eigensolver's
      slack of :func:`curvature_table`; also capped by ``rho``.
    """

    R: torch.Tensor  # (K, d, d) upper triangular
    b: torch.Tensor  # (K, d) R_k μ_k
    rho: torch.Tensor  # (K,)
    sigma: torch.Tensor  # (K,)
    eps: torch.Tensor  # (K,)


def cholesky_tables(p: PerClassParams) -> CholeskyTables:
    """:class:`CholeskyTables` of a full-covariance head, computed once from the float64
    master and cached on it (working copies share the master's)."""
    if p.kind != "full":
        raise ValueError(f"the Cholesky form is for full covariances; got kind {p.kind!r}")
    m = p.master or p
    if "tables" in m.cholesky:
        return m.cholesky["tables"]
    P = m.prec
    K, d, _ = P.shape
    fix = 1.0 + gamma(d * d + 4, U64)  # a Frobenius norm or a row sum: ≤ d² + 3 roundings
    R = torch.empty_like(P)
    b = torch.empty_like(m.mu)
    rho = torch.empty(K, dtype=torch.float64, device=P.device)
    eps = torch.empty_like(rho)
    lmax = torch.empty_like(rho)
    step = max(1, BLOCK_ELEMS // max(1, d * d))
    for i in range(0, K, step):
        Pi = P[i:i + step]
        L, info = torch.linalg.cholesky_ex(Pi)
        if bool((info != 0).any()):
            k = i + int((info != 0).nonzero()[0, 0])
            raise ValueError(f"the precision of class {k} is not positive definite in float64; use shrinkage > 0")
        Ri = L.transpose(1, 2).contiguous()
        R[i:i + step] = Ri
        b[i:i + step] = torch.einsum("kij,kj->ki", Ri, m.mu[i:i + step])
        A = Ri.abs()
        r = torch.minimum(torch.linalg.matrix_norm(Ri), (A.sum(1).amax(1) * A.sum(2).amax(1)).sqrt()) * fix
        rho[i:i + step] = r
        E = Ri.transpose(1, 2) @ Ri - Pi
        eps[i:i + step] = (torch.linalg.matrix_norm(E) * (1.0 + U64) + gamma(d, U64) * r * r) * fix
        ev = torch.linalg.eigvalsh(Pi)[:, -1]
        lmax[i:i + step] = ev + 16 * (d + 1) * U64 * torch.linalg.matrix_norm(Pi)
    sigma = torch.minimum(rho, torch.sqrt((lmax + eps) * slack_up(4)) * slack_up(4))
    t = CholeskyTables(R=R, b=b, rho=rho, sigma=sigma, eps=eps)
    m.cholesky["tables"] = t
    return t
