"""Linearisation rules for transformer encoders: LayerNorm, softmax, products of two
input-dependent tensors (attention's ``Q Kᵀ`` and ``P V``), mean/sum reductions and the
elementwise primitives (``exp``, ``sqrt``, ``rsqrt``, ``reciprocal``, ``square``, ``pow``).

:class:`TransformerRules` is a mixin of the local route's builder
(:class:`gmfast.lipschitz.linearize._Builder`): each rule rewrites one traced op as an exact
composition of the builder's steps — affine maps (``structural``: copies, sums and means
with nonnegative weights; ``linear``; ``scale``; ``shift``), sums of two input-dependent
tensors, elementwise functions relaxed by :mod:`gmfast.lipschitz.relax` (``unary``) and
elementwise products (``product``, McCormick) — so soundness is the engine's (the backward
pass and its rounding charges, :mod:`gmfast.lipschitz.local`) and the relaxations' (each
proven in :mod:`gmfast.lipschitz.relax`); what each rule must get right is that the
composition *is* the op in exact arithmetic, and the γ index ``n`` of each affine step (the
most terms any entry of the step or of its transpose sums, plus one per rounded weight).

* **LayerNorm** over the last ``k`` dims (``d`` entries): ``c = x − mean(x)`` (a mean, weights
  ``1/d``: ``n = d + 2``, broadcast back, and a difference), ``v = mean(c²)`` (``square``,
  then a mean), ``r = rsqrt(v + ε)`` with the floor ``ε``: ``v + ε ≥ ε`` holds for the exact
  values (``v`` is a mean of squares), so the relaxation may intersect its interval with
  ``[ε, ∞)``; ``y = c · r`` (``r`` broadcast: a copy whose transpose sums ``d`` terms), then
  ``γ ⊙ y + β`` (exact float64 parameters; one rounding per entry).
* **softmax** over a dim of size ``T``: ``softmax_i(x) = 1 / Σ_j exp(x_j − x_i)`` (Shi et al.
  2020 relax ``exp`` then the sum's reciprocal). The differences ``D_ij = x_j − x_i`` are two
  copies (``n = T``) and a difference; ``exp`` and the sum over ``j`` (``n = T``) follow, and
  ``reciprocal`` with the floor 1: the ``j = i`` term is ``exp(0) = 1`` and the others are
  positive, so every exact denominator is ``≥ 1``. No product is needed, and ``exp`` sees only
  differences (no overflow for any logits the model can produce in float32).
* **x @ y**, both input-dependent, ``(…, n, k) @ (…, k, m)`` with the same leading dims:
  ``Σ_k a_{ik} b_{kj}``: both operands copied to ``(…, n, k, m)`` (transposes sum ``m`` and
  ``n`` terms), an elementwise product, a sum over ``k``. With a constant operand: ``x @ W``
  is a linear layer of weight ``Wᵀ``; ``W @ x`` is ``(xᵀ Wᵀ)ᵀ`` (two transposes, exact).
* **mean / sum** over dims (not the batch: the trace's batch check), weights ``1/N`` or 1.
* ``x ** p`` for ``p ∈ {2, 0.5, −0.5, −1}`` is ``square``, ``sqrt``, ``rsqrt``, ``reciprocal``;
  ``p = 1`` the identity.

``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` (fused kernels; the latter
a leaf module) are refused with advice to write attention with explicit ops.
"""

from __future__ import annotations

import math

import torch

from gmfast.lipschitz import relax
from gmfast.lipschitz.errors import UnsupportedOpError
from gmfast.lipschitz.ops import arg

_F64 = torch.float64
_POWERS = {2: "square", 2.0: "square", 0.5: "sqrt", -0.5: "rsqrt", -1: "reciprocal", -1.0: "reciprocal"}


