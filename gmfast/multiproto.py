"""Multi-prototype heads: several Gaussians per class with one shared covariance.

Beyond the paper. A class whose latents form several clusters is badly served by one
Gaussian: its mean can sit between the clusters, near other classes. The
:class:`MultiPrototypeHead` models class ``k`` as a mixture of ``M`` Gaussians
``N(μ_{k,m}, Σ)`` with weights ``w_{k,m}`` and **one covariance ``Σ`` shared by all classes
and components**, so every component is a linear score

    ℓ_{k,m}(z) = a_{k,m}ᵀ z + β_{k,m},   a_{k,m} = Σ⁻¹ μ_{k,m},
    β_{k,m} = log π_k + log w_{k,m} − ½ μ_{k,m}ᵀ Σ⁻¹ μ_{k,m},

(the log-joint of the component, less the term ``−½ zᵀΣ⁻¹z + const`` common to all) and it
classifies by the best component:

    c(z) = argmax_k max_m ℓ_{k,m}(z)       (lowest class index on ties).

This is the max-approximation of the mixture's Bayes rule (``argmax_k log Σ_m e^{ℓ_{k,m}}``);
it keeps the decision regions unions of polyhedra, which is what makes the certificate
closed-form.

Certificate
-----------
For a component ``m`` of class ``c``, the set
``P_m = {x : ℓ_{c,m}(x) > ℓ_{j,m'}(x) for every component (j, m') with j ≠ c}`` is an open
polyhedron, and on it ``max_{m''} ℓ_{c,m''} ≥ ℓ_{c,m} > max_{j≠c, m'} ℓ_{j,m'}``: the class is
``c``. So ``P_m`` lies in the decision region of ``c``, and the distance from ``z`` to the
complement of ``P_m`` is, exactly as for the tied head (Hölder, min over facets),
``r_m(z) = min_{(j,m'): j≠c} (ℓ_{c,m} − ℓ_{j,m'})(z) / ‖a_{c,m} − a_{j,m'}‖_q`` (0 when
``z ∉ P_m``). Any ball around ``z`` inside one ``P_m`` is inside the region, so

    R(z) = max_{m ∈ class c} r_m(z)

is a sound radius. The min runs over the components of the **other** classes only (a
component of ``c`` overtaking another component of ``c`` changes nothing). It is a lower
bound, not the exact distance: the region is the *union* of the ``P_m``, and a ball may
straddle two of them. With ``M = 1`` it is the tied head's exact radius. Threat norms: 2, 1,
inf and Mahalanobis (``Σ`` the shared covariance), as the tied head.

Floating point: the same argument as :func:`gmfast.ops._reference.tied_certify`. The logits of
all ``C = Σ_k M_k`` components are computed in the working precision ``T`` as one GEMM; each is
within ``e_i = α_i‖z‖ + ε_i`` of its exact value
(:func:`gmfast.params.tied_error_coefficients`), each margin is lowered by
``(e_i + e_j)(1 + 8u₆₄) + 2u₆₄|m̂|`` and multiplied by a lower bound on ``1/‖a_i − a_j‖_q``
(:func:`gmfast.params.tied_denominators`, computed from the float64 component
parameters), and the result deflated for its float64 evaluation. Which component is taken as
the winner does not matter for soundness: every ``r_m`` is a valid radius on its own.

Fitting (EM)
------------
Labels are known, so the model is fitted by maximising the (penalised) joint likelihood

    J = (1/n) Σ_i log( π_{y_i} Σ_m w_{y_i,m} N(z_i; μ_{y_i,m}, Σ) ) − pen(Σ),
    pen(Σ) = ½ · λ/(1−λ) · (log det Σ + τ tr Σ⁻¹),

by EM, where ``λ`` is the shrinkage and ``τ = tr(S_w)/d`` with ``S_w`` the pooled
within-class covariance (the one-Gaussian-per-class fit; ``λ`` from Ledoit–Wolf on it when
``shrinkage="ledoit-wolf"``). ``pen`` is (up to constants) the log-density of an
inverse-Wishart prior on ``Σ`` centred on ``τI``; it makes the covariance M-step exactly
``Σ = (1−λ) S + λ τ I`` with ``S`` the pooled within-*component* scatter, the head's
shrinkage formula, so the iteration is a true (MAP-)EM and ``J`` never decreases.

* Initialisation: per class, k-means++ seeding and Lloyd iterations in coordinates whitened
  by the ``M = 1`` covariance; hard assignments give the first M-step.
* E-step: responsibilities ``r_{i,m} ∝ w_{y_i,m} N(z_i; μ_{y_i,m}, Σ)`` over the components of
  ``z_i``'s own class, in log space (log-sum-exp).
* M-step: ``w_{k,m} = N_{k,m}/n_k``, ``μ_{k,m} = Σ_i r_{i,m} z_i / N_{k,m}``, ``S = (1/n) Σ_k
  Σ_m Σ_i r_{i,m}(z_i − μ_{k,m})(z_i − μ_{k,m})ᵀ`` (centred, never ``Σzzᵀ − nμμᵀ``),
  ``Σ = (1−λ)S + λτI``; ``λ = 1`` keeps ``Σ = τI``. A component whose mass drops below
  ``1e-9·n_k`` is removed.
* Convergence: stop when ``|J_t − J_{t−1}| ≤ tol`` (nats per sample), or after ``max_iter``
  M-steps (then ``converged_`` is False and a :class:`ConvergenceWarning` is issued). The
  returned parameters are the last ones whose ``J`` was evaluated. ``n_init`` restarts
  with different seeds; the best ``J`` is kept.
* ``M = 1`` (or a class with one sample) needs no iteration: the fit is the tied
  :class:`~gmfast.GaussianMixtureHead`'s, bit for bit.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from gmfast import params
from gmfast._fp import round_down_to
from gmfast._validate import (
    ON_NONFINITE,
    as_float_matrix,
    as_labels,
    canonical_norm,
    check_choice,
    check_finite_fit,
    report_abstentions,
)
from gmfast.certificate import Certificate, certified_accuracy
from gmfast.head import GaussianMixtureHead, StatisticalHead
from gmfast.ops.certify import multiproto_certify, multiproto_epilogue

__all__ = ["MultiPrototypeHead", "ConvergenceWarning", "multiproto_certify", "multiproto_epilogue",
           "compare_prototypes", "format_prototype_table"]

LOG_2PI = math.log(2.0 * math.pi)
_PRUNE = 1e-9


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the objective settled."""


