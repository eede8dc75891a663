"""The radius search of the local route (:class:`gmfast.lipschitz.local.LocalBounds`): a
linear bound kept for concretisation over smaller balls (:class:`LinearBound`), and the
passes that pick the balls (:func:`margin_radius`, :func:`box_radius`).

A relaxation computed for a ball of radius ``ε`` holds on every smaller ball, so every
radius these functions return is one that some pass *proved*; how the balls are chosen
affects only tightness and cost.
"""

from __future__ import annotations

import math

import torch

from gmfast.lipschitz.linearize import _F64
from gmfast.lipschitz.local_steps import rowdot


def margin_radius(lb, x, lam, c0, norm, domain=None, steps: int = 4, start=None, lam_err=None, c0_err=None):
    """Largest certified radius (B,) float64 for ``lam·f + c0 > 0`` (every row) per input.

    Each pass computes the relaxation for one ball ``ε_k`` and certifies the largest
    ``ε' ≤ ε_k`` its linear bound proves (:meth:`LinearBound.largest`); the next ball is
    chosen from the passes so far (grow while they pass, the geometric mean of the
    largest certified and the smallest failed ball otherwise; the first ball is the
    extrapolation of a pass at ``ε = 0``, i.e. the linearisation). The result is the
    largest radius some pass certified: sound whatever the choices.
    """
    B = x.shape[0]
    best = torch.zeros(B, dtype=_F64)
    fail = torch.full((B,), math.inf, dtype=_F64)
    if start is None:
        lin = lb.linear_bound(lam, lb.prepare(x, 0.0, norm, domain), c0, lam_err, c0_err)
        eps = lb.first_ball * lin.estimate()  # the linearisation overshoots: start inside it
    else:
        eps = torch.as_tensor(start, dtype=_F64).reshape(-1).expand(B).clone()
    if domain is not None and norm == math.inf:
        eps = eps.clamp(max=float(domain[1] - domain[0]))
    prior = None
    for _ in range(steps):
        eps = torch.where(eps > 0, eps, torch.where(best > 0, 2 * best, torch.full_like(eps, 1e-6)))
        ctx = lb.prepare(x, eps, norm, domain, prior)
        if prior is None or bool((eps >= prior["eps"]).all()):
            prior = ctx  # the largest balls so far: their bounds serve every smaller one
        lin = lb.linear_bound(lam, ctx, c0, lam_err, c0_err)
        got = lin.largest(eps)
        best = torch.maximum(best, got)
        fail = torch.where(got < eps, torch.minimum(fail, eps), fail)
        g = lin.estimate()
        grow = torch.maximum(lb.growth[0] * best, torch.minimum(g, lb.growth[1] * best))
        eps = torch.where(torch.isinf(fail), grow, torch.sqrt(best * fail))
        eps = torch.where((best == 0) & torch.isfinite(fail), fail / 4.0, eps)
        if bool(((fail <= best * 1.01) | (best >= eps)).all()):
            break
    return best


def box_radius(lb, x, accept, norm, domain=None, steps: int = 8, start=None):
    """Largest ``ε`` (B,) from a bisection on ``accept(lo, hi) → (B,) bool``, called
    with the sound output box over each ball (:meth:`LocalBounds.output_box`)."""
    B = x.shape[0]
    best = torch.zeros(B, dtype=_F64)
    fail = torch.full((B,), math.inf, dtype=_F64)
    eps = torch.full((B,), 1e-2, dtype=_F64) if start is None else \
        torch.as_tensor(start, dtype=_F64).reshape(-1).expand(B).clone().clamp_min(1e-6)
    for _ in range(steps):
        ctx = lb.prepare(x, eps, norm, domain)
        ok = accept(*lb.output_box(ctx))
        best = torch.where(ok, torch.maximum(best, eps), best)
        fail = torch.where(ok, fail, torch.minimum(fail, eps))
        eps = torch.where(torch.isinf(fail), 4.0 * torch.maximum(best, eps),
                          torch.where(best > 0, torch.sqrt(best * fail), fail / 4.0))
    return best


class LinearBound:
    """``f(x') ≥ Λ₀ᵀx' + c − E`` for every ``x'`` in the ball the relaxation was computed on
    (and so in every smaller ball): :meth:`at` concretises it over a ball of radius ``eps``
    (B,) ``≤`` that one; :meth:`estimate` extrapolates (not a bound) the radius at which it
    would reach 0 (``(Λ₀ᵀx + c − E)/‖Λ₀‖_q``, min over rows), to choose the next ball."""

    def __init__(self, lb, lam, c, err, ctx):
        self.lb, self.lam, self.c, self.err, self.ctx = lb, lam, c, err, ctx

    def at(self, eps=None):
        return self.lb._concretize(self.lam, self.c, self.err, self.ctx, eps)

    def estimate(self):
        B = self.ctx["x"].shape[0]
        Bl, R = self.lam.shape[:2]
        lf = self.lam.reshape(Bl, R, -1)
        q = 2 if self.ctx["norm"] == 2 else 1
        val = rowdot(self.lam, self.ctx["x"].reshape(B, -1)) + self.c - 2.0 * self.err
        N = lf.norm(p=q, dim=-1).expand(B, R).clamp_min(1e-300)
        return (val / N).amin(1).clamp_min(0)

    def largest(self, eps, iters: int = 30):
        """Per input, the largest ``ε' ≤ eps`` (found by bisection, each candidate verified)
        at which every row's lower bound is ``> 0``; 0 when none is."""
        lo = torch.zeros_like(eps)
        ok = (self.at(eps) > 0).all(1)
        lo = torch.where(ok, eps, lo)
        hi = eps.clone()
        for _ in range(iters):
            todo = ~ok & (hi > 0)
            if not bool(todo.any()):
                break
            mid = torch.where(todo, 0.5 * (lo + hi), lo)
            passed = (self.at(mid) > 0).all(1)
            lo = torch.where(todo & passed, mid, lo)
            hi = torch.where(todo & ~passed, mid, hi)
        # every returned value passed (or is 0): check once more, never trust the loop
        final = (self.at(lo) > 0).all(1)
        return torch.where(final, lo, torch.zeros_like(lo))
