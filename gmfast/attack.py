"""PGD attacks on an encoder + head (float64): the empirical side of the input certificates.

Used by the tests (no prediction flips inside a certified radius) and the benchmark (the
smallest adversarial distance found, the denominator of the tightness ratio). An attack
finds upper bounds on the true robust radius; it proves nothing.
"""

from __future__ import annotations

import math

import torch


def class_scores(encoder, head, x: torch.Tensor) -> torch.Tensor:
    """Differentiable head scores (B, K) in float64 of ``encoder(x)`` (flattened latents)."""
    z = encoder(x).reshape(x.shape[0], -1).double()
    # tied: the log-posteriors (its linear logits up to a per-row constant, so the same
    # margins) avoid the log-joint's large common quadratic term
    return head(z) if head.covariance_type != "tied" else head.predict_log_proba(z)


def _project(delta, eps, norm):
    B = delta.shape[0]
    if norm == 2:
        n = delta.reshape(B, -1).norm(dim=1).clamp_min(1e-300)
        f = torch.clamp(eps / n, max=1.0)
        return delta * f.reshape((B,) + (1,) * (delta.dim() - 1))
    e = eps.reshape((B,) + (1,) * (delta.dim() - 1))
    return torch.maximum(torch.minimum(delta, e), -e)


def pgd_min_margin(encoder, head, x, c, eps, norm=2, *, domain=None, steps: int = 40, restarts: int = 4,
                   seed: int = 0):
    """Smallest ``min_{j≠c} score_c − score_j`` found over ``‖δ‖_norm ≤ eps`` (B,), and the
    points (B, ...) that reach it. ``eps`` (B,) or a float; ``domain=(lo, hi)`` clips the
    perturbed inputs (for ``ℓ∞`` certificates with a domain)."""
    B = x.shape[0]
    x = x.detach().double()
    eps = torch.as_tensor(eps, dtype=torch.float64).reshape(-1).expand(B).clone()
    g = torch.Generator().manual_seed(seed)
    best = torch.full((B,), math.inf, dtype=torch.float64)
    best_x = x.clone()
    onehot = torch.nn.functional.one_hot(c, num_classes=head.n_classes_).bool()
    view = (B,) + (1,) * (x.dim() - 1)

    def margin(xa):
        s = class_scores(encoder, head, xa)
        return s.gather(1, c[:, None])[:, 0] - s.masked_fill(onehot, -math.inf).amax(1)

    for r in range(restarts):
        if r == 0:
            delta = torch.zeros_like(x)
        else:
            delta = torch.randn(x.shape, generator=g, dtype=torch.float64)
            delta = _project(delta * eps.reshape(view), eps, norm)
        step = 2.5 * eps / steps
        for _ in range(steps):
            delta.requires_grad_(True)
            xa = x + delta
            if domain is not None:
                xa = xa.clamp(domain[0], domain[1])
            m = margin(xa)
            with torch.no_grad():
                better = m < best
                best = torch.where(better, m, best)
                best_x[better] = xa[better].detach()
            (grad,) = torch.autograd.grad(m.sum(), delta)
            with torch.no_grad():
                if norm == 2:
                    gn = grad.reshape(B, -1).norm(dim=1).clamp_min(1e-300).reshape(view)
                    delta = delta - step.reshape(view) * grad / gn
                else:
                    delta = delta - step.reshape(view) * grad.sign()
                delta = _project(delta, eps, norm)
        with torch.no_grad():
            xa = x + delta
            if domain is not None:
                xa = xa.clamp(domain[0], domain[1])
            m = margin(xa)
            better = m < best
            best = torch.where(better, m, best)
            best_x[better] = xa[better]
    return best, best_x


def min_adversarial_distance(encoder, head, x, c, norm=2, *, domain=None, hi: float = 4.0, iters: int = 10,
                             steps: int = 40, restarts: int = 3):
    """Per input, the smallest radius at which PGD found a flip (bisection over the radius),
    ``inf`` where none was found up to ``hi``: an upper bound on the true robust radius."""
    B = x.shape[0]
    lo_r = torch.zeros(B, dtype=torch.float64)
    hi_r = torch.full((B,), float(hi), dtype=torch.float64)
    m, _ = pgd_min_margin(encoder, head, x, c, hi_r, norm, domain=domain, steps=steps, restarts=restarts)
    found = m < 0
    hi_r = torch.where(found, hi_r, torch.full_like(hi_r, math.inf))
    for _ in range(iters):
        mid = torch.where(found, 0.5 * (lo_r + hi_r), lo_r)
        m, _ = pgd_min_margin(encoder, head, x, c, mid.clamp_min(1e-12), norm, domain=domain, steps=steps,
                              restarts=restarts)
        flip = (m < 0) & found
        hi_r = torch.where(flip, mid, hi_r)
        lo_r = torch.where(found & ~flip, mid, lo_r)
    return hi_r