# ----------------------------------------------------------------------------- EM


def _kmeans(X: torch.Tensor, M: int, gen: torch.Generator, n_iter: int = 50) -> torch.Tensor:
    """Labels (n,) of k-means with k-means++ seeding (Arthur & Vassilvitskii 2007); fewer
    than ``M`` clusters when there are fewer distinct points."""
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [X[first]]
    d2 = (X - X[first]).square().sum(1)
    while len(centers) < min(M, n):
        tot = float(d2.sum())
        if tot <= 0:
            break
        j = int(torch.multinomial(d2 / tot, 1, generator=gen))
        centers.append(X[j])
        d2 = torch.minimum(d2, (X - X[j]).square().sum(1))
    Cm = torch.stack(centers)
    labels = None
    for _ in range(n_iter):
        D = torch.cdist(X, Cm, compute_mode="donot_use_mm_for_euclid_dist")
        new = D.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for c in range(Cm.shape[0]):
            sel = labels == c
            if bool(sel.any()):
                Cm[c] = X[sel].mean(0)
            else:  # an empty cluster restarts at the point worst served
                Cm[c] = X[D.amin(1).argmax()]
    return labels


class _Fit:
    """EM state: per class, means (M_k, d) and weights (M_k,); the shared covariance."""

    def __init__(self, means, weights, cov):
        self.means, self.weights, self.cov = means, weights, cov


