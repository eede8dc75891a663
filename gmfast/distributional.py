"""The distributional certificate: certified accuracy of the fitted mixture and its KL bound
(DESIGN 1.7).

Certified accuracy at radius ``ε`` under a distribution ``D`` of ``(z, y)``:

    CA_D(ε) = P_D[ c(z) = y  and  R(z) ≥ ε ].

* :func:`certified_accuracy_gmm` computes ``CA_Q`` for the fitted mixture ``Q`` itself
  (``y ~ π``, ``z | y ~ N(μ_y, Σ_y)``), with a standard error.
* For the true law ``P`` of (latent, label), ``|CA_P(ε) − CA_Q(ε)| ≤ TV(P, Q)``: the event
  ``{c(z) = y, R(z) ≥ ε}`` is one fixed measurable set of pairs ``(z, y)``, and TV bounds
  the difference of the probabilities of any event. TV and KL are of the *joint* laws of
  ``(z, y)``. ``TV ≤ min(√(KL/2), √(1 − e^{−KL}))`` (Pinsker; Bretagnolle–Huber 1979):
  :func:`tv_from_kl`. So with ``KL(P‖Q)`` known or bounded,
  ``CA_P(ε) ≥ CA_Q(ε) − TV bound`` (:func:`certified_accuracy_lower_bound`): certified
  accuracy degrades gracefully with the KL gap (Emmanouilidis et al. 2026).
* ``KL(P‖Q)`` is not observable from samples with a guarantee: the estimates in
  :mod:`gmfast.diagnostics` are labelled *estimates*, **not** guarantees.
* :func:`gmfast.report.report` puts the empirical certified accuracy, ``CA_Q`` and the
  lower bound side by side per radius (``gmfast report``).

How ``CA_Q`` is computed
------------------------
``tied``: the radius is exact, so for ``ε > 0`` ``R(z) ≥ ε`` iff every margin
``m_yj(z) = ℓ_y(z) − ℓ_j(z) ≥ ε N_yj``, ``N_yj = ‖a_y − a_j‖_q`` (and ``c(z) = y`` iff every
``m_yj > 0``; ties have probability 0). Given ``y`` the margins are linear in ``z``, hence
jointly Gaussian: ``m_y ~ N(D_y μ_y + β_y − β_{−y}, D_y Σ D_yᵀ)`` with rows
``D_y = a_y − a_j`` (the float64 parameters of the certified classifier,
``head.classifier_params``). So

    CA_Q(ε) = Σ_y π_y P[ m_y ≥ ε N_y ]     (a (K−1)-dimensional Gaussian orthant probability)

* ``"closed"``: ``K = 2``, ``π_0 Φ((E m_0 − εN)/sd m_0) + π_1 Φ(...)``;
* ``"genz"``: Genz's (1992) separation of variables: with ``C = LLᵀ`` (variables reordered
  most-constrained first, Genz & Bretz 2009 §4.1.3) the orthant probability is the integral
  over the unit cube ``[0,1]^{K−2}`` of a *smooth* product of ``Φ`` terms, integrated by
  scrambled Sobol points (Owen scrambling); independent scrambles are i.i.d. unbiased
  estimates, so their spread is an honest standard error. Needs ``D_y Σ D_yᵀ`` positive
  definite (``K − 1 ≤ d`` and affinely independent means);
* ``"qmc"``: the indicator of the event at randomized-QMC points of the margin law
  (factored by an eigendecomposition, so any rank works: ``K − 1 > d`` too; ``genz`` falls
  back to it), same replicate standard error, plus a binomial confidence bound (the
  replicate spread of an indicator is 0 when no point misses);
* ``"mc"``: any head (per-class covariance types, :class:`gmfast.multiproto.MultiPrototypeHead`):
  draws from ``Q``, certified by the head's own ``certify`` (a sound radius, so this is the
  certified accuracy gmfast actually delivers), stratified by class, binomial standard
  error and exact (Clopper–Pearson) confidence bounds.

``CA_Q`` of ``tied`` is that of the exact-arithmetic radius; ``certify`` returns radii lower
by a relative rounding-sized amount (~1e-6 in float32), which moves the curve by as much in
``ε``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import special, stats

from gmfast._validate import as_radii, canonical_norm, check_choice
from gmfast.binomial import clopper_pearson_lower
from gmfast.head import GaussianMixtureHead
from gmfast.mixture import class_counts, mixture_of, sample_class

__all__ = ["CAResult", "certified_accuracy_gmm", "tv_from_kl", "certified_accuracy_lower_bound"]

METHODS = ("auto", "closed", "genz", "qmc", "mc")
_DEFAULT_POINTS = {"genz": 1 << 12, "qmc": 1 << 14, "mc": 200_000}
# Genz's method costs O(points · K²) special-function calls per class and radius, O(K³ · points
# · radii) in all; above this K, Monte Carlo through the certify kernel is the better use of
# the time (O(draws · K · d) for all radii together).
_GENZ_MAX_K = 32


@dataclass(frozen=True)
class CAResult:
    """Certified accuracy of a mixture per radius, with its Monte Carlo error.

    Attributes
    ----------
    radii : ndarray (R,)
    estimate : ndarray (R,)
        ``CA_Q(ε)`` (or, from :func:`certified_accuracy_lower_bound`, the bound).
    stderr : ndarray (R,)
        Standard error of ``estimate`` (0 where it is exact).
    method : str
        How it was computed, in words.
    details : dict
        ``kind``: ``"exact"``, ``"replicates"`` (with ``replicates``: i.i.d. randomized-QMC
        estimates, shape (r, R)) or ``"binomial"`` (with ``hits`` (K, R), ``n`` (K,),
        ``priors`` (K,)); other entries for information.
    """

    radii: np.ndarray
    estimate: np.ndarray
    stderr: np.ndarray
    method: str
    details: dict = field(default_factory=dict, compare=False)

    def lower_confidence(self, confidence: float = 0.95) -> np.ndarray:
        """One-sided lower confidence bound on the estimated quantity, per radius.

        * exact: the estimate itself;
        * randomized QMC: ``mean − t_{r−1}(confidence) · stderr`` over the ``r`` i.i.d.
          replicates (Student t; the usual RQMC interval, approximate in that it treats the
          replicate means as normal);
        * Monte Carlo: ``Σ_k π_k p_k⁻`` with ``p_k⁻`` the exact Clopper–Pearson lower bound
          of class ``k``'s hit rate at level ``1 − (1 − confidence)/K`` (Bonferroni: all
          ``K`` hold together with probability ≥ ``confidence``). Valid even where every
          draw hit (a normal interval would claim certainty there);
        * indicator QMC: the smaller of the two above (the pooled points counted as if they
          were i.i.d.). An indicator's replicate spread is 0 when no point misses the event
          although the true miss rate may be ~1/points; the binomial bound covers that case.
        """
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}")
        kind = self.details.get("kind", "exact")
        if kind not in ("exact", "replicates", "binomial"):
            raise ValueError(f"unknown kind {kind!r}")
        bounds = [self.estimate.copy()]
        if kind == "replicates":
            r = self.details["replicates"].shape[0]
            bounds.append(self.estimate - stats.t.ppf(confidence, r - 1) * self.stderr)
        if "hits" in self.details:
            hits, n, pri = self.details["hits"], self.details["n"], self.details["priors"]
            alpha = (1.0 - confidence) / hits.shape[0]
            bounds.append((pri[:, None] * clopper_pearson_lower(hits, n[:, None], alpha)).sum(0))
        return np.minimum.reduce(bounds)


# ----------------------------------------------------------------------------- CA_Q, tied


def _dual_norm(D: torch.Tensor, norm, cov: torch.Tensor) -> torch.Tensor:
    """Rows' ``‖·‖_q`` for the dual ``q`` of the threat norm; Mahalanobis ``‖Σ^{1/2}·‖₂``."""
    if norm == 2:
        return torch.linalg.vector_norm(D, dim=-1)
    if norm == math.inf:
        return D.abs().sum(-1)
    if norm == 1:
        return D.abs().amax(-1)
    return torch.sqrt(torch.einsum("...i,ij,...j->...", D, cov, D).clamp_min(0))


