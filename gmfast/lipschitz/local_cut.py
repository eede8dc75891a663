"""Cheaper intermediate bounds for the local route: backward passes that stop at a cut.

Full CROWN (:class:`gmfast.lipschitz.local.LocalBounds`) bounds every input of a nonlinear op
by a backward pass down to the input: on MiniLM that is ~4·10⁵ rows per sentence, each
through up to six layers. Shi et al. 2020 ("Robustness verification for transformers")
combine a forward pass (linear bounds of every node in terms of the input) with backward
passes that stop at an earlier layer and substitute that layer's forward bounds; DeepPoly
(Singh et al. 2019) back-substitutes the same way. :class:`CutBounds` does this at chosen
*boundary* nodes ``h`` (e.g. every LayerNorm's centred input and output, every softmax
output and score matrix ``q kᵀ · scale``):

* each boundary ``h`` (``k`` entries) is refined by the rows ``±e_i`` and the pass is kept
  raw: for every ``x'`` in the ball,
  ``Â_l,i x' + â_l,i − D_l,i ≤ h_i(x') ≤ Â_u,i x' + â_u,i + D_u,i`` with the computed rows
  and constants (``Â``, ``â``: exactly the floats kept) and ``D = (1 + 2⁻²⁰)E + 2⁻⁹⁶⁰``
  rounded up, ``E`` the pass's computed charge total: every charged term is a sum of products
  of nonnegative floats (the ``D`` of the boundaries below enter as given floats), so ``E`` is
  within a factor ``1 + γ_N < 1 + 2⁻²²`` (``N < 2³⁰``) of the exact charges and ``1 + 2⁻²⁰``
  covers it (the engine doubles instead, once per bound: :mod:`gmfast.lipschitz.local`,
  "Floating point"; doubling here would compound to ``2^L`` through ``L`` levels of
  boundaries); its interval is that pass concretised;
* every other refined node's pass (and the next boundary's) stops, on each branch, at the
  first boundary it meets below it (``window > 1``: crossing the ``window − 1`` nearest):
  rows ``Λ`` on ``h`` become rows on the input by
  ``Λᵀh(x') ≥ (Λ⁺Â_l + Λ⁻Â_u) x' + Λ⁺â_l + Λ⁻â_u − Σ|Λ|·max(D_l, D_u)``, an exact consequence
  of the two inequalities (``Λ⁺ ≥ 0`` takes the lower one, ``Λ⁻ ≤ 0`` the upper one), and
  the pass continues at the input (branches that do not pass through ``h`` — a residual
  connection around it — continue down as before, so a cut that does not separate the
  graph is still sound). Only the intermediate bounds use cuts; the final pass (the
  margins) is full depth;
* a node that is a chain of single-input affine steps above its boundary (attention's
  ``q, k, v``, the MLP's first layer above a LayerNorm) gets no rows: the chain is composed
  forward with the boundary's bounds (:meth:`CutBounds._forward_chain`).

Each pass is then one block (or one sub-layer) deep instead of the whole encoder. What is
lost against full CROWN is that the relaxation *below* a cut is fixed per boundary entry
(its lower and upper rows are chosen for ``±e_i``, not for the rows arriving there): the
gaps of different entries no longer cancel (``Σ|Λ_i| gap_i ≥ |Σ Λ_i gap_i|``).

Floating point of the substitution (:meth:`CutLinear.step`): ``fl(Λ⁺Â_l) + fl(Λ⁻Â_u)`` rounded
once more: within ``γ_{2k+2}Σ|Λ_i|(|Â_i|M₀)`` of the exact rows applied to any ``|x'| ≤ M₀``;
``Λ⁺â_l + Λ⁻â_u`` within ``γ_{2k+2}|Λ|ᵀmax(|â_l|, |â_u|)``; its addition to ``c``
``u(|c| + |tt|)``; an infinite constant met by a nonzero coefficient gives ``−∞`` (never
NaN). ``|Â|M₀`` is a computed sum of nonnegative products, inflated by ``1 + 2γ_{n+2}`` plus
``2⁻⁹⁶⁰``. Every charge joins the pass's error total, doubled and subtracted with
``nextafter`` at the end as for every other step.
"""

