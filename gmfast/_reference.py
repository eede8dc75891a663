"""Pure-PyTorch reference implementation of DESIGN 1.1–1.5.

This module is the oracle every kernel is tested against and the fallback when the
compiled extension is absent. It favours clarity over speed, but it is blocked over rows
so its memory stays bounded for any batch size, and every radius it returns is sound
(see :mod:`gmfast._fp` and the docstrings of :func:`tied_certify` and
:func:`perclass_certify`).

What is certified
-----------------
The classifier is defined by float64 parameters derived once, deterministically, from the
fitted means, covariances and priors (:func:`prepare_tied`, :func:`prepare_perclass`):

* ``tied``: ``ℓ_k(z) = a_kᵀz + β_k`` with ``A = μ Σ⁻¹`` and ``β_k = log π_k − ½ a_kᵀμ_k``;
* per-class: ``f_k(z) = κ_k − ½ (z−μ_k)ᵀ P_k (z−μ_k)`` with ``P_k`` the float64 inverse of
  ``Σ_k`` (symmetrised, checked positive definite) and ``κ_k = log π_k + ½ log det P_k``.

``c(z) = argmax_k`` (lowest index on ties). A radius ``R`` returned for ``z`` guarantees that
this classifier, evaluated in exact arithmetic, predicts ``c`` on the whole open ball of
radius ``R`` around ``z``, whatever the rounding of the computation that produced ``R``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from gmfast._fp import (U64, TiedErrorModel, cast_is_relative, gamma, norm_upper, perclass_constant_map, slack_down, slack_up,
                        tied_constants, underflow_unit, unit_roundoff)
from gmfast._validate import check_positive_definite

LOG_2PI = math.log(2.0 * math.pi)

# Rows per block are chosen so that a block's largest temporary has about this many
# elements: memory stays bounded for any batch size.
_BLOCK_ELEMS = 1 << 20


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
# 1.1 Sufficient statistics (streaming, float64, Chan et al. merge)
# --------------------------------------------------------------------------------------


def gram(R: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``RᵀR`` (d, d), exactly symmetric, computing only its upper block triangle.

    The result is symmetric, so of a ``blocks × blocks`` tiling only the ``b(b+1)/2`` upper
    tiles are products (``(b+1)/2b`` of a full GEMM's flops: 62.5% for 4 blocks); the lower
    triangle is mirrored. Each tile row is one GEMM through torch (MKL), so no second BLAS
    thread pool competes with torch's.
    """
    n, d = R.shape
    if d < 256:
        G = R.T @ R
        return torch.triu(G) + torch.triu(G, 1).T
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    G = R.new_empty(d, d)
    for a, b in zip(edges[:-1], edges[1:]):
        G[a:b, a:] = R[:, a:b].T @ R[:, a:]
    return torch.triu(G) + torch.triu(G, 1).T


