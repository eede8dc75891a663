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

from gmfast._fp import U64
from gmfast.lipschitz.linearize import _F64
from gmfast.lipschitz.local_steps import rowdot


def tied_margin_rows(A, beta, c):
    """The margins ``(a_c − a_j)ᵀh + β_c − β_j``, ``j ≠ c``, of a tied head ``(A, β)``
    (float64) for predictions ``c`` (B,): ``lam`` (B, K−1, d), ``c0`` (B, K−1) and their
    charges. Each entry is one rounded subtraction, so within ``u₆₄|·|`` of the exact
    difference: the charges ``lam_err``, ``c0_err`` that :func:`margin_radius` takes."""
    K = A.shape[0]
    others = torch.stack([torch.cat([torch.arange(k), torch.arange(k + 1, K)]) for k in range(K)])[c]
    lam = A[c][:, None, :] - A[others]
    c0 = beta[c][:, None] - beta[others]
    return lam, c0, U64 * lam.abs(), U64 * c0.abs()


def margin_radius(lb, x, lam, c0, norm, domain=None, steps: int = 4, start=None, lam_err=None, c0_err=None,
                  floor=None):
    """Largest certified radius (B,) float64 for ``lam·f + c0 > 0`` (every row) per input.

    Each pass computes the relaxation for one ball ``ε_k`` and certifies the largest
    ``ε' ≤ ε_k`` its linear bound proves (:meth:`LinearBound.largest`); the next ball is
    chosen from the passes so far (grow while they pass, the geometric mean of the
    largest certified and the smallest failed ball otherwise; the first ball is the
    extrapolation of a pass at ``ε = 0``, i.e. the linearisation). The result is the
    largest radius some pass certified: sound whatever the choices.

    ``floor`` (B,): radii already certified another way (``method="auto"``): the search
    starts no lower than just above them (``1.05×``) and stops for an input once a ball at
    most that far above its floor fails (the caller keeps the floor there), so inputs where
    this route cannot win cost about one pass. Inputs whose search has converged drop out of
    later passes (the larger balls' bounds of the inputs that remain are still used).
    """
    B = x.shape[0]
    best = torch.zeros(B, dtype=_F64)
    fail = torch.full((B,), math.inf, dtype=_F64)
    if start is None:
        lin = lb.linear_bound(lam, lb.prepare(x, 0.0, norm, domain), c0, lam_err, c0_err)
        eps = lb.first_ball * lin.estimate()  # the linearisation overshoots: start inside it
    else:
        eps = torch.as_tensor(start, dtype=_F64).reshape(-1).expand(B).clone()
    above = None
    if floor is not None:
        above = floor.to(_F64).clamp_min(0) * 1.05
        eps = torch.maximum(eps, above)
    if domain is not None and norm == math.inf:
        eps = eps.clamp(max=float(domain[1] - domain[0]))

    def rows(t, ia):
        return None if t is None else (t if t.shape[0] == 1 else t[ia])

    done = torch.zeros(B, dtype=torch.bool)
    prior, prior_ia = None, None
    for _ in range(steps):
        ia = (~done).nonzero().reshape(-1)
        if ia.numel() == 0:
            break
        e = eps[ia]
        e = torch.where(e > 0, e, torch.where(best[ia] > 0, 2 * best[ia], torch.full_like(e, 1e-6)))
        if prior is not None and not torch.equal(ia, prior_ia):  # inputs only ever drop out
            pos = torch.searchsorted(prior_ia, ia)
            prior = dict(eps=prior["eps"][pos], I={n: (lo[pos], hi[pos]) for n, (lo, hi) in prior["I"].items()})
            prior_ia = ia
        ctx = lb.prepare(x[ia], e, norm, domain, prior)
        if prior is None or bool((e >= prior["eps"]).all()):
            prior, prior_ia = ctx, ia  # the largest balls so far: their bounds serve every smaller one
        lin = lb.linear_bound(rows(lam, ia), ctx, rows(c0, ia), rows(lam_err, ia), rows(c0_err, ia))
        got = lin.largest(e)
        b = torch.maximum(best[ia], got)
        f = torch.where(got < e, torch.minimum(fail[ia], e), fail[ia])
        g = lin.estimate()
        grow = torch.maximum(lb.growth[0] * b, torch.minimum(g, lb.growth[1] * b))
        nxt = torch.where(torch.isinf(f), grow, torch.sqrt(b * f))
        nxt = torch.where((b == 0) & torch.isfinite(f), f / 4.0, nxt)
        stop = (f <= b * 1.01) | (b >= nxt)
        if above is not None:
            stop = stop | (f <= above[ia] * (1 + 1e-9))
        best[ia], fail[ia], eps[ia] = b, f, nxt
        done[ia] = stop
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
        return (val / N).amin(1).nan_to_num(0.0).clamp_min(0)  # a NaN (overflow) estimate: start at 0

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
