"""Fitted statistics: streaming per-class moments and the covariances they finalise to (DESIGN 1.1).

Everything here is float64 and deterministic: :class:`SufficientStats` accumulates counts,
means and centred scatters batch by batch (Chan et al.'s merge, also across ranks), and
:func:`finalize_params` turns them into the maximum-likelihood means, (shrunk) covariances
and priors that :mod:`gmfast.params` derives the certified classifier from.
"""

from __future__ import annotations

import torch

from gmfast._validate import check_positive_definite


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

    lw = shrinkage in ("auto", "ledoit-wolf")
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
    elif lw:
        # diag/spherical: the intensity Ledoit–Wolf picks for the pooled class-centred
        # residuals (that of ``tied``), applied to every class's variances, so a feature
        # constant within a class still gets a positive variance
        var = torch.diagonal(scatter, dim1=1, dim2=2) / count[:, None]
        lam = ledoit_wolf_intensity(scatter.sum(0), cpu(stats.s4).sum(), n).expand(K).clone()
    else:
        var = scatter / count[:, None]
        lam = torch.full((K,), float(shrinkage), dtype=torch.float64)
    if covariance_type in ("diag", "spherical"):
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