class TransformerRules:
    """Rules of the local route's builder for transformer ops (see the module docstring).
    Mixed into :class:`gmfast.lipschitz.linearize._Builder`, whose helpers it calls."""

    # -- helpers -------------------------------------------------------------------------

    def _relaxation(self, name, params=None):
        try:
            return relax.get(name, params)
        except UnsupportedOpError as e:
            self.fail(name, str(e))

    def _copy(self, x, run, n, what):
        """A copy (broadcast) of ``x``: nonnegative 0/1 weights, transpose sums ``n`` terms."""
        step = self.structural(x, run, n, what=what)
        op = self.ops.get(step)
        if op is not None:
            op.copy = True  # its interval is its source's: the engine may refine the source instead
        return step

    # -- LayerNorm -----------------------------------------------------------------------

    def module_layer_norm(self, node, mod):
        x = self.single()
        return self.layer_norm(x, tuple(mod.normalized_shape), mod.weight, mod.bias, mod.eps)

    def rule_layer_norm(self, node):
        x = self.single()
        ns = arg(node, 1, "normalized_shape")
        ns = tuple(ns) if isinstance(ns, (tuple, list, torch.Size)) else (ns,)
        if not all(isinstance(v, int) for v in ns):
            self.fail("layer_norm", f"normalized_shape {ns!r} is not a tuple of ints")
        w, b = arg(node, 2, "weight"), arg(node, 3, "bias")
        w = None if w is None else self.const_value(w, "layer_norm weight")
        b = None if b is None else self.const_value(b, "layer_norm bias")
        eps = arg(node, 4, "eps", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool):
            self.fail("layer_norm", f"eps={eps!r} is not a python number")
        return self.layer_norm(x, ns, w, b, eps)

    def layer_norm(self, x, ns, weight, bias, eps):
        shape = self.shape(x)
        k = len(ns)
        if tuple(shape[len(shape) - k:]) != tuple(ns) or k == 0:
            self.fail("layer_norm", f"normalized_shape {ns} does not match the trailing dims of {shape}")
        dims = tuple(range(-k, 0))
        d = math.prod(ns)
        eps = float(eps)
        if not eps >= 0:
            self.fail("layer_norm", f"eps={eps!r} < 0")
        mean = self.structural(x, lambda t: t.mean(dims, keepdim=True).expand(t.shape), d + 2, what="mean")
        c = self.sum(x, mean, -1.0, what="center")
        sq = self.unary(c, self._relaxation("square"), what="square")
        var = self.structural(sq, lambda t: t.mean(dims, keepdim=True), d + 2, what="var")
        ve = self.shift(var, torch.tensor(eps, dtype=_F64), exact=True, what="var+eps")
        r = self.unary(ve, self._relaxation("rsqrt", {"floor": eps} if eps > 0 else None), what="rsqrt")
        rb = self._copy(r, lambda t: t.expand(t.shape[:t.dim() - k] + tuple(ns)), d, "rsqrt_b")
        y = self.product(c, rb, what="normalize" if weight is not None or bias is not None else None)
        if weight is not None:
            w = weight.detach().cpu().to(_F64) if isinstance(weight, torch.Tensor) else torch.tensor(weight, dtype=_F64)
            y = self.scale(y, w, 1, what="weight" if bias is not None else None)
        if bias is not None:
            b = bias.detach().cpu().to(_F64) if isinstance(bias, torch.Tensor) else torch.tensor(bias, dtype=_F64)
            y = self.shift(y, b, exact=True)
        return y

    # -- softmax -------------------------------------------------------------------------

    def module_softmax(self, node, mod):
        x = self.single()
        return self.softmax(x, mod.dim)

    def rule_softmax(self, node):
        x = self.single()
        return self.softmax(x, arg(node, 1, "dim"))  # a dtype argument is a cast: checked by the trace

    def softmax(self, x, dim):
        shape = self.shape(x)
        if not isinstance(dim, int):
            self.fail("softmax", f"dim={dim!r}: an explicit integer dim is needed")
        dim = dim % (len(shape) + 1) - 1  # without the batch dim
        if not 0 <= dim < len(shape):
            self.fail("softmax", "softmax over the batch dimension")
        last = dim == len(shape) - 1
        if not last:
            x = self.structural(x, lambda t: t.movedim(dim + 1, -1), 1, what="to_last")
        T = self.shape(x)[-1]
        xj = self._copy(x, lambda t: t.unsqueeze(-2).expand(t.shape + (T,)), T, "x_j")
        xi = self._copy(x, lambda t: t.unsqueeze(-1).expand(t.shape + (T,)), T, "x_i")
        diff = self.sum(xj, xi, -1.0, what="x_j-x_i")  # D[..., i, j] = x_j − x_i
        e = self.unary(diff, self._relaxation("exp"), what="exp")
        s = self.structural(e, lambda t: t.sum(-1), T, what="denominator")
        p = self.unary(s, self._relaxation("reciprocal", {"floor": 1.0}), what=None if last else "softmax")
        if not last:
            p = self.structural(p, lambda t: t.movedim(-1, dim + 1), 1)
        return p

    # -- products ------------------------------------------------------------------------

    def rule_matmul(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if self.is_dep(a) and self.is_dep(b):
            return self.matmul(a, b)
        if self.is_dep(a):
            W = self.const_value(b, self.op_name())
            if W.dim() != 2:
                self.fail(self.op_name(), f"x @ W with a constant of shape {tuple(W.shape)} (a matrix is supported)")
            return self.linear(a, W.T, None)
        W = self.const_value(a, self.op_name())
        if W.dim() != 2 or len(self.shape(b)) < 2:
            self.fail(self.op_name(), f"W @ x with a constant of shape {tuple(W.shape)} and x of shape "
                      f"{self.shape(b)} (a matrix times a batch of matrices is supported)")
        xt = self.structural(b, lambda t: t.transpose(-1, -2), 1, what="transpose")
        y = self.linear(xt, W, None, what="W")
        return self.structural(y, lambda t: t.transpose(-1, -2), 1)

    def matmul(self, a, b):
        sa, sb = self.shape(a), self.shape(b)
        if len(sa) < 2 or len(sb) < 2 or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            self.fail(self.op_name(), f"product of input-dependent tensors of shapes {sa} @ {sb} (needs (..., n, k) "
                      "@ (..., k, m) with the same leading dims)")
        n, k, m = sa[-2], sa[-1], sb[-1]
        ae = self._copy(a, lambda t: t.unsqueeze(-1).expand(t.shape + (m,)), m, "lhs")
        be = self._copy(b, lambda t: t.unsqueeze(-3).expand(t.shape[:-2] + (n, k, m)), n, "rhs")
        p = self.product(ae, be, what="products")
        return self.structural(p, lambda t: t.sum(-2), k)

    def mul_dep(self, a, b):
        """``a * b``, both input-dependent, broadcast to the current node's shape (copies)."""
        out = tuple(torch.broadcast_shapes(self.shape(a), self.shape(b)))
        ops = []
        for x, what in ((a, "lhs"), (b, "rhs")):
            sx = self.shape(x)
            if tuple(sx) != out:
                if len(sx) > len(out):
                    self.fail(self.op_name(), f"an operand of shape {sx} larger than the result {out}")
                lead = (1,) * (len(out) - len(sx))
                reps = math.prod(out) // max(1, math.prod(sx))
                x = self._copy(x, lambda t, lead=lead: t.reshape(t.shape[:1] + lead + t.shape[1:]).expand(
                    t.shape[:1] + out), reps, what)
            ops.append(x)
        return self.product(ops[0], ops[1])

    def div_dep(self, a, b, c=None):
        """``a / b`` with an input-dependent divisor: ``a * reciprocal(b)``; ``a = None``:
        ``c / b`` with a constant ``c`` (``c * reciprocal(b)``, ``c`` exact)."""
        r = self.unary(b, self._relaxation("reciprocal"), what="reciprocal")
        if a is None:
            return self.scale(r, c, 1)
        return self.mul_dep(a, r)

    # -- reductions ----------------------------------------------------------------------

    def _reduce(self, node, kind):
        x = self.single()
        run = self.runner(node, x)
        shape = self.shape(x)
        with torch.no_grad():
            out = run(torch.zeros((1,) + shape, dtype=_F64))
        N = max(1, math.prod(shape) // max(1, out.numel()))  # entries per reduced entry
        return self.structural(x, run, N + 2 if kind == "mean" else N)

    def rule_mean(self, node):
        return self._reduce(node, "mean")

    def rule_sum(self, node):
        return self._reduce(node, "sum")

    def rule_getitem(self, node):
        """Basic indexing (ints, slices with a positive step, ``None``, ``...``): every entry of
        ``x`` lands at most once in the result, so the transpose sums one term (``n = 1``)."""
        x = self.single()
        (idx,), _ = self.resolve(((node.args[1],), {}), x, None)  # shape queries: their recorded values
        parts = idx if isinstance(idx, tuple) else (idx,)

        def basic(p):
            if p is None or p is Ellipsis or (isinstance(p, int) and not isinstance(p, bool)):
                return True
            return isinstance(p, slice) and all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                                for v in (p.start, p.stop, p.step)) and (p.step or 1) > 0
        if not all(basic(p) for p in parts):
            self.fail("getitem", f"index {idx!r}: only ints, slices with a positive step, None and ... (a tensor "
                      "index may repeat entries)")
        return self.structural(x, lambda t: t[idx], 1)

    # -- elementwise primitives ----------------------------------------------------------

    def _primitive(self, name):
        return self.unary(self.single(), self._relaxation(name))

    def rule_exp(self, node):
        return self._primitive("exp")

    def rule_sqrt(self, node):
        return self._primitive("sqrt")

    def rule_rsqrt(self, node):
        return self._primitive("rsqrt")

    def rule_reciprocal(self, node):
        return self._primitive("reciprocal")

    def rule_square(self, node):
        return self._primitive("square")

    def rule_pow(self, node):
        x = self.single()
        p = arg(node, 1, "exponent")
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            self.fail("pow", f"exponent {p!r}: a python number in {{1, 2, 0.5, -0.5, -1}} is supported")
        if p == 1:
            return self.structural(x, lambda t: t, 1)
        if p not in _POWERS:
            self.fail("pow", f"exponent {p!r}: only 1, 2, 0.5, -0.5 and -1 are relaxed")
        return self.unary(x, self._relaxation(_POWERS[p]))

    # -- refused -------------------------------------------------------------------------

    def rule_attention(self, node):
        self.fail("scaled_dot_product_attention", "a fused kernel; write attention with explicit ops (q @ "
                  "k.transpose(-2, -1) * scale, softmax(dim=-1), @ v) so that each step is relaxed")