from __future__ import annotations

import math

import torch

from gmfast._fp import U64, gamma
from gmfast.lipschitz.linearize import _F64, _TINY, _up
from gmfast.lipschitz.local import LocalBounds
from gmfast.lipschitz.local_search import tied_margin_rows
from gmfast.lipschitz.local_steps import rowdot

#: covers the relative error of a computed charge total (``1 + γ_N``, ``N < 2³⁰``), once per boundary
_COVER = 1.0 + 2.0**-20


class CutLinear:
    """Linear bounds of a boundary's entries in the input, per input ``b`` of the batch:
    ``Al[b] x' + al[b] − D ≤ h(x') ≤ Au[b] x' + au[b] + D`` on the ball, with ``W`` (B, k) the
    charge per unit of ``|Λ|`` of :meth:`step` (``max(D_l, D_u)`` and the roundings), and
    ``bad_l``/``bad_u`` (B, k) marking infinite constants (stored as 0) or None."""

    def __init__(self, input_shape, Al, al, Au, au, W, bad_l=None, bad_u=None, D=None):
        self.input_shape, self.D = tuple(input_shape), D
        self.Al, self.al, self.Au, self.au, self.W, self.bad_l, self.bad_u = Al, al, Au, au, W, bad_l, bad_u

    @classmethod
    def from_bounds(cls, input_shape, Al, al, Au, au, D, M0):
        """From the kept rows ``Al, Au`` (B, k, n), constants ``al, au`` (B, k), gaps ``D``
        (B, k) and ``M0 ≥ |x'|`` on the ball (B, n): the charge per unit of ``|Λ|`` is
        ``max(D) + γ_{2k+2}(max(|Al|M0, |Au|M0) + max(|al|, |au|))`` (module docstring), with
        ``|A|M0`` inflated by ``1 + 2γ_{n+2}`` plus ``2⁻⁹⁶⁰``; infinite constants are stored as 0
        and marked."""
        k, n = Al.shape[1], Al.shape[2]
        Mc = M0.reshape(M0.shape[0], n, 1)
        JM = torch.maximum(Al.abs() @ Mc, Au.abs() @ Mc).squeeze(2) * (1.0 + 2.0 * gamma(n + 2, U64)) + _TINY
        fl, fu = torch.isfinite(al), torch.isfinite(au)
        Cm = torch.where(fl & fu, torch.maximum(al.abs(), au.abs()), 0.0)
        W = torch.where(torch.isnan(D), math.inf, D) + gamma(2 * k + 2, U64) * (JM + Cm)
        finite = bool(fl.all() and fu.all())
        return cls(input_shape, Al, torch.where(fl, al, 0.0), Au, torch.where(fu, au, 0.0), W,
                   None if finite else (~fl).to(_F64), None if finite else (~fu).to(_F64),
                   torch.where(fl & fu, D, math.inf))

    def step(self, lam, c):
        """Rows ``lam`` (Bl, R, *shape) on the boundary to rows on the input (B, R, *input), the
        constant's increment ``tt`` (B, R) and the charge (B, R) (module docstring)."""
        Bl, R = lam.shape[:2]
        lf = lam.reshape(Bl, R, -1)
        pos, neg = lf.clamp(min=0.0), lf.clamp(max=0.0)
        new = pos @ self.Al + neg @ self.Au
        tt = rowdot(pos, self.al) + rowdot(neg, self.au)
        if self.bad_l is not None:  # a nonzero coefficient on an infinite constant: −∞, not NaN
            hit = rowdot((lf > 0).to(_F64), self.bad_l) + rowdot((lf < 0).to(_F64), self.bad_u)
            tt = torch.where(hit > 0, -math.inf, tt)
        err = rowdot(lf.abs(), self.W) + U64 * (c.abs() + tt.abs())
        new = new.reshape(new.shape[:2] + self.input_shape)
        return new, tt, torch.where(torch.isnan(err), math.inf, err)


