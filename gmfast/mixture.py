"""The fitted mixture ``Q`` of a head as a generative model: its components and draws from it.

``y ~ π``, a component ``m | y`` with the class's weights, ``z | m ~ N(μ_m, Σ_m)``. Used by
the distributional certificate (Monte Carlo ``CA_Q``, :mod:`gmfast.distributional`) and the
diagnostics (KL estimates against draws of ``Q``, :mod:`gmfast.diagnostics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gmfast.head import GaussianMixtureHead

__all__ = ["Mixture", "mixture_of", "sample_mixture", "sample_class", "class_counts"]


@dataclass(frozen=True)
class Mixture:
    """A head's generative model as components: ``y ~ π``, component ``m | y ~ w``,
    ``z | m ~ N(μ_m, Σ_m)``. ``kind`` says how ``Σ`` is stored (as in the head).

    priors (K,); comp_class (C,) int64; comp_weights (C,) within-class weights;
    comp_means (C, d); cov: (d, d) tied, (K, d, d) full, (K, d) diag, (K,) spherical.
    """

    priors: torch.Tensor
    comp_class: torch.Tensor
    comp_weights: torch.Tensor
    comp_means: torch.Tensor
    kind: str
    cov: torch.Tensor

    def noise_factor(self, k: int):
        """``F`` with ``Σ_k = F Fᵀ`` as a function ``e ↦ e Fᵀ`` for rows ``e`` (n, d)."""
        if self.kind == "tied":
            L = torch.linalg.cholesky(self.cov)
            return lambda e: e @ L.T
        if self.kind == "full":
            L = torch.linalg.cholesky(self.cov[k])
            return lambda e: e @ L.T
        sd = self.cov[k].sqrt()
        return lambda e: e * sd


def mixture_of(head) -> Mixture:
    """The generative model ``Q`` of a fitted head.

    A :class:`~gmfast.GaussianMixtureHead` is one component per class; a head with
    components (:class:`~gmfast.multiproto.MultiPrototypeHead`: ``component_class_``,
    ``component_weights_``, ``component_means_`` and one shared ``covariance_``) is read
    through those attributes, so this module needs no import of it (which imports
    :mod:`gmfast.diagnostics`, which imports this).
    """
    if isinstance(head, GaussianMixtureHead):
        K = head.n_classes_
        return Mixture(head.priors_, torch.arange(K), torch.ones(K, dtype=torch.float64), head.means_,
                       head.covariance_type, head.covariances_)
    if all(hasattr(type(head), a) for a in ("component_class_", "component_weights_", "component_means_")):
        return Mixture(head.priors_, head.component_class_, head.component_weights_, head.component_means_,
                       "tied", head.covariance_)
    raise TypeError(f"expected a fitted GaussianMixtureHead or MultiPrototypeHead; got {type(head).__name__}")


def sample_class(mix: Mixture, k: int, n: int, gen: torch.Generator, factor=None) -> torch.Tensor:
    """``n`` draws (n, d) float64 from class ``k`` of the mixture."""
    comps = (mix.comp_class == k).nonzero().reshape(-1)
    d = mix.comp_means.shape[1]
    if comps.numel() == 1:
        mu = mix.comp_means[comps].expand(n, d)
    else:
        pick = torch.multinomial(mix.comp_weights[comps], n, replacement=True, generator=gen)
        mu = mix.comp_means[comps[pick]]
    factor = factor or mix.noise_factor(k)
    return factor(torch.randn(n, d, generator=gen, dtype=torch.float64)) + mu


def class_counts(priors: torch.Tensor, n: int, *, minimum: int = 0) -> torch.Tensor:
    """Largest-remainder allocation of ``n`` rows to classes in proportion to ``priors``."""
    raw = priors.double() * n
    counts = torch.floor(raw).long()
    short = n - int(counts.sum())
    if short > 0:
        counts[torch.argsort(raw - counts, descending=True)[:short]] += 1
    return counts.clamp_min(minimum)


def sample_mixture(head, n: int, seed: int = 0, *, stratified: bool = True):
    """Draw ``(z, y)`` from the fitted mixture ``Q`` of a head.

    Parameters
    ----------
    head : GaussianMixtureHead (any covariance type) or MultiPrototypeHead, fitted
    n : int
        Number of rows.
    seed : int
    stratified : bool
        ``True``: ``round(n·π_y)`` rows per class (largest remainder), rows grouped by class
        (lower variance for estimates weighted by ``π`` afterwards); ``False``: ``y ~ π``
        i.i.d., in random order.

    Returns
    -------
    z : (n, d) float64 tensor
    y : (n,) int64 tensor
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    mix = mixture_of(head)
    g = torch.Generator().manual_seed(seed)
    K = mix.priors.shape[0]
    if stratified:
        y = torch.repeat_interleave(torch.arange(K), class_counts(mix.priors, n))
    else:
        y = torch.multinomial(mix.priors, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.long)
    z = torch.empty(n, mix.comp_means.shape[1], dtype=torch.float64)
    for k in range(K):
        rows = (y == k).nonzero().reshape(-1)
        if rows.numel():
            z[rows] = sample_class(mix, k, rows.numel(), g)
    return z, y
