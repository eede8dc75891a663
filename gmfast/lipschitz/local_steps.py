"""The nonlinear steps of the local route (:mod:`gmfast.lipschitz.local`): for each kind of
linearised op that is not affine, its sound interval, its relaxation on the pre-activation
bounds, and its step of the backward pass with the rounding charges; and the step through a
first layer's kept Jacobian, alone or fused with the activation above it (per input, or for
rows shared by the batch: :class:`SharedRows`).

Each ``*_back`` function takes the rows ``lam`` (Bl, R, *shape) on the op's output, the
relaxation computed by ``*_relax`` (tensors (B, *shape)) and the running constant ``c``
(·, R), and returns the rows on the op's input(s), the constant's increment ``tt`` (B, R)
and the charge (B, R) that covers every rounding of the step: see the "Floating point"
section of :mod:`gmfast.lipschitz.local` for the argument, restated in short here for each.
"""

from __future__ import annotations

import math

import torch

from gmfast._fp import U64, gamma
from gmfast.lipschitz.linearize import _down, _up


def rowdot(lam: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``Σ lam[b, r, ...]·V[b, ...]`` → (B, R); ``lam`` may have a batch dim of 1 (shared)."""
    Bl, R = lam.shape[:2]
    B = V.shape[0]
    lf = lam.reshape(Bl, R, -1)
    vf = V.reshape(B, -1)
    if Bl == 1:
        return (lf[0] @ vf.T).T
    if B == 1:
        return lf @ vf[0]
    if R == 1:  # a ragged batch of one-row problems: a batched GEMM of 1x1 results is slow
        return torch.linalg.vecdot(lf[:, 0, :], vf).unsqueeze(1)
    return torch.bmm(lf, vf.unsqueeze(2)).squeeze(2)


def _rowsum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def _per_input(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1)  # (B, *shape) -> (B, 1, *shape): broadcasts over the rows


def no_nan(lo: torch.Tensor, hi: torch.Tensor):
    """NaN in an interval (``inf − inf``, ``0·inf`` after an overflow, e.g. of ``exp`` on a
    large ball) becomes the trivial bound ``∓inf``: the exact value is a finite real, so
    ``(−inf, inf)`` encloses it, while a NaN would poison every later ball that reuses these
    intervals as its prior (``torch.maximum`` propagates NaN)."""
    return torch.where(torch.isnan(lo), -math.inf, lo), torch.where(torch.isnan(hi), math.inf, hi)


# ----------------------------------------------------------------------------- max(z, a z)


def act_interval(lo, hi, a):
    """``max(z, a z)`` is monotone: exact on the ends."""
    return torch.maximum(lo, a * lo), torch.maximum(hi, a * hi)


def act_relax(l, u, a):
    """Lower slope α, upper slope s and offset t of ``max(z, a z)`` on ``[l, u]``: ``σ ≥ α z``
    for ``α ∈ [a, 1]`` (CROWN's adaptive choice), ``σ ≤ s z + t`` with the chord slope rounded
    up (a steeper line through ``(l, a l)`` lies above the chord on ``[l, u]``) and ``t``
    rounded up."""
    pos, neg = l >= 0, u <= 0
    unstable = ~(pos | neg)
    width = torch.where(unstable, u - l, torch.ones_like(u))
    s = torch.clamp(((u - a * l) / width) * (1.0 + 8.0 * U64), max=1.0)
    s = torch.where(unstable, s, torch.where(pos, torch.ones_like(s), torch.full_like(s, a)))
    t = torch.where(unstable, _up(((s - a) * (-l)) * (1.0 + 4.0 * U64)), torch.zeros_like(s))
    alpha = torch.where(pos, torch.ones_like(s), torch.full_like(s, a))
    alpha = torch.where(unstable & (u >= -l), torch.ones_like(s), alpha)
    return alpha, s, t


def act_back(lam, rel, M_src, c):
    """``Λ⁺α + Λ⁻s`` (slopes ≤ 1: one rounding per entry, ``≤ 2u|Λ|ᵀM``), ``tt = Λ⁻ᵀt`` (an
    inner product: ``γ_{n+1}|tt|``, all terms of one sign) and its addition to ``c``."""
    alpha, s, t = rel
    neg = lam < 0
    new = torch.where(neg, lam * _per_input(s), lam * _per_input(alpha))
    tt = rowdot(torch.where(neg, lam, 0.0), t)  # ≤ 0; Σ|Λ⁻|t = −tt
    err = 2.0 * U64 * rowdot(lam.abs(), M_src) + (gamma(t[0].numel() + 1, U64) + U64) * tt.abs() + U64 * c.abs()
    return new, tt, err


def jacobian_back(lam, c, jac, input_shape):
    """The step from a node ``v = J x + b`` (affine in the input) straight to the input,
    with ``Ĵ, b̂, E`` from the rows ``e_i`` (:meth:`LocalBounds._exact`):
    ``|e_iᵀv(x') − (Ĵ_i x' + b̂_i)|`` is within the charges ``E_i`` for every ``x'`` of the
    ball, so for rows ``Λ`` (by linearity) within ``|Λ|ᵀE``. Computed: ``fl(ΛĴ)`` (``k``
    terms: ``γ_k|Λ|ᵀ(|Ĵ|M₀)``) and ``fl(Λᵀb̂)`` (``γ_{k+1}|Λ|ᵀ|b̂| + u(|c| + |Λᵀb̂|)``).
    Returns the rows on the input (shaped ``input_shape``), the constant's increment and the
    charge."""
    Jh, cv, E, JM = jac
    Bl, R = lam.shape[:2]
    lf = lam.reshape(Bl, R, -1)
    k = lf.shape[2]
    new = (lf @ Jh).reshape((Bl, R) + tuple(input_shape))
    tt = lf @ cv
    la = lam.abs()
    e = rowdot(la, E) + gamma(k + 2, U64) * rowdot(la, JM) + gamma(k + 1, U64) * rowdot(la, cv.abs().unsqueeze(0)) \
        + U64 * (c.abs() + tt.abs())
    return new, tt, e


def act_jacobian_back(lam, rel, jac, W, c):
    """An activation whose input ``z = J x + b`` is affine in the input (the first layer):
    the activation step and :func:`jacobian_back` fused, in one pass over
    the rows. ``new = fl(Λ ∘ slope)`` with slopes in ``[0, 1]``, so ``|new| ≤ |Λ|`` entrywise
    and every charge of both steps is at most ``|Λ|ᵀW`` with the per-input
    ``W = 2u M_z + E + γ_{k+2}|Ĵ|M₀ + γ_{k+1}|b̂|`` (:meth:`LocalBounds._fused_charges`), plus
    the two constants' additions. Returns the rows on the input, ``tt`` and the charge."""
    alpha, s, t = rel
    Jh, cv = jac[0], jac[1]
    neg = lam < 0
    new = lam * torch.where(neg, _per_input(s), _per_input(alpha))
    Bl, R = new.shape[:2]
    nf = new.reshape(Bl, R, -1)
    t1 = rowdot(lam.clamp(max=0.0), t)  # ≤ 0; Σ|Λ⁻|t = −t1
    t2 = nf @ cv
    tt = t1 + t2
    err = rowdot(lam.abs(), W) + gamma(t[0].numel() + 1, U64) * t1.abs() \
        + U64 * (c.abs() + 2.0 * (t1.abs() + t2.abs()) + tt.abs())
    return nf @ Jh, tt, err


class SharedRows:
    """Rows ``L`` (k, w) shared by the batch (the refinement rows ``±e_i`` of a node after the
    affine ops above a first-layer activation) in their support: ``idx`` (k, p), each row's
    nonzero columns (``p`` the most of a row; shorter rows padded with columns where they
    are 0) and ``vals = L[idx]``; which slope each entry takes in a lower-bound row (``L``)
    and an upper-bound row (``−L``), as indices into ``[α; s]``; ``[L⁻; (−L)⁻ = −L⁺]`` and
    ``|L|`` as sparse matrices (:meth:`side_products`); and the rows of ``[Ĵ b̂]`` each row
    meets (:meth:`jacobian_rows`)."""

    def __init__(self, L: torch.Tensor):
        k, w = L.shape
        nz = L != 0
        p = max(int(nz.sum(1).max()), 1)
        self.k, self.w, self.p = k, w, p
        self.idx = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :p]
        self.vals = L.gather(1, self.idx)
        self.pick_lo = self.idx + w * (self.vals < 0)  # Λ⁺α + Λ⁻s, Λ = L
        self.pick_hi = self.idx + w * (self.vals > 0)  # Λ = −L: its negative entries are L's positive ones
        r = torch.arange(k).unsqueeze(1).expand(k, p)
        neg, pos = self.vals < 0, self.vals > 0  # the nonzeros only (padding left out)
        ij = torch.stack([torch.cat([r[neg], r[pos] + k]), torch.cat([self.idx[neg], self.idx[pos]])])
        self.neg_rows = torch.sparse_coo_tensor(ij, torch.cat([self.vals[neg], -self.vals[pos]]), (2 * k, w),
                                                check_invariants=True).coalesce()
        nz = neg | pos
        self.abs_rows = torch.sparse_coo_tensor(torch.stack([r[nz], self.idx[nz]]), self.vals[nz].abs(), (k, w),
                                                check_invariants=True).coalesce()
        self._jac = None

    def side_products(self, t: torch.Tensor, W: torch.Tensor):
        """``Λ⁻·t`` for the rows ``L`` then ``−L`` (2k, B) and ``|L|·W`` (k, B), for the
        activation's offsets ``t`` and the fused charges ``W`` (each (B, w))."""
        return torch.sparse.mm(self.neg_rows, t.T), torch.sparse.mm(self.abs_rows, W.T)

    def jacobian_rows(self, Jh: torch.Tensor, cv: torch.Tensor, sl: slice, keep: int) -> torch.Tensor:
        """``[Ĵ b̂][idx[sl]]`` transposed, (kc, n_in + 1, p): for all rows at once and kept
        while ``Ĵ``, ``b̂`` are the same (the later passes') when that is at most ``keep``
        entries, else gathered for ``sl`` only (bounded memory)."""
        if self.k * self.p * (Jh.shape[1] + 1) > keep:
            return torch.cat([Jh, cv.unsqueeze(1)], 1)[self.idx[sl]].transpose(1, 2)
        if self._jac is None or not (torch.equal(self._jac[0], Jh) and torch.equal(self._jac[1], cv)):
            G = torch.cat([Jh, cv.unsqueeze(1)], 1)[self.idx]
            self._jac = (Jh, cv, G.transpose(1, 2).contiguous())
        return self._jac[2][sl]


def act_jacobian_back_shared(sh: SharedRows, sl: slice, slopes, side, G, c):
    """:func:`act_jacobian_back` for the rows ``sl`` of the shared rows ``sh`` and their
    negatives, for every input at once: ``slopes`` (2w, B) is ``[α; s]`` of the activation,
    ``side`` from :meth:`SharedRows.side_products` with its offsets ``t`` and the fused
    charges ``W`` per unit of ``|Λ|`` (:meth:`LocalBounds._fused_charges`), ``G`` from
    :meth:`SharedRows.jacobian_rows`, ``c`` (1, 2kc) the rows' constants.

    The same float operations as :func:`act_jacobian_back` on the support; off it ``Λ_j = 0``,
    so the exact terms ``Λ_j σ(z_j)`` vanish whatever the neuron's lines (they are left out,
    also where a line is infinite or NaN: the dense step's ``0·∞`` would give NaN, hence the
    bound −∞, where this one may give a finite, sound bound). The products ``new·Ĵ``,
    ``new·b̂``, ``Λ⁻·t`` and ``|Λ|·W`` sum the same nonzero terms in another order (Higham's
    bound holds for any order; the charges, with ``γ`` of the full width, are the same). For
    ``−L``, ``fl((−v)·s) = −fl(v·s)``: exactly the dense step's rows. Returns the rows on the
    input (B, 2kc, n_in) (the rows of ``L`` first), ``tt`` and the charge (B, 2kc)."""
    B = slopes.shape[1]
    v = sh.vals[sl].unsqueeze(2)
    kc = v.shape[0]
    n_in = G.shape[1] - 1
    new = torch.empty((kc, sh.p, 2 * B), dtype=v.dtype)  # fl(Λ ∘ slope) of both signs, per input
    torch.mul(v, slopes[sh.pick_lo[sl]], out=new[:, :, :B])
    torch.mul(-v, slopes[sh.pick_hi[sl]], out=new[:, :, B:])
    out = torch.bmm(G, new)  # (kc, n_in + 1, 2B): new·Ĵ and new·b̂

    def per_input(t):  # (kc, ..., 2B) -> (B, 2kc, ...): the rows of L, then those of −L
        t = t.movedim(-1, 0).reshape((2, B) + t.shape[:-1])
        return t.transpose(0, 1).reshape((B, 2 * kc) + t.shape[3:])

    rows = per_input(out[:, :n_in])
    t2 = per_input(out[:, n_in])
    t1 = torch.cat([side[0][sl].T, side[0][sh.k + sl.start:sh.k + sl.stop].T], 1)
    tt = t1 + t2
    ch = side[1][sl].T
    err = torch.cat([ch, ch], 1) + gamma(sh.w + 1, U64) * t1.abs() \
        + U64 * (c.abs() + 2.0 * (t1.abs() + t2.abs()) + tt.abs())
    return rows, tt, err


# ----------------------------------------------------------------------------- f(z) elementwise


def unary_interval(relaxation, lo, hi):
    """The relaxation's range on ``[lo, hi]`` (``[−∞, ∞]`` where the interval is not finite)."""
    fin = torch.isfinite(lo) & torch.isfinite(hi)
    if bool(fin.all()):
        return relaxation.range(lo, hi)
    a, b = relaxation.range(torch.where(fin, lo, 0.0), torch.where(fin, hi, 0.0))
    return torch.where(fin, a, -math.inf), torch.where(fin, b, math.inf)


def unary_relax(relaxation, l, u, M_src):
    """``al z + bl ≤ f(z) ≤ au z + bu`` on ``[l, u]`` (:meth:`Relaxation.lines`: valid in exact
    arithmetic for the exact ``f``), plus what the backward step charges per unit of ``|Λ|``:
    ``SM ≥ max(|al|, |au|)·M_src`` and ``Bm = max(|bl|, |bu|)``. A neuron whose bounds are
    not finite gets the vacuous lines ``0·z ∓ ∞`` (its bound becomes −∞, never NaN: see
    :func:`gmfast.lipschitz.local.LocalBounds._concretize`)."""
    fin = torch.isfinite(l) & torch.isfinite(u)
    if bool(fin.all()):
        al, bl, au, bu = relaxation.lines(l, u)
    else:
        al, bl, au, bu = relaxation.lines(torch.where(fin, l, 0.0), torch.where(fin, u, 0.0))
        al, au = torch.where(fin, al, 0.0), torch.where(fin, au, 0.0)
        bl, bu = torch.where(fin, bl, -math.inf), torch.where(fin, bu, math.inf)
    SM = torch.maximum(al.abs(), au.abs()) * M_src * (1.0 + 4.0 * U64)
    return al, bl, au, bu, SM, torch.maximum(bl.abs(), bu.abs())


def unary_back(lam, rel, c):
    """``Λ_z = Λ⁺al + Λ⁻au`` (one rounding per entry: ``u|Λ|ᵀ(max|a|·M_z)``) and
    ``tt = Σ Λ⁺bl + Λ⁻bu`` (an inner product of length ``n``: ``γ_{n+1}|Λ|ᵀmax|b|``), plus the
    addition to ``c``."""
    al, bl, au, bu, SM, Bm = rel
    neg = lam < 0
    new = torch.where(neg, lam * _per_input(au), lam * _per_input(al))
    tt = _rowsum(lam * torch.where(neg, _per_input(bu), _per_input(bl)))
    la = lam.abs()
    err = U64 * rowdot(la, SM) + gamma(Bm[0].numel() + 1, U64) * rowdot(la, Bm) + U64 * (c.abs() + tt.abs())
    return new, tt, err


# ----------------------------------------------------------------------------- a·b elementwise


def prod_interval(Ia, Ib):
    """The four corner products, each rounded once, widened by one ulp outward (the exact
    product of two floats lies within one ``nextafter`` step of its rounding)."""
    (la, ha), (lb, hb) = Ia, Ib
    p = torch.stack([la * lb, la * hb, ha * lb, ha * hb])
    lo, hi = _down(p.amin(0)), _up(p.amax(0))
    bad = torch.isnan(lo) | torch.isnan(hi)  # ∞·0 of an unbounded factor
    return torch.where(bad, -math.inf, lo), torch.where(bad, math.inf, hi)


def prod_relax(Ia, Ib, M_a, M_b):
    """McCormick planes for ``a b`` on ``[la, ua] × [lb, ub]``: ``a b ≥ lb·a + la·b − la·lb``
    (the difference is ``(a − la)(b − lb) ≥ 0``) and ``a b ≤ ub·a + la·b − la·ub`` (the
    difference is ``(a − la)(ub − b) ≥ 0``). The slopes are the bounds themselves (exact);
    the constants are rounded outward. Also ``P ≥ M_a·M_b`` and ``Cm = max|constants|``
    for the charges."""
    (la, ua), (lb, ub) = Ia, Ib
    cL = _down(-(la * lb))
    cU = _up(-(la * ub))
    P = M_a * M_b * (1.0 + 4.0 * U64)
    return la, lb, ub, cL, cU, P, torch.maximum(cL.abs(), cU.abs())


def prod_back(lam, rel, c):
    """``Λ_a = Λ⁺lb + Λ⁻ub``, ``Λ_b = Λ la`` (one rounding per entry each, the slopes bounded
    by ``M_b`` resp. ``M_a``: ``2u|Λ|ᵀ(M_a M_b)``) and ``tt = Σ Λ⁺cL + Λ⁻cU`` (``γ_{n+1}|Λ|ᵀ
    max|c|``), plus the addition to ``c``."""
    la, lb, ub, cL, cU, P, Cm = rel
    neg = lam < 0
    new_a = torch.where(neg, lam * _per_input(ub), lam * _per_input(lb))
    new_b = lam * _per_input(la)
    tt = _rowsum(lam * torch.where(neg, _per_input(cU), _per_input(cL)))
    a = lam.abs()
    err = 2.0 * U64 * rowdot(a, P) + gamma(Cm[0].numel() + 1, U64) * rowdot(a, Cm) + U64 * (c.abs() + tt.abs())
    return new_a, new_b, tt, err