def nodes_matching(lb, pattern: str):
    """The nodes whose name (a traced node's, or ``name/step`` for a step inside one, e.g.
    ``layers.0.ln1/center``) matches the regular expression ``pattern`` in full, in
    topological order; an error naming the traced nodes if none."""
    import re

    rx = re.compile(pattern)
    out = [n for n in lb.order[1:] if rx.fullmatch(getattr(n, "name", ""))]
    if not out:
        names = sorted({getattr(n, "name", "").split("/")[0] for n in lb.order[1:]})
        raise ValueError(f"no node matches {pattern!r}; the traced nodes are {names}")
    return out


def node_named(lb, name: str):
    """The node of the linearisation computing the traced node ``name`` (a module path such as
    ``"layers.0.ln2"``, a function node such as ``"add_2"``, or a step ``"name/what"``)."""
    for n in lb.order[1:]:
        if getattr(n, "name", None) == name:
            return n
    names = sorted({getattr(n, "name", "").split("/")[0] for n in lb.order[1:]})
    raise ValueError(f"no node named {name!r}; the traced nodes are {names}")


class CutBounds(LocalBounds):
    """:class:`LocalBounds` whose intermediate passes stop at ``boundaries`` (nodes or their
    names, :func:`node_named`, or one regular expression, :func:`nodes_matching`) and
    substitute their linear bounds (see the module docstring).

    ``window``: the pass of a node crosses the ``window − 1`` boundaries nearest below it and
    stops, on each branch, at the first other boundary it meets (``1``: at any boundary;
    nodes with fewer boundaries below keep full-depth passes). Boundaries that are
    affine in the input are dropped (their exact Jacobian already ends every pass there).
    ``forward``: nodes that are a chain of single-input affine steps above their cut (e.g.
    attention's ``q, k, v`` and the MLP's first layer above a LayerNorm boundary) are bounded
    by composing that chain with the cut's bounds (:meth:`_forward_chain`) instead of rows.
    """

    def __init__(self, encoder, input_shape, boundaries, window: int = 1, forward: bool = True):
        super().__init__(encoder, input_shape)
        if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
            raise ValueError(f"window must be a positive int; got {window!r}")
        pos = {n: i for i, n in enumerate(self.order)}
        if isinstance(boundaries, str):
            boundaries = nodes_matching(self, boundaries)
        nodes = []
        for b in boundaries:
            n = node_named(self, b) if isinstance(b, str) else b
            if n not in pos or n is self.order[0]:
                raise ValueError(f"boundary {b!r} is not a step of this linearisation")
            if n not in self.affine_only and n not in nodes:
                nodes.append(n)
        nodes.sort(key=pos.__getitem__)
        self.boundaries, self.window = nodes, window
        self.pre = self.pre + [b for b in nodes if b not in self.pre]
        self.pre_all = self.pre_all | set(nodes)
        self.n_neurons = sum(math.prod(self.shapes[n]) for n in set(self.pre))
        self.cuts, last = {}, {}
        for n in set(self.pre) - self.affine_only:
            below = [b for b in nodes if pos[b] < pos[n]]
            if len(below) >= window:
                self.cuts[n] = frozenset(below[:len(below) - window + 1])
                for b in self.cuts[n]:
                    last[b] = max(last.get(b, -1), pos[n])
        #: nodes whose every path down to their stop set is affine (affine steps and sums): bounded
        #: by composing those steps forward from the boundaries' linear bounds
        #: (:meth:`_forward_chain`), no rows; value: the boundaries they start from
        self.chains = {}
        for n, stop in self.cuts.items():
            leaves = self._affine_leaves(n, stop) if forward and n not in nodes else None
            if leaves:
                self.chains[n] = leaves
        #: after refining node n, the boundaries no later node stops at (their bounds are freed)
        self._free = {}
        for b, p in last.items():
            self._free.setdefault(self.order[p], []).append(b)
        #: keep every boundary's linear bounds in the context (:func:`boundary_report`) instead
        #: of freeing them once no later pass stops there
        self.keep_bounds = False

    def _refine(self, n, ctx):
        ctx.setdefault("L", {})
        try:
            if n in self.pre_all and n in set(self.boundaries):
                return self._refine_boundary(n, ctx)
            if n in self.chains and all(b in ctx["L"] for b in self.chains[n]):
                return self._forward_chain(n, ctx)
            return super()._refine(n, ctx)
        finally:
            for b in () if self.keep_bounds else self._free.get(n, ()):
                ctx["L"].pop(b, None)

    def _affine_leaves(self, n, stop):
        """The boundaries of ``stop`` that every path down from ``n`` meets through affine steps
        and sums only, or None (a path meets a nonlinear op or the input first)."""
        seen, todo, leaves = set(), [n], set()
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            if m in stop and m is not n:
                leaves.add(m)
                continue
            if m is self.order[0] or self.ops[m].kind not in ("affine", "sum"):
                return None
            todo.extend(self._srcs(m))
        return frozenset(leaves)

    def _forward_chain(self, n, ctx):
        """Bounds of ``n``, an affine function of boundaries ``h`` (:meth:`_affine_leaves`), over
        the ball, composing forward on ``v = Cx + c + δ``, ``|δ| ≤ ρ`` per node:

        * at ``h``: ``Ĉ = fl((Al + Au)/2)``, ``ĉ = fl((al + au)/2)``; ``ρ`` bounds the upper line
          minus the centre and the centre minus the lower line over the ball (each concretised,
          the rows' subtraction charged ``2u(|Ĝ|M₀ + |ĝ|)``), plus ``D``;
        * through ``v' = W v + b``: ``C' = fl(W C)`` (``op.fwd`` on the columns), ``c' =
          fl(W c) + b``; ``|v' − (C'x + c')| ≤ |W|ρ + γ_N|W|(|C|M₀ + |c|) + γ_N|b| + δb`` with
          ``N`` the source's size plus the op's own γ index (at least the terms of any entry of
          ``W v``): ``ρ' = absfwd(ρ + γ_N(|C|M₀ + |c|)) + γ_N|b| + δb``, rounded up;
        * through ``v' = a + α b``: ``C' = fl(C_a + α C_b)``, ``c'`` alike, ``ρ' = ρ_a + |α|ρ_b +
          2u(|C_a|M₀ + |c_a| + |α|(|C_b|M₀ + |c_b|))`` (two roundings per entry at most);
        * the interval: ``min/max (C x' + c)`` over the ball minus/plus ``ρ`` (the engine's
          concretisation, ``ρ/2`` passed as its error total, which it doubles).

        Sound for any ``C``, ``c`` (the centre is a heuristic); against rows through these
        steps it loses only that ``ρ`` is a box (the lines' gap is not kept linear)."""
        leaves = self.chains[n]
        L0 = ctx["L"][next(iter(leaves))]
        B, _, n_in = L0.Al.shape
        M0 = ctx["M"][self.order[0]].reshape(B, n_in, 1)
        up = 1.0 + 8.0 * U64

        def mag(C, c):
            return (C.abs() @ M0).squeeze(2) * (1.0 + 2.0 * gamma(n_in + 2, U64)) + c.abs() + _TINY

        memo = {}

        def at(m):
            if m in memo:
                return memo[m]
            if m in leaves:
                L = ctx["L"][m]
                C, c = (L.Al + L.Au) * 0.5, (L.al + L.au) * 0.5
                rho = torch.zeros_like(c)
                for G, g in ((L.Au - C, L.au - c), (C - L.Al, c - L.al)):
                    slack = 2.0 * U64 * ((G.abs() @ M0).squeeze(2) + g.abs()) * up
                    Gi = G.reshape((B, -1) + self.input_shape)
                    rho = torch.maximum(rho, -self._concretize(-Gi, -g, slack, ctx))
                rho = _up((rho + L.D) * up)
            elif self.ops[m].kind == "sum":
                op = self.ops[m]
                (Ca, ca, ra), (Cb, cb, rb) = at(op.a), at(op.b)
                C, c = Ca + op.alpha * Cb, ca + op.alpha * cb
                a = abs(op.alpha)
                rho = _up((ra + a * rb + 2.0 * U64 * (mag(Ca, ca) + a * mag(Cb, cb))) * up + _TINY)
            else:
                op = self.ops[m]
                Cs, cs, rs = at(op.src)
                shp = self.shapes[op.src]
                N = math.prod(shp) + op.n + 1
                cols = Cs.transpose(1, 2).reshape((B * n_in,) + shp)
                C = op.fwd(cols).reshape(B, n_in, -1).transpose(1, 2)
                c = op.fwd(cs.reshape((B,) + shp)).reshape(B, -1)
                extra = torch.zeros_like(c)
                if op.bias is not None:
                    c = c + op.bias.reshape(1, -1)
                    extra = extra + gamma(N, U64) * op.bias.abs().reshape(1, -1)
                if op.bias_err is not None:
                    extra = extra + op.bias_err.reshape(1, -1)
                grow = op.absfwd((rs + gamma(N, U64) * mag(Cs, cs)).reshape((B,) + shp)).reshape(B, -1)
                rho = _up((grow + extra) * up + _TINY)
            memo[m] = (C, c, rho)
            return memo[m]

        C, c, rho = at(n)
        Ci = C.reshape((B, C.shape[1]) + self.input_shape)
        half = rho * 0.5
        lo, hi = self._concretize(Ci, c, half, ctx), -self._concretize(-Ci, -c, half, ctx)
        lo0, hi0 = ctx["I"][n]
        return (torch.maximum(lo.reshape(lo0.shape), lo0), torch.minimum(hi.reshape(hi0.shape), hi0))

    def _refine_boundary(self, n, ctx):
        """All entries of boundary ``n`` by the rows ``±e_i`` (passes stopping at the boundary
        below, if any), kept raw as linear bounds in the input in ``ctx["L"][n]``."""
        lo0, hi0 = ctx["I"][n]
        B = lo0.shape[0]
        shape = self.shapes[n]
        k = math.prod(shape)
        stop = self.cuts.get(n)
        eye = torch.eye(k, dtype=_F64)
        Al, Au = torch.empty((B, k, self.n_in), dtype=_F64), torch.empty((B, k, self.n_in), dtype=_F64)
        al, au, D = (torch.empty((B, k), dtype=_F64) for _ in range(3))
        lo, hi = torch.empty((B, k), dtype=_F64), torch.empty((B, k), dtype=_F64)
        step = max(1, self.row_chunk // (2 * B))
        for j in range(0, k, step):
            e = eye[j:j + step]
            m = e.shape[0]
            lam0, c, err = self._backward(n, torch.cat([e, -e]).reshape((1, 2 * m) + shape), ctx, raw=True, stop=stop)
            lam0 = lam0.reshape(lam0.shape[0], 2 * m, -1).expand(B, 2 * m, self.n_in)
            c = c.expand(B, 2 * m)
            out = self._concretize(lam0.reshape((B, 2 * m) + self.input_shape), c, err, ctx)
            lo[:, j:j + m], hi[:, j:j + m] = out[:, :m], -out[:, m:]
            Al[:, j:j + m], Au[:, j:j + m] = lam0[:, :m], -lam0[:, m:]
            al[:, j:j + m], au[:, j:j + m] = c[:, :m], -c[:, m:]
            d = _up(err * _COVER + _TINY)
            D[:, j:j + m] = torch.maximum(d[:, :m], d[:, m:])
        ctx["L"][n] = CutLinear.from_bounds(self.input_shape, Al, al, Au, au, D, ctx["M"][self.order[0]].reshape(B, -1))
        return (torch.maximum(lo, lo0.reshape(B, k)).reshape((B,) + shape),
                torch.minimum(hi, hi0.reshape(B, k)).reshape((B,) + shape))


def boundary_report(lb, ctx):
    """Where the width of each boundary's interval comes from (a diagnostic; ``lb`` a
    :class:`CutBounds` with ``keep_bounds`` set before :meth:`prepare`): per boundary (in
    order) its name, the largest and median interval width, and for the entry of largest
    width (largest over the batch): ``width`` and its three parts, ``width ≤ slope + gap + 4D``
    (equal up to rounding where the interval is the kept lines concretised, each side charged
    ``2E``): ``slope =
    ε(‖Â_l‖ + ‖Â_u‖)_q`` (what a tight relaxation gives: ``2ε‖∇h_i‖`` as ``ε → 0``), ``gap =
    (Â_u − Â_l)x + â_u − â_l`` (the lines' gap at the centre: the relaxation's looseness) and
    ``D`` (the rounding allowance, which does not shrink with ``ε``). Floats computed without
    outward rounding: a diagnostic, not a bound."""
    x, eps = ctx["x"], ctx["eps"]
    B = x.shape[0]
    xf = x.reshape(B, -1)
    q = 2 if ctx["norm"] == 2 else 1
    out = []
    for b in lb.boundaries:
        if b not in ctx.get("L", {}):
            raise ValueError(f"no kept bounds for boundary {b.name!r}: set keep_bounds = True before prepare")
        L = ctx["L"][b]
        lo, hi = ctx["I"][b]
        w = (hi - lo).reshape(B, -1)
        wb, i = w.max(1)
        j = int(wb.argmax())
        i = int(i[j])
        slope = eps[j] * (L.Al[j, i].norm(p=q) + L.Au[j, i].norm(p=q))
        gap = ((L.Au - L.Al)[j, i] * xf[j]).sum() + (L.au - L.al)[j, i]
        out.append(dict(name=b.name, width_max=float(w.max()), width_median=float(w.median()),
                        width=float(w[j, i]), slope=float(slope), gap=float(gap), D=float(L.D[j, i]),
                        D_max=float(L.D.max())))
    return out


def tied_margin_radius(lb, encoder, head, x, norm, domain=None, steps: int = 4, start=None):
    """Predictions and local certified radii (B,) of a tied ``head`` on ``encoder`` (``lb`` its
    :class:`LocalBounds`, with
    or without cuts): the margins ``(a_c − a_j)ᵀh(x') + β_c − β_j`` started from the computed
    differences, each within ``u|·|`` of the exact one (charged), as ``Certifier``'s local
    route does. The prediction is the head's on ``encoder(x)``; a radius is 0 where the
    exact margins at ``x`` are not all positive. ``steps``, ``start``: the radius search's
    passes and first ball (:func:`gmfast.lipschitz.local_search.margin_radius`)."""
    params = head.classifier_params
    with torch.no_grad():
        pred = head.predict(encoder(x).cpu()).to(lb.device)
    dev = dict(device=lb.device, dtype=torch.float64)
    lam, c0, lam_err, c0_err = tied_margin_rows(params.A.to(**dev), params.beta.to(**dev), pred)
    r = lb.margin_radius(x.detach().to(**dev), lam, c0, norm, domain, steps=steps, start=start,
                         lam_err=lam_err, c0_err=c0_err)
    return pred, r
