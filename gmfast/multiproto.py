"""Several Gaussians per class (shared covariance), classified by the best component.

A single Gaussian per class can be a poor fit for a class with several modes; the KL term of
the distributional guarantee (:mod:`gmfast.bounds`) then eats the certificate. A
:class:`MultiPrototypeHead` models class ``k`` as ``Σ_m w_km N(μ_km, Σ)``, one covariance
``Σ`` shared by every component of every class, fitted by EM, and classifies by the best
component:

    ℓ_km(z) = a_kmᵀz + β_km,  a_km = Σ⁻¹μ_km,  β_km = log π_k + log w_km − ½ μ_kmᵀΣ⁻¹μ_km,
    c(z) = argmax_k max_m ℓ_km(z).

Certificate (sound, not exact): with ``m*`` the winning component of the predicted class
``c``, the polyhedron ``{ℓ_{c,m*} ≥ ℓ_{j,m'} for every j ≠ c and every m'}`` contains ``z``
and lies inside the decision region of ``c`` (there ``max_m ℓ_cm ≥ ℓ_{c,m*}`` beats every
other class). The distance to its complement is exactly

    R = min over j ≠ c, m' of (ℓ_{c,m*} − ℓ_{j,m'}) / ‖a_{c,m*} − a_{j,m'}‖_q,

a lower bound on the distance to the decision boundary (other components of ``c`` may
extend the region further). Components of ``c`` itself are left out of the min. Rounding is
handled exactly as for the tied head (the components *are* a tied head; see
:func:`gmfast._reference.tied_certify`): margins lowered by their error bound, reciprocal
denominators rounded down, radii rounded down.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gmfast import _reference as ref
from gmfast._fp import U64, norm_upper, round_down_to, slack_down, slack_up
from gmfast._validate import as_float_matrix, as_labels, canonical_norm, check_finite_fit
from gmfast.certificate import Certificate
from gmfast.head import GaussianMixtureHead

__all__ = ["MultiPrototypeHead", "compare_prototypes"]


class MultiPrototypeHead:
    """``n_components`` Gaussians per class with one shared covariance, fitted by EM.

    EM (per iteration, all classes at once): E-step, for each sample of class ``k`` the
    responsibilities of the ``M`` components of class ``k`` only (labels are known);
    M-step, the component weights ``w_km`` and means from the responsibilities, and the shared
    covariance pooled over every class and component,
    ``Σ = (1/n) Σ_i Σ_m r_im (z_i − μ_{y_i m})(z_i − μ_{y_i m})ᵀ``, then shrunk like the tied
    head's. It stops when the average log-likelihood improves by less than ``tol`` (or after
    ``max_iter``). Means start from a k-means++ seeding within each class (``seed``).
    ``n_components = 1`` is exactly the tied :class:`GaussianMixtureHead`.

    Fitted attributes: ``means_`` (K, M, d), ``weights_`` (K, M), ``covariance_`` (d, d),
    ``priors_`` (K,), ``n_iter_``, ``log_likelihood_`` (per sample, training data).
    """

    def __init__(self, n_components: int = 2, *, shrinkage: float = 0.0, max_iter: int = 200, tol: float = 1e-7,
                 seed: int = 0, backend: str = "auto"):
        if not (isinstance(n_components, int) and n_components >= 1):
            raise ValueError(f"n_components must be an int >= 1; got {n_components!r}")
        if not (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1):
            raise ValueError(f"shrinkage must be a float in [0, 1]; got {shrinkage!r}")
        self.n_components = n_components
        self.shrinkage = float(shrinkage)
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.backend = backend
        self._components = None

    # ------------------------------------------------------------------ fitting

    def fit(self, Z, y) -> "MultiPrototypeHead":
        Z = as_float_matrix(Z).to(torch.float64)
        y = as_labels(y, Z.shape[0])
        check_finite_fit(Z)
        K, M = int(y.max()) + 1, self.n_components
        n, d = Z.shape
        counts = torch.bincount(y, minlength=K)
        if int(counts.min()) < M:
            raise ValueError(f"every class needs at least n_components={M} samples; the smallest has "
                             f"{int(counts.min())}")
        g = torch.Generator().manual_seed(self.seed)
        mu = torch.stack([_kmeanspp(Z[y == k], M, g) for k in range(K)])  # (K, M, d)
        w = torch.full((K, M), 1.0 / M, dtype=torch.float64)
        R = Z - torch.stack([Z[y == k].mean(0) for k in range(K)])[y]
        S = _shrink(R.T @ R / n, self.shrinkage)
        prev = -math.inf
        for it in range(1, self.max_iter + 1):
            L = torch.linalg.cholesky(S)
            # E-step: log w + log N over the own class's components, (n, M)
            diff = Z[:, None, :] - mu[y]  # (n, M, d)
            sol = torch.linalg.solve_triangular(L, diff.reshape(-1, d).T, upper=False).T.reshape(n, M, d)
            logdet = 2 * torch.log(torch.diagonal(L)).sum()
            logp = torch.log(w[y]) - 0.5 * (sol.square().sum(-1) + logdet + d * math.log(2 * math.pi))
            ll = torch.logsumexp(logp, 1)
            r = torch.exp(logp - ll[:, None])
            avg = float(ll.mean())
            # M-step
            nk = torch.zeros(K, M, dtype=torch.float64).index_add_(0, y, r)
            w = nk / nk.sum(1, keepdim=True)
            mu = torch.zeros(K, M, d, dtype=torch.float64).index_add_(0, y, r[:, :, None] * Z[:, None, :])
            mu = mu / nk.clamp_min(1e-300)[:, :, None]
            diff = Z[:, None, :] - mu[y]
            S = _shrink(torch.einsum("nm,nmi,nmj->ij", r, diff, diff) / n, self.shrinkage)
            if avg - prev < self.tol:
                break
            prev = avg
        self.n_iter_, self.log_likelihood_ = it, avg
        self.means_, self.weights_, self.covariance_ = mu, w, S
        self.priors_ = counts.double() / n
        comp_priors = (self.priors_[:, None] * w).reshape(-1)
        if bool((comp_priors <= 0).any()):
            raise ValueError("an EM component lost all its weight; use fewer components or shrinkage")
        # the components as a tied head: its derived float64 (A, β) define the classifier
        self._components = GaussianMixtureHead.from_params(mu.reshape(K * M, d), S, comp_priors, "tied",
                                                           backend=self.backend)
        self._owner = torch.arange(K).repeat_interleave(M)
        return self

    @property
    def n_classes_(self) -> int:
        return int(self.means_.shape[0])

    def _fitted(self):
        if self._components is None:
            from gmfast._validate import NotFittedError

            raise NotFittedError("this MultiPrototypeHead is not fitted yet; call fit(Z, y)")
        return self._components

    # ------------------------------------------------------------------ evaluation

    def forward(self, Z) -> torch.Tensor:
        """Per-class score of the certified classifier: ``max_m`` of the component log-joints
        ``log π_k + log w_km + log N(z; μ_km, Σ)`` (B, K)."""
        comp = self._fitted()(Z)
        K, M = self.n_classes_, self.n_components
        return comp.reshape(comp.shape[0], K, M).amax(-1)

    __call__ = forward

    def log_likelihood(self, Z, y=None) -> float:
        """Average held-out log-likelihood of the mixture (with labels: ``log p(z, y)``)."""
        comp = self._fitted()(torch.as_tensor(Z).double())
        K, M = self.n_classes_, self.n_components
        per_class = torch.logsumexp(comp.reshape(-1, K, M), -1)
        if y is None:
            return float(torch.logsumexp(per_class, 1).mean())
        return float(per_class.gather(1, torch.as_tensor(y).long()[:, None]).mean())

    def predict(self, Z) -> torch.Tensor:
        return self.certify(Z, fp_sound=False).prediction

    def certify(self, Z, norm=2, *, fp_sound: bool = True) -> Certificate:
        """Prediction and sound radius (see the module docstring), blocked over rows."""
        head = self._fitted()
        norm = canonical_norm(norm)
        Zt, work, in_dtype = head._prepare(Z)
        B, d = Zt.shape
        inv_hat, inv_lo = ref.tied_denominators(work, norm)
        inv = (inv_lo if fp_sound else inv_hat).to(Zt.device)
        alpha, eps = ref.tied_error_coefficients(work, d, Zt.dtype) if fp_sound else (None, None)
        owner = self._owner.to(Zt.device)
        same = owner[:, None] == owner[None, :]  # (KM, KM) same-class components
        pred = torch.empty(B, dtype=torch.int64, device=Zt.device)
        radius = torch.empty(B, dtype=torch.float64, device=Zt.device)
        bs = max(1, (1 << 20) // max(1, owner.numel()))
        for i in range(0, B, bs):
            Zb = Zt[i:i + bs]
            logits = ref.tied_linear_logits(Zb, work)
            star = logits.argmax(1)  # the winning component (lowest index on ties)
            L = logits.double()
            m = L.gather(1, star[:, None]) - L
            if fp_sound:
                e = norm_upper(Zb)[:, None] * alpha[None, :] + eps[None, :]
                m = m - ((e.gather(1, star[:, None]) + e) * slack_up(4) + 2.0 * U64 * m.abs())
            ratio = torch.where(m > 0, m * inv[star], torch.zeros_like(m))
            ratio = ratio.masked_fill(same[star], math.inf)  # own class's components: not facets
            r = ratio.amin(1) * (slack_down(4) if fp_sound else 1.0)
            finite = torch.isfinite(L).all(1)
            pred[i:i + bs] = torch.where(finite, owner[star], torch.full_like(star, -1))
            radius[i:i + bs] = torch.where(finite, r, torch.zeros_like(r))
        out = torch.float64 if in_dtype == torch.float64 else torch.float32
        return Certificate(pred, round_down_to(radius, out), norm)


def _shrink(S: torch.Tensor, lam: float) -> torch.Tensor:
    S = 0.5 * (S + S.T)
    d = S.shape[0]
    return (1 - lam) * S + lam * torch.trace(S) / d * torch.eye(d, dtype=S.dtype)


def _kmeanspp(X: torch.Tensor, M: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): M rows of X, spread out."""
    idx = [int(torch.randint(X.shape[0], (1,), generator=g))]
    d2 = (X - X[idx[0]]).square().sum(1)
    for _ in range(1, M):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / len(d2))
        idx.append(int(torch.multinomial(p, 1, generator=g)))
        d2 = torch.minimum(d2, (X - X[idx[-1]]).square().sum(1))
    return X[idx].clone()


def compare_prototypes(Z_train, y_train, Z_test, y_test, Ms=(1, 2, 4), radii=(0.0, 0.25, 0.5, 1.0), *,
                       shrinkage: float = 0.0, seed: int = 0) -> list:
    """Does a closer fit pay? Per ``M``: held-out log-likelihood, clean and certified accuracy.

    Returns a list of dicts (``M``, ``loglik``, ``accuracy`` array over ``radii``).
    """
    from gmfast.certificate import certified_accuracy

    rows = []
    for M in Ms:
        head = MultiPrototypeHead(M, shrinkage=shrinkage, seed=seed).fit(Z_train, y_train)
        cert = head.certify(torch.as_tensor(Z_test))
        rows.append(dict(M=M, loglik=head.log_likelihood(Z_test, y_test),
                         accuracy=np.asarray(certified_accuracy(cert, y_test, radii)), n_iter=head.n_iter_))
    return rows