def _tied_margin_laws(head, norm):
    """Per class ``y``: (mean (K−1,), covariance (K−1, K−1), N (K−1,)) of the margins, float64."""
    p = head.classifier_params
    A, beta, S, mu = p.A, p.beta, head.covariance_, head.means_
    K = A.shape[0]
    laws = []
    for y in range(K):
        others = [j for j in range(K) if j != y]
        D = A[y] - A[others]
        mean = D @ mu[y] + (beta[y] - beta[others])
        C = D @ S @ D.T
        laws.append((mean, 0.5 * (C + C.T), _dual_norm(D, norm, S)))
    return laws


def _orthant_closed(mean, C, N, radii) -> np.ndarray:
    """``P[m ≥ εN]`` for a scalar ``m ~ N(mean, C)``, per radius."""
    mean, var, N = float(mean[0]), float(C[0, 0]), float(N[0])
    thr = mean - radii * N
    if var <= 0:
        return (thr > 0).astype(np.float64)
    return stats.norm.cdf(thr / math.sqrt(var))


class _NotPositiveDefinite(Exception):
    pass


def _sobol(dim: int, n: int, seed: int) -> torch.Tensor:
    """``n`` Owen-scrambled Sobol points in ``(0, 1)^dim`` (n a power of 2), float64."""
    u = stats.qmc.Sobol(dim, scramble=True, seed=seed).random_base2(int(math.log2(n)))
    return torch.from_numpy(u)


