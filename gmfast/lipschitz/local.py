"""Local bounds by linear bound propagation (CROWN, Zhang et al. 2018) over the traced graph.

For an input ``x`` and a ball ``B = {x' : ‖x' − x‖_p ≤ ε}`` (``p = 2`` or ``∞``, for ``∞``
optionally intersected with the input domain box), :class:`LocalBounds` returns lower bounds
on linear functions ``Λᵀ f(x')`` of the encoder's output over ``B`` (the margins
``(a_c − a_j)ᵀ h(x') + β_c − β_j`` of a tied head, or ``±`` the output coordinates).

The relaxation (exact arithmetic)
---------------------------------
The graph is linearised once (:class:`_Builder`, the same walk and op vocabulary as the
global bound): every input-dependent node is an *affine* op ``v = W u + b`` (Linear, ConvNd
with zero padding, BatchNorm in eval, average pooling, reshapes, dropout in eval,
multiplication/division by constants, adding a constant), a *sum* ``v = a + α·b`` of two
input-dependent nodes (residual connections), or a *piecewise-linear convex activation*
``σ(z) = max(z, a·z)`` with ``0 ≤ a ≤ 1`` (ReLU ``a = 0``, LeakyReLU). MaxMin is the exact
identity ``(a, b) ↦ (b + r, a − r)``, ``r = relu(a − b)``: a permutation, a difference, a ReLU,
the map ``r ↦ (r, −r)`` and a sum (steps that the trace does not have; the transposes of the
permutation and the difference are exact, that of ``(r, −r)`` rounds once per entry). An AOL
layer is ``F.linear``/``F.conv2d`` with a constant effective weight: the trace records the
weight its forward computes, and that matrix is the affine op's ``W``. Two general kinds
complete the vocabulary: *unary* ``v = f(z)`` elementwise with lines
``al z + bl ≤ f(z) ≤ au z + bu`` valid for every real ``z ∈ [l, u]`` (:mod:`gmfast.lipschitz.relax`:
smooth activations, ``exp``, ``rsqrt``, ...) and *prod* ``v = a·b`` of two input-dependent
tensors (McCormick). A traced op may be several such steps (MaxMin above; LayerNorm, softmax
and attention in :mod:`gmfast.lipschitz.linearize_tf`). A backward pass
carries a linear lower bound ``m(x') ≥ Λ_vᵀ v(x') + c`` from the start node down to the
input:

* through an affine op, ``Λ_uᵀ u + c'`` with ``Λ_u = WᵀΛ_v`` and ``c' = c + Λ_vᵀ b`` (an
  identity; ``Wᵀ`` is the op's transpose: ``Λ W`` for Linear, the transposed convolution
  for Conv, the vector–Jacobian product for data movement and pooling);
* through a sum, ``Λ_v`` goes to ``a`` and ``α Λ_v`` to ``b`` (contributions add);
* through an activation with pre-activation bounds ``l ≤ z ≤ u`` (valid on the whole
  ball): ``σ(z) ≥ α z`` for any ``α ∈ [a, 1]`` (lines through 0 between the two pieces lie
  below the convex ``σ``; CROWN's adaptive choice ``α = 1`` if ``u ≥ −l`` else ``a``), and
  ``σ(z) ≤ s z + t`` with the chord ``s = (u − a l)/(u − l)``, ``t = (s − a)(−l)`` (above
  a convex function between the chord's ends); stable neurons (``l ≥ 0`` or ``u ≤ 0``)
  are exactly linear. A coefficient ``λ ≥ 0`` takes the lower line, ``λ < 0`` the upper:
  ``Λ_z = Λ⁺α + Λ⁻s``, ``c' = c + Λ⁻ᵀt``;
* through ``f`` the same with its lines: ``Λ_z = Λ⁺al + Λ⁻au``, ``c' = c + Σ(Λ⁺bl + Λ⁻bu)``;
* through ``a·b`` with ``a ∈ [la, ua]``, ``b ∈ [lb, ub]`` on the ball:
  ``ab ≥ lb·a + la·b − la·lb`` (the difference is ``(a − la)(b − lb) ≥ 0``) for ``λ ≥ 0`` and
  ``ab ≤ ub·a + la·b − la·ub`` (the difference is ``(a − la)(ub − b) ≥ 0``) for ``λ < 0``:
  ``Λ_a = Λ⁺lb + Λ⁻ub``, ``Λ_b = Λ·la``, ``c' = c + Σ(Λ⁺cL + Λ⁻cU)``;
* at the input, ``min_{x' ∈ B} Λ_0ᵀ x' = Λ_0ᵀ x − ε‖Λ_0‖_q`` (``q`` the dual exponent), or
  ``Σ Λ⁺ lo' + Λ⁻ hi'`` over the box ``[max(x − ε, lo), min(x + ε, hi)]`` for ``ℓ∞`` with a
  domain (that box is exactly ``B ∩ domain``).

Pre-activation bounds ``l, u`` (of the inputs of activations, of ``f`` and of both factors
of a product) come from the same backward pass started at the pre-activation node with
``Λ = ±I`` (full CROWN, in topological order, so every activation below is already
relaxed). The bound holds for every ``x' ∈ B``, so the same bound is valid for every
smaller ball: certifying by bisection on ``ε`` and returning the largest ``ε`` that *passed*
is sound whatever the bisection does.

Where the rows ``±e_i`` of a pass stay the same for every input down to an activation on
a node affine in the input (a second layer's pre-activations: only affine ops between), the
pass is computed for all inputs at once: the shared rows ``L`` once, then, per input, the
activation step and the product with the first layer's Jacobian on each row's nonzero
columns only (a convolution's receptive field; :meth:`LocalBounds._refine_shared`). The
same bounds: the same products, summed in another order, with the same charges.

Floating point
--------------
Everything runs in float64 on the CPU (convolutions as im2col + GEMM: sums of products in
some order; Higham's bound holds for any order, with or without FMA). The certified
function is the encoder with its parameters read exactly as float64 (float32 parameters
are exact in float64). Relaxation parameters need no exactness, only validity: the chord
slope ``s`` is rounded up (``min(1, ŝ(1 + 8u))``: a line through ``(l, a l)`` with a larger
slope lies above the chord on ``[l, u]``), the offset ``t`` is rounded up, and ``l, u`` are
themselves sound bounds computed by this procedure. What is not exact are the identities
of the backward pass; each computed step is charged to a per-row error total ``E``:

* ``Λ̂_u = fl(WᵀΛ_v)`` differs from ``WᵀΛ_v`` by at most ``γ_n |W|ᵀ|Λ_v|`` entrywise
  (``n`` the terms per entry; Higham, Lemma 3.1 / eq. 3.5), so the identity
  ``Λ_vᵀW u = Λ̂_uᵀu + (WᵀΛ_v − Λ̂_u)ᵀu`` costs at most ``γ_n |Λ_v|ᵀ(|W| M_u)`` where
  ``M_u ≥ |u|`` on the ball. ``M`` is propagated forward from ``M_0 = |x| + ε`` by
  ``|W| M + |b|`` (rounded up), replaced by ``max(|l|, |u|)`` at pre-activations whose
  bounds are known. Parameters that are not exactly representable in float64 (BatchNorm's
  ``γ/√(var + ε)``, pooling's ``1/k``, ``1/c``) are counted as extra roundings in ``n``;
  BatchNorm's shift adds ``|Λ_v|ᵀ δb`` with ``δb`` a bound on its error.
* ``Λ_vᵀb`` and ``Λ⁻ᵀt`` are inner products of length ``n``: ``γ_n |Λ|ᵀ|b|``.
* The activation step ``Λ⁺α + Λ⁻s`` rounds once per entry: ``2u |Λ|ᵀ M_z``; sums of two
  ``Λ`` at a residual fork round once per entry: ``u |Λ_sum|ᵀ M``.
* The ``f`` step rounds once per entry of ``Λ_z``: ``u |Λ|ᵀ(max(|al|, |au|) M_z)``; its
  offsets are an inner product: ``γ_{n+1} |Λ|ᵀ max(|bl|, |bu|)``. The lines are valid as
  given (:mod:`gmfast.lipschitz.relax` proves them, rounding included); a neuron whose
  interval is not finite gets ``0·z ∓ ∞`` and the bound becomes ``−∞`` (a NaN from ``∞·0``
  is turned into ``−∞`` at the end: no certificate, never a false one).
* The product step: the slopes are the float bounds themselves (exact), the constants
  ``cL = −la·lb`` and ``cU = −la·ub`` are rounded down/up; ``Λ_a`` and ``Λ_b`` round once per
  entry with slopes bounded by ``M_b`` resp. ``M_a``: ``2u |Λ|ᵀ(M_a M_b)``; the constants'
  inner product ``γ_{n+1}|Λ|ᵀ max(|cL|, |cU|)``. Its interval: the corner products, each
  rounded once and widened by one ulp outward.
* A node ``v = J x + b`` that is affine in the input (a first layer) keeps its pass for the
  rows ``e_i`` (computed ``Ĵ``, ``b̂`` and charges ``E``: ``|e_iᵀv(x') − Ĵ_i x' − b̂_i| ≤ E_i``
  on the ball); later passes stop there, by linearity within ``|Λ|ᵀE``, plus ``γ_k|Λ|ᵀ(|Ĵ|M_0)``
  for ``fl(ΛĴ)`` and ``γ_{k+1}|Λ|ᵀ|b̂|`` for ``Λᵀb̂``. An activation on such a node fuses both
  steps: its slopes are in ``[0, 1]``, so ``|fl(Λ∘slope)| ≤ |Λ|`` and every charge is at most
  ``|Λ|ᵀ(2u M_z + E + γ|Ĵ|M_0 + γ|b̂|)``, one product per row.
* The concretisation: ``Λ_0ᵀx`` within ``γ_n|Λ_0|ᵀ|x|``; ``‖Λ_0‖₂`` bounded above by
  :func:`gmfast._fp.norm_upper`, ``‖Λ_0‖₁`` by ``(1 + γ_n) fl(Σ|λ|)``, then ``ε·N`` raised
  by ``(1 + 2u)``; the box corners rounded outward (``nextafter``), a larger box being
  still sound; each addition into ``c`` is charged ``u(|c| + |term|)``.

Every charged term is a sum of products of nonnegative float64 numbers, hence computed
within a factor ``1 + γ_N`` (``N < 2³⁰``, so ``< 1 + 2⁻²²``) of its exact value; the total is
doubled, which covers that factor with room to spare, and ``2⁻⁹⁶⁰`` is added for every
product that may underflow (Higham eq. 2.8: at most ``2⁻¹⁰⁷⁴`` each, fewer than ``2¹¹⁴``
products). The returned lower bound is ``nextafter(fl(c + val − 2E − tiny), −∞)``, below the
exact value because the last subtraction is the only rounding not yet charged.

Not covered, as for the global route: the encoder's own floating-point error when it runs
(the certificate is for the exact-arithmetic encoder; the local route's margins are bounded
from ``x`` directly, so no latent error term enters them).
"""