def _m_step(classes, resp, lam: float, tau: float) -> _Fit:
    n = sum(X.shape[0] for X in classes)
    d = classes[0].shape[1]
    means, weights = [], []
    S = torch.zeros(d, d, dtype=torch.float64)
    for X, R in zip(classes, resp):
        N = R.sum(0)
        keep = N > _PRUNE * X.shape[0]
        R, N = R[:, keep], N[keep]
        mu = (R.T @ X) / N[:, None]
        for m in range(mu.shape[0]):
            W = (X - mu[m]) * R[:, m:m + 1].sqrt()
            S += W.T @ W
        means.append(mu)
        weights.append(N / X.shape[0])
    S = S / n
    cov = (1.0 - lam) * S + lam * tau * torch.eye(d, dtype=torch.float64)
    return _Fit(means, weights, 0.5 * (cov + cov.T))


def _e_step(classes, fit: _Fit, log_priors, lam: float, tau: float):
    """Responsibilities (list of (n_k, M_k)) and the objective ``J`` (float) at ``fit``."""
    d = classes[0].shape[1]
    n = sum(X.shape[0] for X in classes)
    L = torch.linalg.cholesky(fit.cov)
    logdet = 2.0 * float(torch.log(torch.diagonal(L)).sum())
    const = -0.5 * (logdet + d * LOG_2PI)
    total = 0.0
    resp = []
    for k, X in enumerate(classes):
        Xw = torch.linalg.solve_triangular(L, X.T, upper=False).T
        Mw = torch.linalg.solve_triangular(L, fit.means[k].T, upper=False).T
        D2 = torch.cdist(Xw, Mw, compute_mode="donot_use_mm_for_euclid_dist").square()
        lc = torch.log(fit.weights[k])[None, :] - 0.5 * D2 + const
        lse = torch.logsumexp(lc, 1)
        resp.append(torch.exp(lc - lse[:, None]))
        total += float(lse.sum()) + X.shape[0] * float(log_priors[k])
    J = total / n
    if 0.0 < lam < 1.0:
        tr_inv = float(torch.cholesky_inverse(L).trace())
        J -= 0.5 * lam / (1.0 - lam) * (logdet + tau * tr_inv)
    return resp, J


# ----------------------------------------------------------------------------- the head