class SufficientStats:
    """Per-class count, mean and centred scatter, merged batch by batch.

    Chan, Golub & LeVeque (1979) pairwise update: for a class seen in sets A and B with
    ``δ = μ_B − μ_A``, ``n = n_A + n_B``:

        μ = μ_A + δ n_B / n,     M2 = M2_A + M2_B + δ δᵀ n_A n_B / n.

    Only centred quantities are ever added, never ``Σzzᵀ − nμμᵀ``.

    ``scatter`` selects what is kept: ``"pooled"`` (one d×d within-class scatter, enough for
    ``tied``), ``"per_class"`` (K×d×d) or ``"diag"`` (K×d). With ``fourth_moments`` the
    per-class ``S4 = Σ‖x−μ‖⁴`` and ``T = Σ‖x−μ‖²(x−μ)`` are kept too (Ledoit–Wolf); their
    merge is the multivariate analogue of Pébay's (2008) update, derived in
    :meth:`_merge_fourth`. It needs the per-class scatter.
    """

    def __init__(self, n_features: int, scatter: str, fourth_moments: bool = False):
        if scatter not in ("pooled", "per_class", "diag"):
            raise ValueError(f"scatter must be 'pooled', 'per_class' or 'diag'; got {scatter!r}")
        if fourth_moments and scatter != "per_class":
            raise ValueError("fourth moments need the per-class scatter")
        self.d = int(n_features)
        self.scatter_kind = scatter
        self.fourth_moments = fourth_moments
        self.device = None
        self.count = None  # (K,) float64
        self.mean = None  # (K, d)
        self.scatter = None  # (d, d) | (K, d, d) | (K, d)
        self.s4 = None  # (K,)
        self.t3 = None  # (K, d)

    @property
    def n_classes(self) -> int:
        return 0 if self.count is None else int(self.count.shape[0])

    def _grow(self, K: int, device) -> None:
        if self.count is None:
            self.device = device
            f = dict(dtype=torch.float64, device=device)
            d = self.d
            self.count = torch.zeros(0, **f)
            self.mean = torch.zeros(0, d, **f)
            self.scatter = torch.zeros(d, d, **f) if self.scatter_kind == "pooled" else (
                torch.zeros(0, d, d, **f) if self.scatter_kind == "per_class" else torch.zeros(0, d, **f)
            )
            if self.fourth_moments:
                self.s4 = torch.zeros(0, **f)
                self.t3 = torch.zeros(0, d, **f)
        k0 = self.n_classes
        if K <= k0:
            return
        extra = K - k0

        def pad(t):
            return torch.cat([t, t.new_zeros((extra,) + tuple(t.shape[1:]))])

        self.count, self.mean = pad(self.count), pad(self.mean)
        if self.scatter_kind != "pooled":
            self.scatter = pad(self.scatter)
        if self.fourth_moments:
            self.s4, self.t3 = pad(self.s4), pad(self.t3)

    def update(self, Z: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch. ``Z`` (n, d) floating, ``y`` (n,) int64 labels in 0..K-1."""
        if Z.shape[0] == 0:
            return
        device = Z.device if self.device is None else self.device
        Z = Z.to(device=device, dtype=torch.float64)
        y = y.to(device)
        self._grow(int(y.max()) + 1, device)
        cls, inv = torch.unique(y, return_inverse=True)
        m = cls.shape[0]
        nb = torch.bincount(inv, minlength=m).to(torch.float64)
        meanb = torch.zeros(m, self.d, dtype=torch.float64, device=device).index_add_(0, inv, Z)
        meanb /= nb[:, None]
        R = Z - meanb[inv]  # residuals about each class's batch mean
        if self.scatter_kind == "pooled":
            m2b = gram(R)  # Σ_k of the batch's per-class scatters in one product
        elif self.scatter_kind == "diag":
            m2b = torch.zeros(m, self.d, dtype=torch.float64, device=device).index_add_(0, inv, R * R)
        else:
            m2b = torch.stack([gram(R[inv == i]) for i in range(m)])
        s4b = t3b = None
        if self.fourth_moments:
            r2 = (R * R).sum(1)
            s4b = torch.zeros(m, dtype=torch.float64, device=device).index_add_(0, inv, r2 * r2)
            t3b = torch.zeros(m, self.d, dtype=torch.float64, device=device).index_add_(0, inv, r2[:, None] * R)
        self._merge(cls, nb, meanb, m2b, s4b, t3b)

    def merge(self, other: "SufficientStats") -> None:
        """Merge another accumulator of the same kind (e.g. another rank's shard)."""
        if (other.d, other.scatter_kind, other.fourth_moments) != (self.d, self.scatter_kind, self.fourth_moments):
            raise ValueError("can only merge statistics of the same shape and kind")
        if other.count is None:
            return
        dev = self.device if self.device is not None else other.device
        self._grow(other.n_classes, dev)
        cls = torch.nonzero(other.count.to(dev) > 0).reshape(-1)
        sel = lambda t: None if t is None else t.to(dev)[cls]  # noqa: E731
        m2b = other.scatter.to(dev) if self.scatter_kind == "pooled" else sel(other.scatter)
        self._merge(cls, sel(other.count), sel(other.mean), m2b, sel(other.s4), sel(other.t3))

    def allreduce_(self, group=None) -> None:
        """Merge this accumulator with the same one on every rank of a process group, in place.

        Chan's merge for many parts written as sums, so one ``all_reduce`` per tensor does it:
        (1) sum counts and ``n_k μ_k`` → global means ``μ_k``; (2) each rank re-centres its
        scatter at ``μ_k`` (``M2 + n (μ_r − μ)(μ_r − μ)ᵀ``, and the fourth-moment terms with
        the same shift as :meth:`_merge_fourth`); (3) sum the re-centred scatters. Only
        centred quantities are summed, as in the serial merge.
        """
        import torch.distributed as dist

        dev = self.device if self.device is not None else torch.device("cpu")
        K = torch.tensor([self.n_classes], device=dev)
        dist.all_reduce(K, op=dist.ReduceOp.MAX, group=group)
        self._grow(int(K.item()), dev)
        n_r = self.count.clone()
        n = n_r.clone()
        s = self.mean * n_r[:, None]
        dist.all_reduce(n, group=group)
        dist.all_reduce(s, group=group)
        mean = torch.where(n[:, None] > 0, s / n.clamp_min(1)[:, None], torch.zeros_like(s))
        c = torch.where(n_r[:, None] > 0, self.mean - mean, torch.zeros_like(s))  # μ_r − μ
        if self.fourth_moments:
            self._shift_fourth(n_r, c)
        if self.scatter_kind == "pooled":
            self.scatter = self.scatter + (c * n_r[:, None]).T @ c
        elif self.scatter_kind == "diag":
            self.scatter = self.scatter + n_r[:, None] * c * c
        else:
            self.scatter = self.scatter + n_r[:, None, None] * c[:, :, None] * c[:, None, :]
        for t in [self.scatter] + ([self.s4, self.t3] if self.fourth_moments else []):
            dist.all_reduce(t, group=group)
        self.count, self.mean = n, mean

    def _shift_fourth(self, n_x, c) -> None:
        """Re-centre S4 and T of every class by ``c = μ_x − μ`` (uses the current scatter)."""
        cc = (c * c).sum(1)
        m2c = torch.einsum("kij,kj->ki", self.scatter, c)
        tr = torch.diagonal(self.scatter, dim1=1, dim2=2).sum(1)
        self.s4 = self.s4 + 4 * (c * m2c).sum(1) + 4 * (self.t3 * c).sum(1) + 2 * cc * tr + n_x * cc * cc
        self.t3 = self.t3 + 2 * m2c + tr[:, None] * c + (n_x * cc)[:, None] * c

    def _merge(self, cls, nb, meanb, m2b, s4b, t3b) -> None:
        na = self.count[cls]
        n = na + nb
        mean_a = self.mean[cls]
        delta = meanb - mean_a
        mean = mean_a + delta * (nb / n)[:, None]
        w = na * nb / n
        if self.fourth_moments:
            # must see the scatters *before* they are merged
            self._merge_fourth(cls, na, nb, mean_a, meanb, mean, self.scatter[cls], m2b, s4b, t3b)
        if self.scatter_kind == "pooled":
            self.scatter += m2b + (delta * w[:, None]).T @ delta
        elif self.scatter_kind == "diag":
            self.scatter[cls] += m2b + w[:, None] * delta * delta
        else:
            self.scatter[cls] += m2b + w[:, None, None] * delta[:, :, None] * delta[:, None, :]
        self.count[cls] = n
        self.mean[cls] = mean

    def _merge_fourth(self, cls, na, nb, mean_a, mean_b, mean, m2a, m2b, s4b, t3b) -> None:
        # For a part X with mean μ_X and c = μ_X − μ, every x − μ = a + c with Σa = 0, so
        #   Σ‖a + c‖⁴ = S4 + 4 cᵀM2 c + 4 Tᵀc + 2‖c‖² tr M2 + n‖c‖⁴
        #   Σ‖a + c‖²(a + c) = T + 2 M2 c + (tr M2) c + n‖c‖² c
        # (expand ‖a + c‖² = ‖a‖² + 2aᵀc + ‖c‖² and drop the terms linear in Σa).
        def moved(n_x, c, m2, s4, t3):
            cc = (c * c).sum(1)
            m2c = torch.einsum("kij,kj->ki", m2, c)
            tr = torch.diagonal(m2, dim1=1, dim2=2).sum(1)
            s4n = s4 + 4 * (c * m2c).sum(1) + 4 * (t3 * c).sum(1) + 2 * cc * tr + n_x * cc * cc
            t3n = t3 + 2 * m2c + tr[:, None] * c + (n_x * cc)[:, None] * c
            return s4n, t3n

        s4a_, t3a_ = moved(na, mean_a - mean, m2a, self.s4[cls], self.t3[cls])
        s4b_, t3b_ = moved(nb, mean_b - mean, m2b, s4b, t3b)
        self.s4[cls] = s4a_ + s4b_
        self.t3[cls] = t3a_ + t3b_


# --------------------------------------------------------------------------------------
# Finalising: covariances, shrinkage, priors
# --------------------------------------------------------------------------------------


def ledoit_wolf_intensity(m2: torch.Tensor, s4: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Ledoit–Wolf (2004) shrinkage intensity from centred statistics, batched.

    The same estimator as ``sklearn.covariance.ledoit_wolf_shrinkage`` on the centred
    samples: with ``S = M2/n``, ``μ = tr S/d``,
    ``β = (S4/n − ‖S‖_F²)/(d n)``, ``δ = (‖S‖_F² − d μ²)/d``, intensity ``min(β, δ)/δ``.

    m2 (..., d, d), s4 (...), n (...) -> (...)
    """
    d = m2.shape[-1]
    S = m2 / n[..., None, None]
    mu = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / d
    fro2 = (S * S).sum((-2, -1))
    beta = (s4 / n - fro2) / (d * n)
    delta = (fro2 - d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    return torch.where(beta == 0, torch.zeros_like(beta), beta / delta)


def _shrink(S: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(1−λ)S + λ (tr S/d) I`` for a (batch of) d×d matrices, made exactly symmetric.

    A BLAS ``RᵀR`` need not be bitwise symmetric; the stored covariance must be (files are
    checked for it, and the classifier's precision is derived from it).
    """
    S = 0.5 * (S + S.transpose(-1, -2))
    d = S.shape[-1]
    mu = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=S.dtype, device=S.device)
    return (1 - lam)[..., None, None] * S + (lam * mu)[..., None, None] * eye


def finalize_params(stats: SufficientStats, covariance_type: str, shrinkage, priors: str,
                    num_classes: int | None = None) -> dict:
    """Turn statistics into fitted float64 CPU parameters.

    Covariances are the maximum-likelihood ones (divide by ``n_k``; for ``tied`` the pooled
    within-class scatter divided by ``n``), as scikit-learn's ``LinearDiscriminantAnalysis``
    and ``GaussianMixture``.

    Returns dict with ``means`` (K,d), ``covariance`` ((d,d) tied, (K,d,d) full, (K,d) diag,
    (K,) spherical), ``priors`` (K,), ``counts`` (K,), ``shrinkage`` (float or (K,) tensor).
    """
    if stats.count is None:
        raise ValueError("no samples were given; call partial_fit with data before finalize")
    K = max(stats.n_classes, num_classes or 0)
    if num_classes is not None and stats.n_classes > num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}; got label {stats.n_classes - 1}")
    stats._grow(K, stats.device)
    cpu = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    count, mean, scatter = cpu(stats.count), cpu(stats.mean), cpu(stats.scatter)
    missing = torch.nonzero(count == 0).reshape(-1).tolist()
    if missing:
        raise ValueError(f"classes {missing[:10]} have no samples; every class 0..{K - 1} needs at least one "
                         "(map the labels to 0..K-1 with np.unique(y, return_inverse=True), or use "
                         "gmfast.sklearn.GaussianMixtureClassifier, which takes any labels)")
    if K < 2:
        raise ValueError(f"a classifier needs at least 2 classes; got {K}")
    d = stats.d
    n = count.sum()
    if covariance_type != "tied":
        small = torch.nonzero(count < 2).reshape(-1).tolist()
        if small:
            raise ValueError(
                f"covariance_type={covariance_type!r} needs at least 2 samples per class; "
                f"classes {small[:10]} have 1 (use covariance_type='tied')"
            )
    elif n <= K:
        raise ValueError(f"covariance_type='tied' needs more samples than classes; got {int(n)} for {K} classes")

    lw = shrinkage == "ledoit-wolf"
    if covariance_type == "tied":
        if lw:
            # Ledoit–Wolf on the class-centred residuals, pooled over classes.
            lam = ledoit_wolf_intensity(scatter.sum(0), cpu(stats.s4).sum(), n)
            scatter = scatter.sum(0)
        else:
            lam = torch.tensor(float(shrinkage), dtype=torch.float64)
        cov = _shrink(scatter / n, lam)
        check_positive_definite(cov, "tied covariance")
    elif covariance_type == "full":
        if lw:
            lam = ledoit_wolf_intensity(scatter, cpu(stats.s4), count)
        else:
            lam = torch.full((K,), float(shrinkage), dtype=torch.float64)
        cov = _shrink(scatter / count[:, None, None], lam)
        check_positive_definite(cov, "covariance")
    else:
        var = scatter / count[:, None]
        lam = torch.full((K,), float(shrinkage), dtype=torch.float64)
        var = (1 - lam)[:, None] * var + (lam * var.mean(1))[:, None]
        cov = var if covariance_type == "diag" else var.mean(1)
        low = (cov <= 0).reshape(K, -1).any(1) | ~torch.isfinite(cov).reshape(K, -1).all(1)
        if bool(low.any()):
            k = int(low.nonzero()[0, 0])
            raise ValueError(
                f"the {covariance_type} covariance of class {k} has a zero variance; use shrinkage > 0"
            )
    pri = count / n if priors == "empirical" else torch.full((K,), 1.0 / K, dtype=torch.float64)
    return dict(means=mean, covariance=cov, priors=pri, counts=count, shrinkage=lam, n_features=d)


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


def _quadratic_u(Zb: torch.Tensor, p: PerClassParams) -> tuple[torch.Tensor, torch.Tensor]:
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
    bs = max(1, _BLOCK_ELEMS // max(1, p.K * d))
    kappa = p.kappa.to(Z.dtype)
    if B <= bs:  # one block: stay differentiable without in-place writes
        Wr, U = _quadratic_u(Z, p)
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


def tied_epilogue(logits: torch.Tensor, z_norm_up: torch.Tensor | None, inv: torch.Tensor,
                  alpha: torch.Tensor | None, eps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and radius from a block of logits (the O(K)-per-row epilogue), float64.

    ``R = min_{j≠c} (m̂_cj − E_cj) · inv_cj`` with ``inv_cj ≤ 1/‖a_c − a_j‖_q`` and
    ``m̂_cj = ℓ̂_c − ℓ̂_j``; with error terms
    (``alpha``/``eps`` not None) ``E_cj`` bounds ``|m̂_cj − m_cj|``:
    ``(e_c + e_j)(1 + 8u₆₄) + 2u₆₄|m̂_cj|`` where ``e_k = α_k‖z‖ + ε_k`` (the 8u₆₄ covers
    the float64 operations forming ``e``; ``2u₆₄|m̂|`` the float64 subtraction). The final
    product is deflated by ``slack_down``: the subtraction and product add ≤ 2 roundings.
    A row whose logits overflowed gets radius 0. The min runs over **all** ``j``.

    logits (b, K) any float dtype; z_norm_up (b,) float64; inv (K, K) float64.
    Returns pred (b,) int64 and radius (b,) float64.
    """
    pred = logits.argmax(1)
    L = logits.to(torch.float64)
    m = L.gather(1, pred[:, None]) - L
    if alpha is not None:
        e = z_norm_up[:, None] * alpha[None, :] + eps[None, :]
        E = (e.gather(1, pred[:, None]) + e) * slack_up(4) + 2.0 * U64 * m.abs()
        num = m - E
    else:
        num = m
    ratio = torch.where(num > 0, num * inv[pred], torch.zeros_like(num))
    ratio.scatter_(1, pred[:, None], math.inf)
    radius = ratio.amin(1)
    if alpha is not None:
        radius = radius * slack_down(4)
    finite = torch.isfinite(L).all(1)
    radius = torch.where(finite, radius, torch.zeros_like(radius))
    pred = torch.where(finite, pred, torch.full_like(pred, -1))
    return pred, radius


def tied_certify(Z: torch.Tensor, p: TiedParams, norm, *, fp_sound: bool = True,
                 need_radius: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact certified radius of the tied classifier (DESIGN 1.3), sound in floating point.

    For the linear classifier ``ℓ_k = a_kᵀz + β_k`` the decision region of ``c`` is the
    polyhedron ``{m_cj ≥ 0 ∀j}``; the distance from ``z`` to the half-space ``m_cj < 0`` in
    norm ``p`` is ``m_cj(z) / ‖a_c − a_j‖_q`` (Hölder, attained), and the distance to the
    complement of a polyhedron is the min over its facets: this is the exact radius.
    With ``fp_sound``, the computed margins are lowered by a rigorous bound on their rounding
    error and the denominators raised (see :func:`tied_denominators`,
    :func:`tied_error_coefficients`, :func:`tied_epilogue`): the result is ≤ the exact radius.

    Z (B, d) in the working dtype of ``p``. Returns pred (B,) int64 and radius (B,) float64
    (``None`` when ``need_radius`` is false).
    """
    # one memory layout: BLAS picks its summation order by layout, so a strided Z would get
    # (equally sound but) different radii from a contiguous copy of the same values
    Z = Z.contiguous()
    B, d = Z.shape
    K = p.A.shape[0]
    if need_radius:
        inv_hat, inv_lo = tied_denominators(p, norm)
        table = (inv_lo if fp_sound else inv_hat).to(Z.device)
        alpha, eps = tied_error_coefficients(p, d, Z.dtype) if fp_sound else (None, None)
    # Outputs are allocated once and filled block by block: small per-block result tensors
    # allocated between the big temporaries would pin glibc's heap and make the resident
    # set grow with B (measured: 2.8 GB at B = 200,000, K = 1000), although nothing leaks.
    bs = max(1, _BLOCK_ELEMS // max(K, 1))
    pred = torch.empty(B, dtype=torch.int64, device=Z.device)
    radius = torch.empty(B, dtype=torch.float64, device=Z.device) if need_radius else None
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        logits = tied_linear_logits(Zb, p)
        if not need_radius:
            finite = torch.isfinite(logits).all(1)
            pred[i:i + bs] = torch.where(finite, logits.argmax(1), torch.full_like(finite, -1, dtype=torch.int64))
            continue
        zn = norm_upper(Zb) if fp_sound else None
        pred[i:i + bs], radius[i:i + bs] = tied_epilogue(logits, zn, table, alpha, eps)
    return pred, radius


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
        step = max(1, _BLOCK_ELEMS // max(1, K * d))
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
        step = max(1, _BLOCK_ELEMS // max(1, d * d))
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
    step = max(1, _BLOCK_ELEMS // max(1, d * d))
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


def _perclass_certify_cholesky(Z: torch.Tensor, p: PerClassParams, fp_sound: bool, need_radius: bool,
                               curvature: str):
    """:func:`perclass_certify` with the margins from the Cholesky form (``form="cholesky"``).

    ``D̂_k = fl(Σ ŷ_i²)`` with ``ŷ = fl(fl(R̃_k z) − b̃_k)`` (``R̃, b̃``: the tables rounded to
    the working precision). With ``ρ, σ, ε`` of :class:`CholeskyTables`, ``γ = γ_{d+4}(u)``,
    ``ζ_k = ‖z‖ + ‖μ_k‖ ≥ ‖z − μ_k‖``:

    * ``‖ŷ‖ ≤ ŷn = √((D̂ + 2(d+4)η)/(1 − γ_d))`` (a sum of ``d`` non-negative terms in any
      order has relative error ``≤ γ_d``; ``η``: underflow of the squares);
    * ``‖ŷ − R w‖ ≤ Δ = γ ρ ζ + u ŷn + 2(d+4)^{3/2}η`` (the product with ``R̃ = R(1+δ)``, the
      float64 ``b`` rounded once, one subtraction: the same shape as the precision form);
    * ``D = wᵀPw = ‖Rw‖² − wᵀEw``, so ``|D̂ − D| ≤ e = γ_d ŷn² + Δ(2ŷn + Δ) + ε ζ² + 2(d+4)η``;
    * ``‖u_k‖ = ‖P_k w‖ ≤ σ‖Rw‖ + ε‖w‖ ≤ ub_k = σ(ŷn + Δ) + ε ζ``: with it every pair has the
      cheap bound ``‖g_cj‖ ≤ ub_c + ub_j``.

    ``‖g_cj‖`` itself comes from ``û = fl(P̃z − P̃μ)`` as in the precision form (bound
    ``G``), and the radius of a pair uses ``min(G, S(ub_c' + ub_j))`` with
    ``ub_c' = min(ub_c, ‖û_c‖ + ν + Δ_c)``: both are upper bounds on ``‖g_cj‖``, so the min
    is one. The CPU kernel computes ``û`` only for the pairs that can be the minimum (those
    whose radius with the cheap bound is below the best exact one); its result is this
    function's. Predictions are the argmax of ``κ − ½D̂``.
    """
    B, d = Z.shape
    K = p.K
    T = Z.dtype
    cst = perclass_constant_map(d, T)
    u, g_, gd, S, nu, tiny_u, tiny_d = (cst[n] for n in ("u", "g", "gd", "S", "nu", "tiny_u", "tiny_d"))
    tab = cholesky_tables(p)
    work = p.cholesky.get("work")
    if work is None:
        work = p.cholesky["work"] = (tab.R.to(device=Z.device, dtype=T), tab.b.to(device=Z.device, dtype=T))
    Rt, bt = work
    if need_radius:
        lam_hat, lam_up, _ = curvature_table(p, curvature)
        lam_tab = (lam_up if fp_sound else lam_hat).to(Z.device)
    rho, sig, eps = (t.to(Z.device) for t in (tab.rho, tab.sigma, tab.eps))
    bs = max(1, _BLOCK_ELEMS // max(1, K * d))
    out_pred = torch.empty(B, dtype=torch.int64, device=Z.device)
    out_radius = torch.empty(B, dtype=torch.float64, device=Z.device) if need_radius else None
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        Y = torch.einsum("bd,ked->bke", Zb, Rt) - bt[None]
        D = Y.square().sum(-1).double()
        f = p.kappa[None, :] - 0.5 * D
        pred = f.argmax(1)
        finite = torch.isfinite(f).all(1)
        out_pred[i:i + bs] = torch.where(finite, pred, torch.full_like(pred, -1))
        if not need_radius:
            continue
        ar = torch.arange(Zb.shape[0], device=Z.device)
        _, U = _quadratic_u(Zb, p)
        Uc = U[ar, pred]
        G = torch.linalg.vector_norm((U - Uc[:, None, :]).double(), dim=-1)
        q = f.gather(1, pred[:, None]) - f
        lam = lam_tab[pred]
        un = torch.linalg.vector_norm(U.double(), dim=-1)
        if fp_sound:
            zm = norm_upper(Zb)[:, None] + p.mu_norm_up[None, :]
            yn = torch.sqrt((D + tiny_d) / (1.0 - gd)) * slack_up(4)
            dy = g_ * rho[None] * zm + u * yn + tiny_u
            e = S * (gd * yn * yn + dy * (2.0 * yn + dy) + eps[None] * zm * zm + tiny_d)
            ub = (sig[None] * (yn + dy) + eps[None] * zm) * slack_up(4)
            mag = p.kappa[None, :].abs() + D.abs()
            q = q - 0.5 * S * (e.gather(1, pred[:, None]) + e) - 4.0 * U64 * (mag.gather(1, pred[:, None]) + mag)
            dp = g_ * p.prec_abs_up[None, :] * zm + u * (un + nu) + tiny_u
            G = S * ((G + nu) * (1.0 + u) + dp.gather(1, pred[:, None]) + dp)
            ubc = torch.minimum(ub.gather(1, pred[:, None]), (un + nu + dp).gather(1, pred[:, None]) * slack_up(4))
            G = torch.minimum(G, S * (ubc + ub))
        else:
            ub = sig[None] * D.clamp_min(0).sqrt()
            ubc = torch.minimum(ub.gather(1, pred[:, None]), un.gather(1, pred[:, None]))
            G = torch.minimum(G, ubc + ub)
        out_radius[i:i + bs] = _min_pair_radius(q, G, lam, pred, finite, fp_sound)
    return out_pred, out_radius


def _min_pair_radius(q, G, lam, pred, finite, fp_sound):
    """``min_{j≠c} r_cj`` per row (deflated for its float64 evaluation when ``fp_sound``),
    0 for rows with non-finite logits or a NaN."""
    r = perclass_radius(q, G, lam)
    r.scatter_(1, pred[:, None], math.inf)
    radius = r.amin(1)
    if fp_sound:
        radius = radius * slack_down(8)
    return torch.where(finite & ~torch.isnan(radius), radius, torch.zeros_like(radius))


def perclass_radius(q: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Largest ``r`` with ``q − g r − ½ λ r² ≥ 0``: ``2q / (g + √(g² + 2λq))``, float64.

    Written without cancellation (the textbook root ``(−g + √(g² + 2λq))/λ`` loses all
    digits when ``λq ≪ g²``). ``q ≤ 0`` gives 0; ``g = λ = 0`` gives ``+inf``.
    """
    qp = q.clamp_min(0)
    den = g + torch.sqrt(g * g + 2.0 * lam * qp)
    r = torch.where(den > 0, 2.0 * qp / den, torch.full_like(q, math.inf))
    return torch.where(q > 0, r, torch.zeros_like(q))


def perclass_certify(Z: torch.Tensor, p: PerClassParams, *, fp_sound: bool = True,
                     need_radius: bool = True, curvature: str = "auto", form: str = "precision"):
    """Sound ℓ2 radius for per-class covariances (DESIGN 1.4).

    ``q_cj(z) = f_c − f_j`` is quadratic, so ``q_cj(z+δ) = q + gᵀδ + ½δᵀHδ`` exactly with
    ``g = P_j(z−μ_j) − P_c(z−μ_c) = u_j − u_c`` and ``H = P_j − P_c``; for ``‖δ‖ ≤ r``,
    ``q_cj(z+δ) ≥ q − ‖g‖r − ½λ_cj r²`` with ``λ_cj = max(0, λ_max(P_c − P_j))``, positive for
    every ``r`` below :func:`perclass_radius`. Every ``j`` stays below ``c`` on the ball of
    the smallest such ``r``: the min runs over all classes.

    Floating point (``fp_sound``), working precision ``T`` with unit roundoff ``u``,
    ``γ = γ_{d+4}(u)``, computed quantities hatted, ``ρ_k ≥ ‖|P_k|‖₂``:

    * ``‖û_k − u_k‖ ≤ Δ_k = γ ρ_k (‖z‖ + ‖μ_k‖) + u‖û_k‖`` (the GEMM ``P_k z`` and the
      precomputed ``P_k μ_k``, both with parameters rounded to ``T``, then one subtraction);
    * ``ŵ_k = fl(z − μ_k)``: ``‖ŵ_k − w_k‖ ≤ ε_k = 3u(‖z‖ + ‖μ_k‖)``;
    * ``|D̂_k − D_k| ≤ e_k = γ‖ŵ‖‖û‖ + ε_k‖û‖ + (‖ŵ‖ + ε_k)Δ_k`` with ``D_k = w_kᵀu_k``;
    * ``‖g‖ ≤ ‖fl(û_c − û_j)‖(1 + u) + Δ_c + Δ_j``;
    * computed norms are within ``γ_{d+1}`` of exact ones: every bound is multiplied by
      ``S = 1 + 4γ`` (products of at most three norms);
    * underflow: products may add ``η`` absolutely (Higham eq. 2.8), so each computed norm is
      raised by ``ν = √(2(d+4)η)`` (its squares may have underflowed), ``Δ_k`` by
      ``2(d+4)^{3/2}η`` and ``e_k`` by ``2(d+4)η``: negligible, but unconditional;
    * ``q`` is formed in float64 from ``κ`` and ``D̂``: lowered by ``½S(e_c + e_j)`` and by
      ``4u₆₄(|κ_c| + |κ_j| + |D̂_c| + |D̂_j|)`` for its own roundings;
    * ``λ⁺`` from :func:`curvature_table`. The radius is monotone (up in ``q``, down in
      ``‖g‖`` and ``λ``), so the pessimistic inputs give a lower bound; it is deflated by
      ``slack_down`` for its float64 evaluation.

    ``form="cholesky"`` (full covariances): the margins from ``‖R_k(z−μ_k)‖²`` instead, as the
    CPU kernel computes them (:func:`_perclass_certify_cholesky`); ``"precision"`` (default)
    is the form above, that of the Triton and CUDA kernels.

    Z (B, d) in ``p``'s working dtype. Returns pred (B,) int64, radius (B,) float64 or None.
    """
    if form not in ("precision", "cholesky"):
        raise ValueError(f"form must be 'precision' or 'cholesky'; got {form!r}")
    Z = Z.contiguous()  # one memory layout, one summation order (see tied_certify)
    if form == "cholesky" and p.kind == "full":
        return _perclass_certify_cholesky(Z, p, fp_sound, need_radius, curvature)
    B, d = Z.shape
    K = p.K
    T = Z.dtype
    cst = perclass_constant_map(d, T)
    u, g_, S, nu, tiny_u, tiny_d = (cst[n] for n in ("u", "g", "S", "nu", "tiny_u", "tiny_d"))
    if need_radius:
        lam_hat, lam_up, _ = curvature_table(p, curvature)
        lam_tab = (lam_up if fp_sound else lam_hat).to(Z.device)
    bs = max(1, _BLOCK_ELEMS // max(1, K * d))
    out_pred = torch.empty(B, dtype=torch.int64, device=Z.device)  # filled in place: see tied_certify
    out_radius = torch.empty(B, dtype=torch.float64, device=Z.device) if need_radius else None
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        Wr, U = _quadratic_u(Zb, p)
        D = (Wr * U).sum(-1).double()
        f = p.kappa[None, :] - 0.5 * D
        pred = f.argmax(1)
        finite = torch.isfinite(f).all(1)
        if not need_radius:
            out_pred[i:i + bs] = torch.where(finite, pred, torch.full_like(pred, -1))
            continue
        ar = torch.arange(Zb.shape[0], device=Z.device)
        Uc = U[ar, pred]
        G = torch.linalg.vector_norm((U - Uc[:, None, :]).double(), dim=-1)
        q = f.gather(1, pred[:, None]) - f
        lam = lam_tab[pred]
        if fp_sound:
            zn = norm_upper(Zb)[:, None]
            un = torch.linalg.vector_norm(U.double(), dim=-1) + nu
            wn = torch.linalg.vector_norm(Wr.double(), dim=-1) + nu
            zm = zn + p.mu_norm_up[None, :]
            delta = g_ * p.prec_abs_up[None, :] * zm + u * un + tiny_u
            epsw = 3.0 * u * zm
            e = S * (g_ * wn * un + epsw * un + (wn + epsw) * delta) + tiny_d
            ec = e.gather(1, pred[:, None])
            kap = p.kappa[None, :]
            mag = kap.abs() + D.abs()
            q = q - 0.5 * S * (ec + e) - 4.0 * U64 * (mag.gather(1, pred[:, None]) + mag)
            G = S * ((G + nu) * (1.0 + u) + delta.gather(1, pred[:, None]) + delta)
        out_radius[i:i + bs] = _min_pair_radius(q, G, lam, pred, finite, fp_sound)
        out_pred[i:i + bs] = torch.where(finite, pred, torch.full_like(pred, -1))
    return out_pred, out_radius