from __future__ import annotations

import math

import torch

from gmfast._fp import U64, gamma, norm_upper
from gmfast.lipschitz.graph import check_same_function, trace
from gmfast.lipschitz.linearize import _F64, _TINY, _Builder, _down, _up
from gmfast.lipschitz.local_search import LinearBound, box_radius, margin_radius
from gmfast.lipschitz.local_steps import (SharedRows, act_back, act_interval, act_jacobian_back,
                                          act_jacobian_back_shared, act_relax, jacobian_back, no_nan,
                                          prod_back, prod_interval, prod_relax, rowdot, unary_back, unary_interval,
                                          unary_relax)


# ----------------------------------------------------------------------------- bounds


class LocalBounds:
    """CROWN over one traced encoder (see the module docstring for the proofs).

    ``LocalBounds(encoder, input_shape)`` traces and linearises the encoder (in eval mode,
    refusing unsupported ops with :class:`UnsupportedOpError`); :meth:`lower` gives lower
    bounds of ``Λᵀ f(x') + c0`` over the ball around each input.
    """

    def __init__(self, encoder, input_shape):
        input_shape = tuple(input_shape)
        for name, m in encoder.named_modules():
            if m.training:
                raise ValueError(f"module {name or type(m).__name__!r} is in train mode; call .eval() first (batch "
                                 "norm and dropout compute a different function in training)")
        tg = trace(encoder, input_shape)  # with the trust checks (hooks, overrides, casts, batch coupling)
        b = _Builder(tg)
        out = b.run()
        check_same_function(tg, encoder, input_shape)
        self.ops = {b.order[0]: None} | b.ops
        self.order = b.order  # topological, the input first (traced nodes and steps inside them)
        self.out_node = out
        self.input_shape = input_shape
        self.n_in = math.prod(input_shape)
        self.out_shape = b.shapes[out]
        self.shapes = b.shapes
        #: inputs of the nonlinear ops, whose bounds are refined by CROWN: for ``max(z, a z)``
        #: the neurons an interval leaves unstable; for ``unary``/``prod`` (``pre_all``) all
        #: (a copy's bounds are its source's: the source is refined instead, its rows being fewer)
        self.pre_all = {self._source(m) for n in self.order[1:] for m in self._srcs(n)
                        if self.ops[n].kind in ("unary", "prod")}
        self.pre = [self.ops[n].src for n in self.order[1:] if self.ops[n].kind == "act"] + sorted(
            self.pre_all, key=self.order.index)
        self.n_neurons = sum(math.prod(self.shapes[n]) for n in set(self.pre))
        self._tcache = {}
        #: nodes that are affine functions of the input (no nonlinear op below them)
        self.affine_only = {self.order[0]}
        for n in self.order[1:]:
            if self.ops[n].kind in ("affine", "sum") and all(m in self.affine_only for m in self._srcs(n)):
                self.affine_only.add(n)
        #: (input, neuron) pairs refined per backward pass: bounds the working memory
        self.row_chunk = 4096
        #: optional {refined node: nodes where its pass stops} (:mod:`gmfast.lipschitz.local_cut`)
        self.cuts = None
        #: refinement rows shared down to a first-layer activation are taken in their support
        #: (:meth:`_refine_shared`) when it is at most this fraction of the width (0: never); the
        #: largest temporary of that step, and the most Jacobian entries it keeps, in entries
        self.sparse_ratio, self.sparse_chunk, self.sparse_keep, self._support = 0.25, 2**21, 2**23, {}
        #: radius search (:meth:`margin_radius`): the first ball as a fraction of the
        #: linearisation's estimate, and the growth after passes that all passed (at least
        #: ``growth[0]``×, at most ``growth[1]``× the best radius, else the new estimate)
        self.first_ball, self.growth = 0.5, (2.0, 8.0)
        #: largest Jacobian (entries) of an affine-in-the-input node kept for later passes
        self.jacobian_limit = 2**24
        #: where :meth:`prepare` puts the inputs (:func:`gmfast.lipschitz.local_device.to_device`)
        self.device = torch.device("cpu")

    def _source(self, n):
        """``n``, or for a copy (an affine step marked ``copy``: each entry one entry of its
        input, e.g. a broadcast) the node it copies, recursively."""
        while n is not self.order[0] and self.ops[n].kind == "affine" and getattr(self.ops[n], "copy", False):
            n = self.ops[n].src
        return n

    def _srcs(self, n):
        op = self.ops[n]
        return [op.a, op.b] if op.kind in ("sum", "prod") else [op.src]

    # -- the passes ----------------------------------------------------------------------

    def _intervals(self, n, ctx):
        """Sound interval ``[lo, hi]`` of node ``n`` on the ball from its inputs' intervals
        (interval arithmetic with outward rounding: ``W·mid`` within ``γ_N|W||mid|``)."""
        op, I = self.ops[n], ctx["I"]
        if op.kind == "act":
            return act_interval(*I[op.src], op.a)
        if op.kind == "unary":
            return unary_interval(op.relaxation, *I[op.src])
        if op.kind == "prod":
            return prod_interval(I[op.a], I[op.b])
        if getattr(op, "copy", False) and op.bias is None:
            lo, hi = I[op.src]
            return op.fwd(lo), op.fwd(hi)  # each entry is one entry of the source: exact
        if op.kind == "sum":
            (la, ha), (lb, hb) = I[op.a], I[op.b]
            if op.alpha < 0:
                lb, hb = hb, lb
            lo, hi = la + op.alpha * lb, ha + op.alpha * hb
            w = 4.0 * U64 * (lo.abs() + hi.abs() + la.abs() + ha.abs() + abs(op.alpha) * (lb.abs() + hb.abs()))
            return _down(lo - w), _up(hi + w)
        lo, hi = I[op.src]
        mid, rad = (lo + hi) * 0.5, (hi - lo) * 0.5
        rad = rad + 4.0 * U64 * (mid.abs() + rad.abs())
        N = math.prod(self.shapes[op.src]) + 2
        c = op.fwd(mid)
        r = op.absfwd(rad + gamma(N, U64) * mid.abs() * 2.0)
        if op.bias is not None:
            c = c + op.bias
        if op.bias_err is not None:
            r = r + op.bias_err
        w = r + 4.0 * U64 * (c.abs() + r) + _TINY
        return _down(c - w), _up(c + w)

    def _backward(self, start, lam, ctx, key=None, select=None, raw=False, stop=None, split=False):
        """Lower bounds (B, R) of ``Σ lam·start`` over the ball (``lam`` (1 or B, R, *shape)).

        ``select`` (B, S): with a shared ``lam`` (batch dim 1), input ``b`` keeps only the rows
        ``select[b]``, taken where the rows stop being shared (at the first nonlinear op, so
        the shared part is computed, and cached under ``key``, once); the result is then
        (B, S). A node that is an affine function of the input with a Jacobian in the context
        (:meth:`_exact`) ends the pass there: one product with that matrix and its
        precomputed charges instead of the ops below it. A node of ``stop`` (not ``start``) with
        linear bounds in the input in ``ctx["L"]`` ends its branch: its rows go to the input
        through those bounds (:meth:`gmfast.lipschitz.local_cut.CutLinear.step`).
        ``split`` (shared rows): return where the rows stop being shared instead, as
        ``(node, lam, c, err, pending branches)``.
        """
        B = ctx["x"].shape[0]
        R = lam.shape[1]
        M, relax, J = ctx["M"], ctx["relax"], ctx["J"]
        lams = {start: lam}
        c = torch.zeros((1, R), dtype=_F64)
        err = torch.zeros((B, R), dtype=_F64)
        idx = self.order.index(start)
        inp = self.order[0]
        # rows shared by the whole batch (no selection, no relaxation crossed yet): only these
        # are cached (a batch of one input also has a batch dim of 1, but is not shared)
        shared = lam.shape[0] == 1 and key is not None
        for n in reversed(self.order[:idx + 1]):
            if n not in lams:
                continue
            lam = lams.pop(n)
            op = self.ops[n]
            jac = n in J and n is not start
            cut = stop is not None and n in stop and n is not start and n in ctx.get("L", ())
            if split and (n is inp or jac or cut or op.kind in ("act", "unary", "prod")):
                return n, lam, c, err, lams
            if select is not None and (n is inp or jac or cut or op.kind in ("act", "unary", "prod")):
                # the rows stop being shared here: each input keeps its selected rows
                lam = lam[0][select]
                lams = {k: v[0][select] for k, v in lams.items()}  # pending branches of a fork
                c = c[0][select]
                err = torch.gather(err, 1, select)
                select, shared = None, False
            if n is inp:
                return (lam, c, err) if raw else self._concretize(lam, c, err, ctx)
            if cut:
                new, tt, e = ctx["L"][n].step(lam, c)
                c, err_ref = c + tt, [err + e]
                self._accumulate(lams, inp, new, M, err_ref)
                err = err_ref[0]
                continue
            Bl, R = lam.shape[:2]
            if jac or op.kind in ("act", "unary", "prod"):
                shared = False
            if jac:
                new, tt, e = jacobian_back(lam, c, J[n], self.input_shape)
                c, err_ref = c + tt, [err + e]
                self._accumulate(lams, inp, new, M, err_ref)
                err = err_ref[0]
            elif op.kind == "affine":
                # one pass over |Λ| for every charged term of this step
                err = err + rowdot(lam.abs(), ctx["V"][n])
                if op.bias is not None:
                    tb = rowdot(lam, op.bias.unsqueeze(0))
                    err = err + U64 * (c.abs() + tb.abs())
                    c = c + tb
                shp = self.shapes[op.src]
                # rows shared by the whole batch (no activation crossed yet) do not depend
                # on the input: their transposes are computed once per start node
                ck = (key, n) if shared else None
                new = self._tcache.get(ck) if ck is not None else None
                if new is None:
                    new = op.T(lam.reshape((Bl * R,) + self.shapes[n])).reshape((Bl, R) + shp)
                    if ck is not None:
                        self._tcache[ck] = new
                self._accumulate(lams, op.src, new, M, err_ref := [err])
                err = err_ref[0]
            elif op.kind == "sum":
                err_ref = [err]
                self._accumulate(lams, op.a, lam, M, err_ref)
                scaled = lam * op.alpha
                if op.alpha not in (1.0, -1.0):
                    err_ref[0] = err_ref[0] + U64 * rowdot(scaled.abs(), M[op.b])
                self._accumulate(lams, op.b, scaled, M, err_ref)
                err = err_ref[0]
            elif op.kind == "prod":
                new_a, new_b, tt, e = prod_back(lam, relax[n], c)
                c, err_ref = c + tt, [err + e]
                self._accumulate(lams, op.a, new_a, M, err_ref)
                self._accumulate(lams, op.b, new_b, M, err_ref)
                err = err_ref[0]
            elif op.kind == "act" and op.src in J and op.src is not start:
                new, tt, e = act_jacobian_back(lam, relax[n], J[op.src], self._fused_charges(op.src, ctx), c)
                c, err_ref = c + tt, [err + e]
                self._accumulate(lams, inp, new.reshape((Bl, R) + self.input_shape), M, err_ref)
                err = err_ref[0]
            else:
                if op.kind == "act":
                    new, tt, e = act_back(lam, relax[n], M[op.src], c)
                else:
                    new, tt, e = unary_back(lam, relax[n], c)
                c, err_ref = c + tt, [err + e]
                self._accumulate(lams, op.src, new, M, err_ref)
                err = err_ref[0]
        raise RuntimeError("the backward pass did not reach the input")

    def _fused_charges(self, n, ctx):
        """Per input, the charge per unit of ``|Λ|`` of :func:`act_jacobian_back` at the
        activation whose input is ``n`` (cached in the context)."""
        W = ctx["W"].get(n)
        if W is None:
            _, cv, E, JM = ctx["J"][n]
            k = cv.numel()
            M = ctx["M"][n].reshape(E.shape)
            W = ctx["W"][n] = 2.0 * U64 * M + E + gamma(k + 2, U64) * JM + gamma(k + 1, U64) * cv.abs().unsqueeze(0)
        return W

    @staticmethod
    def _accumulate(lams, node, new, M, err_ref):
        if node in lams:
            total = lams[node] + new
            err_ref[0] = err_ref[0] + U64 * rowdot(total.abs(), M[node])
            lams[node] = total
        else:
            lams[node] = new

    def _concretize(self, lam, c, err, ctx, eps=None):
        """The lower bound over the ball of radius ``eps`` (default: the context's; a smaller
        one reuses the relaxation, valid on every smaller ball, and its error terms, which
        were computed with magnitudes of the larger ball)."""
        x, norm, domain = ctx["x"], ctx["norm"], ctx["domain"]
        if eps is None:
            eps = ctx["eps"]
        elif bool((eps > ctx["eps"]).any()):
            raise ValueError("the relaxation was computed for a smaller ball")
        B = x.shape[0]
        Bl, R = lam.shape[:2]
        lf = lam.reshape(Bl, R, -1)
        xf = x.reshape(B, -1)
        n = xf.shape[1]
        e = eps.reshape(B, 1)
        if norm == math.inf and domain is not None:
            lo = _down(torch.clamp(x - eps.reshape((B,) + (1,) * (x.dim() - 1)), min=domain[0])).reshape(B, -1)
            hi = _up(torch.clamp(x + eps.reshape((B,) + (1,) * (x.dim() - 1)), max=domain[1])).reshape(B, -1)
            lfb = lf.expand(B, R, n)
            val = (lfb.clamp(min=0) * lo.unsqueeze(1) + lfb.clamp(max=0) * hi.unsqueeze(1)).sum(-1)
            err = err + gamma(n + 1, U64) * rowdot(lam.abs(), torch.maximum(lo.abs(), hi.abs()))
        else:
            center = rowdot(lam, xf)
            if norm == 2:
                N = norm_upper(lf, dim=-1)
            else:
                N = lf.abs().sum(-1) * (1.0 + gamma(n + 1, U64))
            rad = e * N.expand(B, R) * (1.0 + 2.0 * U64)
            val = center - rad
            err = err + gamma(n + 1, U64) * rowdot(lam.abs(), xf.abs()) + U64 * (center.abs() + rad)
        total = c + val
        err = err + U64 * (c.abs() + val.abs() + total.abs())
        low = _down(total - (2.0 * err + _TINY))
        # NaN only from ∞·0 (a vacuous relaxation of an unbounded neuron): no bound
        return torch.where(torch.isnan(low), -math.inf, low)

    # -- public --------------------------------------------------------------------------

    def prepare(self, x, eps, norm, domain=None, prior=None):
        """Pre-activation bounds and relaxations for the balls of radius ``eps`` (B,)
        around ``x`` (B, *input_shape): the context :meth:`lower` uses.

        Every node gets a sound interval (interval arithmetic); each pre-activation's
        neurons that the interval leaves unstable are refined by CROWN (the intersection of
        two sound bounds is sound), the rest keep the interval. ``prior``: a context computed
        for the same inputs; for each input whose ball lies inside its ball there, its
        intervals are valid here too and are intersected in before refining (fewer rows)."""
        x = x.detach().to(self.device, _F64)
        B = x.shape[0]
        eps = torch.as_tensor(eps, dtype=_F64).reshape(-1).expand(B).clone()
        e = eps.reshape((B,) + (1,) * len(self.input_shape))
        lo, hi = _down(x - e), _up(x + e)
        if domain is not None and norm == math.inf:
            lo, hi = lo.clamp(min=domain[0]), hi.clamp(max=domain[1])
        I = {self.order[0]: (lo, hi)}
        M = {self.order[0]: torch.maximum(lo.abs(), hi.abs())}
        ctx = dict(x=x, eps=eps, norm=norm, domain=domain, M=M, I=I, relax={}, V={}, J={}, W={})
        pre = set(self.pre)
        for n in self.order[1:]:
            op = self.ops[n]
            if op.kind == "act":
                ctx["relax"][n] = act_relax(*I[op.src], op.a)
            elif op.kind == "unary":
                ctx["relax"][n] = unary_relax(op.relaxation, *I[op.src], M[op.src])
            elif op.kind == "prod":
                ctx["relax"][n] = prod_relax(I[op.a], I[op.b], M[op.a], M[op.b])
            elif op.kind == "affine":
                ctx["V"][n] = self._charges(n, M)
            I[n] = no_nan(*self._intervals(n, ctx))
            if prior is not None and n in pre:
                inside = (eps <= prior["eps"]).reshape((B,) + (1,) * len(self.shapes[n]))
                plo, phi = prior["I"][n]
                I[n] = (torch.where(inside, torch.maximum(I[n][0], plo), I[n][0]),
                        torch.where(inside, torch.minimum(I[n][1], phi), I[n][1]))
            if n in pre:
                I[n] = no_nan(*(self._exact(n, ctx) if n in self.affine_only else self._refine(n, ctx)))
            M[n] = torch.maximum(I[n][0].abs(), I[n][1].abs())
        return ctx

    def _charges(self, n, M):
        """Per input, what one unit of ``|Λ|`` at affine node ``n`` is charged (B, *shape):
        ``γ_n|W|M + γ|b| + δb`` (see the module docstring)."""
        op = self.ops[n]
        V = gamma(op.n, U64) * op.absfwd(M[op.src])
        if op.bias is not None:
            V = V + gamma(op.bias.numel() + 1, U64) * op.bias.abs()
        if op.bias_err is not None:
            V = V + op.bias_err
        return V

    def _exact(self, n, ctx):
        """Bounds of a node that is an affine function of the input (no nonlinear op below):
        the backward rows ``e_i`` are shared by the whole batch (their transposes cached);
        the rows ``−e_i`` give exactly the negated pass (negation is exact). The pass — the
        computed Jacobian ``Ĵ``, constants ``b̂`` and charges ``E`` — is kept in the context
        (when ``Ĵ`` has at most ``jacobian_limit`` entries), so later passes end at ``n``
        (:func:`jacobian_back`)."""
        shape = self.shapes[n]
        k = math.prod(shape)
        B = ctx["x"].shape[0]
        eye = torch.eye(k, dtype=_F64).reshape((1, k) + shape)
        lam0, c, err = self._backward(n, eye, ctx, key=(n, 1), raw=True)
        lo = self._concretize(lam0, c, err, ctx).reshape((B,) + shape)
        hi = -self._concretize(-lam0, -c, err, ctx).reshape((B,) + shape)
        if k * self.n_in <= self.jacobian_limit:
            Jh = lam0.reshape(k, self.n_in)
            M0 = ctx["M"][self.order[0]].reshape(B, -1)
            JM = (M0 @ Jh.abs().T) * (1.0 + 2.0 * gamma(self.n_in + 2, U64)) + _TINY
            ctx["J"][n] = (Jh, c[0], err, JM)
        l0, h0 = ctx["I"][n]
        return torch.maximum(lo, l0), torch.minimum(hi, h0)

    def _refine(self, n, ctx):
        """CROWN bounds on the neurons of ``n`` whose interval straddles 0 (all neurons of
        a non-degenerate interval when ``n`` feeds a smooth function or a product)."""
        lo, hi = ctx["I"][n]
        B = lo.shape[0]
        shape = self.shapes[n]
        k = math.prod(shape)
        lo, hi = lo.reshape(B, k).clone(), hi.reshape(B, k).clone()
        unstable = (lo < hi) if n in self.pre_all else (lo < 0) & (hi > 0)
        count = unstable.sum(1)
        S = int(count.max())
        if S == 0:
            return ctx["I"][n]
        stop = self.cuts.get(n) if self.cuts else None
        if stop is None and self._refine_shared(n, ctx, unstable, lo, hi):
            return lo.reshape((B,) + shape), hi.reshape((B,) + shape)
        # per input, its unstable neurons first (stable ones after them are padding, left as they are)
        first = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :S]
        valid = torch.arange(S).unsqueeze(0) < count.unsqueeze(1)
        # rows 0..k-1 bound the neurons from below, k..2k-1 (negated) from above: one pass
        eye = torch.eye(k, dtype=_F64)
        both = torch.cat([eye, -eye]).reshape((1, 2 * k) + shape)
        step = max(1, self.row_chunk // (2 * B))
        for j in range(0, S, step):
            sel, v = first[:, j:j + step], valid[:, j:j + step]
            out = self._backward(n, both, ctx, key=(n, 0), select=torch.cat([sel, sel + k], 1), stop=stop)
            m = sel.shape[1]
            lo_s, hi_s = lo.gather(1, sel), hi.gather(1, sel)
            lo.scatter_(1, sel, torch.where(v, torch.maximum(lo_s, out[:, :m]), lo_s))
            hi.scatter_(1, sel, torch.where(v, torch.minimum(hi_s, -out[:, m:]), hi_s))
        return lo.reshape((B,) + shape), hi.reshape((B,) + shape)

    def _refine_shared(self, n, ctx, unstable, lo, hi):
        """The refinement pass of ``n`` when its rows ``±e_i`` stay shared by the batch down to
        an activation on a node with a kept Jacobian (a second layer's pre-activations) and are
        sparse there (a convolution's receptive field): for all inputs at once, in the rows'
        support (:func:`act_jacobian_back_shared`), instead of each input's rows padded to the
        batch's most. Intersects the bounds into ``lo``, ``hi`` (B, k) of the unstable neurons;
        False (nothing done) when the pass is not of that form."""
        shape = self.shapes[n]
        k = math.prod(shape)
        if self.sparse_ratio <= 0 or self._support.get(n, ()) is None:
            return False
        m, L, c, err, pending = self._backward(n, torch.eye(k, dtype=_F64).reshape((1, k) + shape), ctx,
                                               key=(n, 1), split=True)
        op = self.ops[m]
        if pending or op is None or op.kind != "act" or op.src is n:
            self._support[n] = None  # the graph's form: not for this node
        if self._support.get(n, ()) is None or op.src not in ctx["J"]:
            return False
        if n not in self._support or self._support[n][0] is not L:  # the shared rows come from the transpose cache
            sh = SharedRows(L.reshape(k, -1))
            self._support[n] = (L, sh) if sh.p <= self.sparse_ratio * sh.w else None
            if self._support[n] is None:
                return False
        sh = self._support[n][1]
        (alpha, s, t), jac = ctx["relax"][m], ctx["J"][op.src]
        B = unstable.shape[0]
        slopes = torch.cat([alpha.reshape(B, -1), s.reshape(B, -1)], 1).T.contiguous()
        side = sh.side_products(t.reshape(B, -1), self._fused_charges(op.src, ctx).reshape(B, -1))
        # per neuron: 2B rows of p entries, p rows of Ĵ, 2B rows on the input
        step = max(1, self.sparse_chunk // max(2 * B * sh.p, sh.p * (self.n_in + 1), 2 * B * (self.n_in + 1)))
        for j in range(0, k, step):
            sl = slice(j, min(j + step, k))
            u = unstable[:, sl]
            if not bool(u.any()):
                continue
            c2, e2 = torch.cat([c[:, sl], -c[:, sl]], 1), torch.cat([err[:, sl], err[:, sl]], 1)
            G = sh.jacobian_rows(jac[0], jac[1], sl, self.sparse_keep)
            rows, tt, e = act_jacobian_back_shared(sh, sl, slopes, side, G, c2)
            out = self._concretize(rows.reshape((B, -1) + self.input_shape), c2 + tt, e2 + e, ctx)
            kc = sl.stop - j
            lo[:, sl] = torch.where(u, torch.maximum(lo[:, sl], out[:, :kc]), lo[:, sl])
            hi[:, sl] = torch.where(u, torch.minimum(hi[:, sl], -out[:, kc:]), hi[:, sl])
        return True

    def lower(self, lam, ctx, c0=None):
        """Lower bounds (B, R) of ``lam·f(x') + c0`` over each ball; ``lam`` (B or 1, R, d)
        with ``d`` the output's size, ``c0`` (B, R) float64 (exact values) or None."""
        return self.linear_bound(lam, ctx, c0).at()

    def linear_bound(self, lam, ctx, c0=None, lam_err=None, c0_err=None) -> "LinearBound":
        """The backward pass of :meth:`lower`, kept so that it can be concretised over any
        smaller ball (:class:`LinearBound`). ``lam_err`` (like ``lam``) and ``c0_err``
        (B, R): bounds on how far the exact coefficients are from the given ones (each
        costs ``lam_errᵀ M_out + c0_err``, with ``M_out ≥ |f|`` on the ball)."""
        Bl, R = lam.shape[:2]
        lam = lam.to(_F64).reshape((Bl, R) + self.out_shape)
        lam0, c, err = self._backward(self.out_node, lam, ctx, raw=True)
        if lam_err is not None:
            err = err + rowdot(lam_err.to(_F64).reshape(lam.shape), ctx["M"][self.out_node])
        if c0_err is not None:
            err = err + c0_err
        if c0 is not None:
            total = c + c0
            err = err + U64 * (c.abs() + c0.abs() + total.abs())
            c = total
        return LinearBound(self, lam0, c, err, ctx)

    def margin_radius(self, x, lam, c0, norm, domain=None, steps: int = 4, start=None, lam_err=None, c0_err=None,
                      floor=None):
        """Largest certified radius (B,) float64 for ``lam·f + c0 > 0`` (every row) per input
        (:func:`gmfast.lipschitz.local_search.margin_radius`)."""
        return margin_radius(self, x, lam, c0, norm, domain, steps, start, lam_err, c0_err, floor)

    def box_radius(self, x, accept, norm, domain=None, steps: int = 8, start=None):
        """Largest ``ε`` (B,) with ``accept`` true on the output box over the ball
        (:func:`gmfast.lipschitz.local_search.box_radius`)."""
        return box_radius(self, x, accept, norm, domain, steps, start)

    def output_box(self, ctx):
        """Sound bounds (lo, hi), each (B, d), on the flattened output over each ball."""
        B = ctx["x"].shape[0]
        shape = self.out_shape
        k = math.prod(shape)
        eye = torch.eye(k, dtype=_F64).reshape((1, k) + shape)
        lb = self._backward(self.out_node, eye, ctx, key=(self.out_node, 1))
        ub = -self._backward(self.out_node, -eye, ctx, key=(self.out_node, -1))
        lo, hi = ctx["I"][self.out_node]
        return torch.maximum(lo.reshape(B, -1), lb), torch.minimum(hi.reshape(B, -1), ub)