class MultiPrototypeHead(StatisticalHead):
    """Several Gaussians per class, one shared covariance; certified like the tied head.

    See the module docstring for the model, the EM, and the certificate.

    Parameters
    ----------
    n_components : int ≥ 1
        Components per class ``M`` (fewer for a class with fewer distinct samples).
    shrinkage : float in [0, 1] or "ledoit-wolf"
        ``Σ = (1−λ)S + λ τ I`` as :class:`~gmfast.GaussianMixtureHead`; ``"ledoit-wolf"``
        takes ``λ`` from the one-Gaussian-per-class fit.
    priors : {"empirical", "uniform"}
    max_iter : int, EM iterations at most
    tol : float, convergence threshold on the change of the per-sample objective (nats)
    n_init : int, EM restarts (best objective kept)
    seed : int, seed of the k-means++ initialisation

    Attributes (after ``fit``)
    --------------------------
    component_means_ : (C, d) float64, components of class 0 first, then class 1, ...
    component_weights_ : (C,) float64, ``w_{k,m}`` (sum to 1 within each class)
    component_class_ : (C,) int64
    covariance_ : (d, d) float64, shared
    priors_ : (K,) float64
    n_components_ : (K,) int64, components kept per class
    classifier_params : TiedParams over the C components (float64; the certified classifier)
    shrinkage_ : float;  n_iter_ : int;  converged_ : bool
    objective_ : float, ``J`` at the returned parameters;  objective_history_ : list of float
    n_features_in_ : int;  n_classes_ : int
    """

    def __init__(self, n_components: int = 2, shrinkage=0.0, priors: str = "empirical", *, max_iter: int = 200,
                 tol: float = 1e-6, n_init: int = 1, seed: int = 0):
        super().__init__()
        if not (isinstance(n_components, int) and n_components >= 1):
            raise ValueError(f"n_components must be an int >= 1; got {n_components!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be an int >= 1; got {max_iter!r}")
        if not (isinstance(n_init, int) and n_init >= 1):
            raise ValueError(f"n_init must be an int >= 1; got {n_init!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0; got {tol!r}")
        self.n_components = n_components
        self.shrinkage = shrinkage
        self.priors = priors
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.seed = seed
        self.train(False)

    # ------------------------------------------------------------------ fitting

    def fit(self, Z, y) -> "MultiPrototypeHead":
        """Fit on latents ``Z`` (n, d) and labels ``y`` (n,) in ``0..K-1`` by EM; returns self."""
        Z = as_float_matrix(Z, "Z")
        y = as_labels(y, Z.shape[0])
        check_finite_fit(Z)
        X = Z.detach().to("cpu", torch.float64)
        # the one-Gaussian-per-class fit: validation, class means, S_w, λ (incl. Ledoit–Wolf)
        base = GaussianMixtureHead("tied", shrinkage=self.shrinkage, priors=self.priors).fit(X, y)
        K, d = base.means_.shape
        lam = float(base.shrinkage_)
        tau = float(torch.diagonal(base.covariance_).sum()) / d  # tr Σ_λ = tr S_w
        classes = [X[y == k] for k in range(K)]
        history = []
        if self.n_components == 1:
            fit = _Fit([base.means_[k:k + 1] for k in range(K)], [torch.ones(1, dtype=torch.float64)] * K,
                       base.covariance_)
            history.append(_e_step(classes, fit, torch.log(base.priors_), lam, tau)[1])
            n_iter, converged = 0, True
        else:
            best = None
            for r in range(self.n_init):
                out = self._em(classes, base, lam, tau, torch.Generator().manual_seed(self.seed + 1009 * r))
                if best is None or out[1][-1] > best[1][-1]:
                    best = out
            fit, history, n_iter, converged = best
            if not converged:
                last = f"last change {abs(history[-1] - history[-2]):.3g}" if len(history) > 1 else "one step"
                warnings.warn(f"EM did not converge in max_iter={self.max_iter} iterations ({last}, "
                              f"tol={self.tol}); increase max_iter", ConvergenceWarning, stacklevel=2)
        self._set(fit, base.priors_, lam, history, n_iter, converged)
        return self

    def _em(self, classes, base, lam, tau, gen):
        Lw = torch.linalg.cholesky(base.covariance_)
        resp = []
        for X in classes:
            lab = _kmeans(torch.linalg.solve_triangular(Lw, X.T, upper=False).T, self.n_components, gen)
            resp.append(torch.nn.functional.one_hot(lab, int(lab.max()) + 1).double())
        log_pri = torch.log(base.priors_)
        fit = _m_step(classes, resp, lam, tau)
        history = []
        n_iter, converged = 1, False
        while True:
            resp, J = _e_step(classes, fit, log_pri, lam, tau)
            history.append(J)
            if len(history) > 1 and abs(history[-1] - history[-2]) <= self.tol:
                converged = True
                break
            if n_iter >= self.max_iter:
                break
            fit = _m_step(classes, resp, lam, tau)
            n_iter += 1
        return fit, history, n_iter, converged

    def _set(self, fit: _Fit, priors, lam, history, n_iter, converged) -> None:
        K = len(fit.means)
        counts = torch.tensor([m.shape[0] for m in fit.means])
        comp_class = torch.repeat_interleave(torch.arange(K), counts)
        weights = torch.cat(fit.weights)
        flat_priors = priors[comp_class] * weights
        flat_priors = flat_priors / flat_priors.sum()
        # the K·M components as the "classes" of a tied head: its validated float64 derived
        # parameters (A, β, denominators) define the certified classifier
        comp_head = GaussianMixtureHead.from_params(torch.cat(fit.means), fit.cov, flat_priors, "tied")
        M = int(counts.max())
        table = torch.full((K, M), -1, dtype=torch.int64)
        start = torch.cumsum(counts, 0) - counts
        for k in range(K):
            table[k, :counts[k]] = torch.arange(int(start[k]), int(start[k] + counts[k]))
        self._set_state(dict(comp_head=comp_head, classifier=comp_head.classifier_params,
                             n_features=comp_head.n_features_in_, comp_class=comp_class, weights=weights,
                             priors=priors.clone(), counts=counts, table=table, shrinkage=lam,
                             history=list(history), n_iter=n_iter, converged=converged))

    # ------------------------------------------------------------------ attributes

    @property
    def component_means_(self) -> torch.Tensor:
        return self._fitted()["comp_head"].means_

    @property
    def component_weights_(self) -> torch.Tensor:
        return self._fitted()["weights"]

    @property
    def component_class_(self) -> torch.Tensor:
        return self._fitted()["comp_class"]

    @property
    def covariance_(self) -> torch.Tensor:
        return self._fitted()["comp_head"].covariance_

    @property
    def n_components_(self) -> torch.Tensor:
        return self._fitted()["counts"]

    @property
    def component_head_(self):
        """The tied :class:`~gmfast.GaussianMixtureHead` whose classes are the components."""
        return self._fitted()["comp_head"]

    @property
    def n_iter_(self) -> int:
        return self._fitted()["n_iter"]

    @property
    def converged_(self) -> bool:
        return self._fitted()["converged"]

    @property
    def objective_(self) -> float:
        return self._fitted()["history"][-1]

    @property
    def objective_history_(self) -> list:
        return list(self._fitted()["history"])

    def extra_repr(self) -> str:
        s = f"n_components={self.n_components}, shrinkage={self.shrinkage!r}, priors={self.priors!r}"
        if self._state is not None:
            s += f", n_features={self.n_features_in_}, n_classes={self.n_classes_}, " \
                 f"components={int(self.n_components_.sum())}"
        return s

    # ------------------------------------------------------------------ evaluation

    def _working_copy(self, device, dtype):
        st = self._state
        return st["classifier"].to(device, dtype), st["comp_class"].to(device), st["table"].to(device)

    def component_log_joint(self, Z) -> torch.Tensor:
        """``log π_k + log w_{k,m} + log N(z; μ_{k,m}, Σ)`` per component, (B, C), differentiable."""
        return self._fitted()["comp_head"](Z)

    def forward(self, Z) -> torch.Tensor:
        """Class log-joint of the mixture, ``log π_k + log Σ_m w_{k,m} N(z; μ_{k,m}, Σ)``, (B, K).

        A log-sum-exp over each class's components: the model's density (what
        :func:`gmfast.diagnostics.heldout_log_likelihood` scores), differentiable in ``Z``.
        **Not** the decision rule: :meth:`predict` and :meth:`certify` use the best component
        (max instead of log-sum-exp), so ``argmax`` of this can differ near boundaries.
        """
        lj = self.component_log_joint(Z)
        table = self._fitted()["table"].to(lj.device)
        g = lj[:, table.clamp_min(0)]  # (B, K, M)
        g = g.masked_fill(table[None] < 0, -math.inf)
        return torch.logsumexp(g, dim=2)

    def predict(self, Z) -> torch.Tensor:
        """Class of the best component (B,) int64; -1 for rows with NaN/Inf (with a warning)."""
        Zt, (p, comp_class, _), _ = self._prepare(Z)
        logits = params.tied_linear_logits(Zt, p)
        finite = torch.isfinite(logits).all(1)
        pred = torch.where(finite, comp_class[logits.argmax(1)], torch.full_like(finite, -1, dtype=torch.int64))
        bad = (~finite).nonzero().reshape(-1)
        if bad.numel():
            report_abstentions(Zt, bad, "abstain")
        return pred

    def certify(self, Z, norm=2, *, fp_sound: bool = True, on_nonfinite: str = "abstain") -> Certificate:
        """Predictions and sound certified radii for latents ``Z`` (B, d).

        Parameters
        ----------
        norm : 2 | 1 | float("inf") | "mahalanobis"
        fp_sound : bool
            Lower every radius by a rigorous bound on its rounding error (default).
        on_nonfinite : {"abstain", "raise"}

        Returns
        -------
        Certificate with ``prediction`` (B,) int64, ``radius`` (B,) (float64 for float64
        ``Z``, else float32, rounded down) and ``extra["component"]`` (B,) the component
        whose polyhedron gives the radius.
        """
        check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        norm = canonical_norm(norm)
        Zt, (p, comp_class, table), in_dtype = self._prepare(Z)
        pred, radius, comp = multiproto_certify(Zt, p, comp_class, table, norm, fp_sound=fp_sound)
        bad = (pred < 0).nonzero().reshape(-1)
        if bad.numel():
            report_abstentions(Zt, bad, on_nonfinite)
        out = torch.float64 if in_dtype == torch.float64 else torch.float32
        return Certificate(prediction=pred, radius=round_down_to(radius, out), norm=norm,
                           extra={"component": comp})