def _orthant_genz(mean, C, N, radii, n_points: int, replicates: int, seed: int) -> np.ndarray:
    """Replicate estimates (replicates, R) of ``P[m ≥ εN]``, ``m ~ N(mean, C)``, by Genz's
    separation of variables.

    With ``X = mean − m ~ N(0, C)`` and ``b = mean − εN`` the event is ``X ≤ b``. Reorder the
    variables by ``b_i/√C_ii`` ascending (most likely violated first: lower variance), factor
    ``C = LLᵀ``, ``X = LY``; the constraints become ``Y_i ≤ (b_i − Σ_{j<i} L_ij Y_j)/L_ii``
    and, writing ``Y_i = Φ⁻¹(w_i e_i)`` with ``e_i = Φ(that bound)``, the probability is
    ``∫_{[0,1]^{k−1}} Π_i e_i(w_1..w_{i−1}) dw`` (Genz 1992): a smooth integrand.
    """
    # numpy/scipy here: torch's float64 ndtr (erfc) is ~100x slower on CPU than scipy's
    mean, C, N = mean.numpy(), C.numpy(), N.numpy()
    k = mean.shape[0]
    b = mean[None, :] - radii[:, None] * N[None, :]  # (R, k)
    sd = np.sqrt(np.diagonal(C))
    if not np.all(sd > 0):  # a constant margin: C is singular
        raise _NotPositiveDefinite
    perm = np.argsort(b / sd, axis=1, kind="stable")
    Cp = C[perm[:, :, None], perm[:, None, :]]
    try:
        L = np.linalg.cholesky(Cp)
    except np.linalg.LinAlgError:
        raise _NotPositiveDefinite from None
    if np.any(np.diagonal(L, axis1=1, axis2=2) <= 1e-12 * sd.max()):
        raise _NotPositiveDefinite
    bp = np.take_along_axis(b, perm, axis=1)
    tiny, top = 1e-300, 1.0 - 2.0**-53
    out = np.empty((replicates, len(radii)))
    for r in range(replicates):
        e = np.broadcast_to(special.ndtr(bp[:, :1] / L[:, :1, 0]), (len(radii), n_points))  # (R, n)
        f = e.copy()
        if k > 1:
            w = _sobol(k - 1, n_points, seed + r).numpy()
            Y = np.empty((len(radii), n_points, k - 1))
            for i in range(1, k):
                Y[:, :, i - 1] = special.ndtri(np.clip(w[:, i - 1] * e, tiny, top))
                s = np.einsum("rnj,rj->rn", Y[:, :, :i], L[:, i, :i])
                e = special.ndtr((bp[:, i, None] - s) / L[:, i, i, None])
                f *= e
        out[r] = f.mean(1)
    return out


def _orthant_qmc(mean, C, N, radii, n_points: int, replicates: int, seed: int) -> np.ndarray:
    """Replicate estimates (replicates, R) of ``P[m > 0, m ≥ εN]`` by the indicator at
    randomized-QMC draws ``m = mean + F g``, ``C = FFᵀ`` (eigendecomposition: any rank)."""
    # numpy: single-threaded elementwise work; torch's thread pool costs more than it saves
    # on these small blocks, much more on a busy machine
    mean, C, N = mean.numpy(), C.numpy(), N.numpy()
    lam, V = np.linalg.eigh(C)
    keep = lam > 1e-13 * max(lam.max(), 0.0)
    Ft = np.ascontiguousarray((V[:, keep] * np.sqrt(lam[keep])).T)  # (rank, k)
    rank = Ft.shape[0]
    chunk = max(256, (1 << 22) // max(1, mean.shape[0]))
    out = np.empty((replicates, len(radii)))
    for r in range(replicates):
        g = special.ndtri(_sobol(max(1, rank), n_points, seed + r).numpy()[:, :rank])
        ratio = np.empty(n_points)
        for i in range(0, n_points, chunk):
            m = mean + g[i:i + chunk] @ Ft
            # the exact radius where every margin is positive (else -1); N = 0 only for a
            # constant margin, which then never binds
            q = np.divide(m, N, out=np.full_like(m, np.inf), where=N > 0).min(1)
            ratio[i:i + chunk] = np.where((m > 0).all(1), q, -1.0)
        ratio.sort()
        out[r] = (n_points - np.searchsorted(ratio, radii, side="left")) / n_points  # #{ratio ≥ ε}
    return out


def _tied_ca(head, radii, norm, method, n_total, replicates, seed) -> CAResult:
    """``CA_Q`` of a tied head from the margin laws; ``n_total`` points per class in all."""
    pri = head.priors_.numpy()
    laws = _tied_margin_laws(head, norm)
    if method == "closed":
        est = sum(pri[y] * _orthant_closed(*law, radii) for y, law in enumerate(laws))
        return CAResult(radii, est, np.zeros_like(est), "closed form (K = 2)", dict(kind="exact"))
    n_points = 1 << max(1, math.ceil(math.log2(max(2, n_total // replicates))))
    reps = np.zeros((replicates, len(radii)))
    hits = []  # per class, pooled hit counts of the indicator estimator
    note = ""
    if method == "genz":
        try:
            for y, (mean, C, N) in enumerate(laws):
                reps += pri[y] * _orthant_genz(mean, C, N, radii, n_points, replicates, seed + 7919 * y)
        except _NotPositiveDefinite:
            # a class's margins are (numerically) linearly dependent: no Cholesky factor
            method, note, reps = "qmc", "; Genz impossible: singular margin covariance", reps * 0
    if method == "qmc":
        for y, (mean, C, N) in enumerate(laws):
            est_y = _orthant_qmc(mean, C, N, radii, n_points, replicates, seed + 7919 * y)
            reps += pri[y] * est_y
            hits.append(np.rint(est_y * n_points).sum(0))
    name = ("Genz separation of variables, randomized QMC" if method == "genz" else "indicator randomized QMC")
    name += f" ({replicates} scrambles x {n_points} Sobol points per class{note})"
    est = reps.mean(0)
    se = reps.std(0, ddof=1) / math.sqrt(replicates)
    details = dict(kind="replicates", replicates=reps)
    if hits:
        details.update(hits=np.array(hits), n=np.full(len(hits), float(replicates * n_points)), priors=pri)
    return CAResult(radii, est, se, name, details)


# ----------------------------------------------------------------------------- CA_Q, Monte Carlo


def _monte_carlo(head, radii, norm, n_samples: int, seed: int, backend) -> CAResult:
    mix = mixture_of(head)
    K = mix.priors.shape[0]
    d = mix.comp_means.shape[1]
    counts = class_counts(mix.priors, n_samples, minimum=2)
    hits = np.zeros((K, len(radii)))
    rad_t = torch.from_numpy(radii)
    kw = {} if backend is None else dict(backend=backend)
    chunk = max(1024, (1 << 22) // d)  # bounded memory for any n_samples
    g = torch.Generator().manual_seed(seed)
    for k in range(K):
        factor = mix.noise_factor(k)
        left = int(counts[k])
        while left:
            m = min(chunk, left)
            cert = head.certify(sample_class(mix, k, m, g, factor), norm=norm, **kw)
            ok = (cert.prediction == k)[:, None] & (cert.radius.double()[:, None] >= rad_t[None])
            hits[k] += ok.sum(0).numpy()
            left -= m
    n = counts.numpy().astype(np.float64)
    pri = mix.priors.numpy()
    p = hits / n[:, None]
    est = (pri[:, None] * p).sum(0)
    se = np.sqrt((pri[:, None] ** 2 * p * (1 - p) / n[:, None]).sum(0))
    return CAResult(radii, est, se, f"Monte Carlo ({int(n.sum())} draws from Q, stratified, certified by the head)",
                    dict(kind="binomial", hits=hits, n=n, priors=pri))


def certified_accuracy_gmm(head, radii, *, method: str = "auto", n_samples: int | None = None,
                           replicates: int = 16, seed: int = 0, norm=2, backend=None) -> CAResult:
    """``CA_Q(ε) = P_Q[c(z) = y and R(z) ≥ ε]``: certified accuracy of the fitted mixture.

    Parameters
    ----------
    head : GaussianMixtureHead or MultiPrototypeHead, fitted
        ``Q`` is its own generative model (``y ~ π``, ``z | y`` Gaussian or, for the
        multi-prototype head, a Gaussian mixture with shared covariance).
    radii : sequence of float (R,), ≥ 0
    method : {"auto", "closed", "genz", "qmc", "mc"}
        See the module docstring. ``auto``: ``closed`` for tied ``K = 2``, ``genz`` for tied
        ``K ≤ 32`` with ``K − 1 ≤ d``, ``mc`` otherwise.
    n_samples : int, optional
        ``genz``/``qmc``: points per class over all replicates (default 2¹² / 2¹⁴, rounded
        to ``replicates`` × a power of 2); ``mc``: draws in all (default 200,000).
    replicates : int
        Independent scrambles for the randomized-QMC standard error (≥ 2).
    seed : int
    norm : 2 | 1 | inf | "mahalanobis"
        Threat model (per-class covariance types and multi-prototype ``mc``: as ``certify``).
    backend : str, optional
        Kernel backend for ``mc`` (``GaussianMixtureHead`` only).

    Returns
    -------
    CAResult
        ``estimate`` and ``stderr`` (R,) (``stderr`` is 0 for the closed form), ``method``;
        :meth:`CAResult.lower_confidence` gives a one-sided confidence bound.
    """
    radii = as_radii(radii)
    norm = canonical_norm(norm)
    check_choice("method", method, METHODS)
    tied = isinstance(head, GaussianMixtureHead) and head.covariance_type == "tied"
    K, d = head.n_classes_, head.n_features_in_
    if method == "auto":
        method = "closed" if tied and K == 2 else "genz" if tied and K <= _GENZ_MAX_K and K - 1 <= d else "mc"
    if method != "mc" and not tied:
        raise ValueError(
            f"method={method!r} needs a GaussianMixtureHead with covariance_type='tied' (Gaussian margins); "
            "use method='mc'"
        )
    if method == "closed" and K != 2:
        raise ValueError(f"method='closed' is for K = 2 classes; this head has {K} (use 'genz', 'qmc' or 'mc')")
    if method in ("genz", "qmc") and replicates < 2:
        raise ValueError(f"replicates must be >= 2 for a standard error; got {replicates}")
    n = _DEFAULT_POINTS.get(method, 0) if n_samples is None else int(n_samples)
    if method != "closed" and n < 2:
        raise ValueError(f"n_samples must be >= 2; got {n_samples}")
    if method == "mc":
        return _monte_carlo(head, radii, norm, n, seed, backend)
    return _tied_ca(head, radii, norm, method, n, replicates, seed)


# ----------------------------------------------------------------------------- the KL bound


def tv_from_kl(kl):
    """Upper bound on total variation from a KL divergence, vectorised.

    ``TV(P, Q) ≤ min(√(KL/2), √(1 − e^{−KL}))`` with ``KL = KL(P‖Q)`` (or ``KL(Q‖P)``):
    Pinsker's inequality and the Bretagnolle–Huber (1979) inequality; Pinsker is the tighter
    for small KL, Bretagnolle–Huber for large (it stays below 1). ``KL = inf`` gives 1.

    Parameters
    ----------
    kl : float or array_like, ≥ 0

    Returns
    -------
    float64 scalar or ndarray of the same shape
    """
    kl = np.asarray(kl, dtype=np.float64)
    if np.any(np.isnan(kl)) or np.any(kl < 0):
        raise ValueError(f"KL must be >= 0; got {kl!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        # -expm1(-KL) = 1 − e^{−KL} without cancellation for small KL
        out = np.minimum(np.sqrt(kl / 2.0), np.sqrt(-np.expm1(-kl)))
    out = np.where(np.isinf(kl), 1.0, out)
    return out[()] if out.ndim == 0 else out


def certified_accuracy_lower_bound(head, radii, kl, *, confidence: float | None = 0.95, ca_q: CAResult | None = None,
                                   **kwargs) -> CAResult:
    """Lower bound on the certified accuracy under the true law: ``CA_P(ε) ≥ CA_Q(ε) − TV``.

    Parameters
    ----------
    head, radii : as :func:`certified_accuracy_gmm`
    kl : float ≥ 0
        An upper bound on ``KL(P‖Q)`` between the joint laws of (latent, label) under the
        data and under the fitted mixture. A larger value only loosens the bound.
    confidence : float in (0, 1) or None
        ``CA_Q`` is estimated (except in closed form); its one-sided lower confidence bound
        at this level (:meth:`CAResult.lower_confidence`) is used instead of the estimate,
        so the result is conservative. ``None``: the point estimate (not a bound).
    ca_q : CAResult, optional
        A ``CA_Q`` already computed at the same radii (saves recomputing it).
    **kwargs : passed to :func:`certified_accuracy_gmm`.

    Returns
    -------
    CAResult whose ``estimate`` (R,) is ``max(0, CA_Q⁻(ε) − TV bound(kl))``; ``details`` hold
    ``ca_q``, ``tv``, ``kl``, ``confidence``.

    Guarantee: if ``KL(P‖Q) ≤ kl`` then, with probability at least ``confidence`` over the
    randomness of the ``CA_Q`` estimator (1 for the closed form), ``CA_P(ε) ≥`` the result,
    at each radius.
    """
    radii = as_radii(radii)
    tv = float(tv_from_kl(float(kl)))
    ca = certified_accuracy_gmm(head, radii, **kwargs) if ca_q is None else ca_q
    if not np.array_equal(ca.radii, radii):
        raise ValueError("ca_q was computed at other radii")
    base = ca.estimate if confidence is None else ca.lower_confidence(confidence)
    lb = np.clip(base - tv, 0.0, 1.0)
    level = "point estimate" if confidence is None else f"{confidence:g}-lower confidence bound"
    return CAResult(radii, lb, np.zeros_like(lb), f"CA_Q ({level}) - TV bound (KL <= {float(kl):.4g})",
                    dict(kind="exact", ca_q=ca, tv=tv, kl=float(kl), confidence=confidence))