# ----------------------------------------------------------------------------- does it pay?


def compare_prototypes(Z_train, y_train, Z_test, y_test, Ms=(1, 2, 4), radii=(0.0, 0.25, 0.5, 1.0), *,
                       shrinkage="ledoit-wolf", norm=2, seed: int = 0, max_iter: int = 200) -> list:
    """Fit a :class:`MultiPrototypeHead` for each ``M`` and score it on held-out latents.

    Returns
    -------
    list of dict, one per ``M``: ``M``, ``components`` (kept in all), ``loglik`` (held-out
    joint log-likelihood, nats/sample: the fit of the model), ``clean_accuracy``, ``radii``
    and ``accuracy`` (certified accuracy at each radius, (R,); at radius 0 it is the clean
    accuracy),
    ``median_radius`` (over correctly classified test points), ``converged``, ``n_iter``,
    ``fit_s``. ``M = 1`` is the tied :class:`~gmfast.GaussianMixtureHead`.
    Print it with :func:`format_prototype_table`.
    """
    from gmfast.diagnostics import heldout_log_likelihood  # (scipy: imported only when comparing)

    y_test = torch.as_tensor(y_test).long()
    radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    rows = []
    for M in Ms:
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            head = MultiPrototypeHead(M, shrinkage=shrinkage, seed=seed, max_iter=max_iter).fit(Z_train, y_train)
        fit_s = time.perf_counter() - t
        for w in caught:  # reported in the row; re-issue anything else
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        cert = head.certify(Z_test, norm=norm)
        ok = cert.prediction.cpu() == y_test
        rows.append(dict(
            M=M, components=int(head.n_components_.sum()), loglik=heldout_log_likelihood(head, Z_test, y_test),
            clean_accuracy=float(ok.double().mean()), radii=radii, accuracy=certified_accuracy(cert, y_test, radii),
            median_radius=float(cert.radius.cpu()[ok].double().median()) if bool(ok.any()) else 0.0,
            converged=head.converged_, n_iter=head.n_iter_, fit_s=fit_s,
        ))
    return rows


def format_prototype_table(rows: list) -> str:
    """Plain-text table of :func:`compare_prototypes` (percentages)."""
    radii = rows[0]["radii"] if rows else []
    hdr = (f"{'M':>3} {'comps':>5} {'held-out LL':>11} {'clean':>6} "
           + " ".join(f"{'r=' + format(r, 'g'):>7}" for r in radii) + f" {'med. R':>7} {'EM it.':>6} {'fit s':>6}")
    lines = ["multi-prototype heads (one shared covariance; M = 1 is the tied head): held-out joint "
             "log-likelihood (nats/sample), clean and certified accuracy (%)", hdr, "-" * len(hdr)]
    for r in rows:
        it = f"{r['n_iter']}" + ("" if r["converged"] else "*")
        lines.append(f"{r['M']:>3} {r['components']:>5} {r['loglik']:>11.3f} {100 * r['clean_accuracy']:>6.1f} "
                     + " ".join(f"{100 * a:>7.1f}" for a in r["accuracy"])
                     + f" {r['median_radius']:>7.3g} {it:>6} {r['fit_s']:>6.2f}")
    if any(not r["converged"] for r in rows):
        lines.append("* EM stopped at max_iter before converging")
    return "\n".join(lines)
