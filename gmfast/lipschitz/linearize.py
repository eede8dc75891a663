"""The linearisation of a traced encoder for the local bounds (:mod:`gmfast.lipschitz.local`).

:class:`_Builder` walks the traced graph (the same walk and op vocabulary as the global
bound) and turns every input-dependent node into one of three linearised ops (or, for MaxMin,
a few of them: :meth:`_Builder.module_group_sort`): an affine op
``v = W u + b`` (:class:`_Affine`: its transpose ``T``, an upper bound ``absfwd`` on
``|W| M`` and the γ index of ``T``), a sum of two input-dependent nodes (:class:`_Sum`), or
a piecewise-linear convex activation ``max(z, a z)`` (:class:`_Act`); anything else is
refused with :class:`UnsupportedOpError`. Why each op's transpose, ``|W|`` bound and error
allowances are what the backward pass needs is in the docstring of
:mod:`gmfast.lipschitz.local` ("The relaxation", "Floating point").
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from gmfast._fp import U64, gamma
from gmfast.lipschitz.errors import UnsupportedOpError
from gmfast.lipschitz.graph import TracedGraph
from gmfast.lipschitz.linearize_tf import TransformerRules
from gmfast.lipschitz.lipnet_rules import GroupSort
from gmfast.lipschitz import activations, relax
from gmfast.lipschitz.ops import CONVS, FUNCTION_NAMES, arg, shape_of
from gmfast.lipschitz.walk import Analysis

_F64 = torch.float64
#: per-product underflow allowance, generous (see the module docstring)
_TINY = 2.0**-960
_LOCAL_ADVICE = ("the local route supports Linear, ConvNd (zero padding; also functional with constant weights, "
                 "e.g. AOL layers), BatchNorm (eval), average pooling, reshapes, residual adds, scaling by "
                 "constants, ReLU/LeakyReLU, MaxMin, the smooth activations gmfast.lipschitz.relax relaxes "
                 "and products of input-dependent tensors; use method='lipschitz' or 'margin' for this encoder")


def _down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, math.inf))


# ----------------------------------------------------------------------------- linearised ops


class _Affine:
    """``v = W u + b``. ``T(lam)``: ``Wᵀ`` on rows ``lam`` (M, *out) → (M, *in), computed;
    ``absfwd(M)``: an upper bound on ``|W| M`` (B, *in) → (B, *out); ``n``: the γ index of
    ``T`` (terms per entry plus roundings of inexact parameters); ``bias`` (*out) or None,
    ``bias_err`` (*out) bound on ``|b̂ − b|`` or None."""

    kind = "affine"

    def __init__(self, src, T, absfwd, n, bias=None, bias_err=None, fwd=None):
        self.src, self.T, self.absfwd, self.n = src, T, absfwd, n
        self.bias, self.bias_err, self.fwd = bias, bias_err, fwd


class _Act:
    """``σ(z) = max(z, a z)``, ``0 ≤ a ≤ 1``."""

    kind = "act"

    def __init__(self, src, a: float):
        self.src, self.a = src, float(a)


class _Sum:
    """``v = a + α b`` of two input-dependent nodes."""

    kind = "sum"

    def __init__(self, a, b, alpha: float):
        self.a, self.b, self.alpha = a, b, float(alpha)


class _Unary:
    """``v = f(z)`` elementwise, relaxed by ``relaxation`` (:class:`gmfast.lipschitz.relax.Relaxation`:
    lines valid on any interval, and a range)."""

    kind = "unary"

    def __init__(self, src, relaxation):
        self.src, self.relaxation = src, relaxation


class _Prod:
    """``v = a · b`` elementwise, both input-dependent, same shape (McCormick planes)."""

    kind = "prod"

    def __init__(self, a, b):
        self.a, self.b = a, b


def _inflate(t: torch.Tensor, n: int) -> torch.Tensor:
    """An upper bound on the exact value of a computed nonnegative sum of ``n`` products."""
    return t * (1.0 + 2.0 * gamma(n + 2, U64)) + _TINY


class _Step:
    """A node of the linearisation: the result of one linearised op. A traced node is one
    step, or several (MaxMin, LayerNorm, ...: :meth:`_Builder.add` with ``what``), and is
    then represented by its last one."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


class _Builder(TransformerRules, Analysis):
    """Turns the traced graph into the linearised ops above (refusing anything else).

    ``order``: every node of the linearisation in topological order, the input placeholder
    first, then :class:`_Step` nodes; ``ops`` and ``shapes`` (without the batch dim) for
    each. Each rule returns the step that computes its traced node (``self.out`` maps traced
    nodes to steps); the helpers (:meth:`structural`, :meth:`linear`, :meth:`scale`,
    :meth:`shift`, :meth:`unary`, :meth:`product`, :meth:`sum`, ...) accept a traced node or
    a step and return the new step, so a rule can chain several."""

    def __init__(self, tg: TracedGraph):
        super().__init__(tg)
        self.order = []
        self.ops = {}
        self.shapes = {}

    def input(self, node):
        self.order.append(node)
        self.shapes[node] = tuple(shape_of(node)[1:])
        return node

    def key(self, x):
        """The step computing ``x`` (a traced node or already a step)."""
        return self.out.get(x, x) if isinstance(x, torch.fx.Node) else x

    def shape(self, x) -> tuple:
        """The shape of ``x`` (traced node or step) without the batch dim."""
        k = self.key(x)
        if k in self.shapes:
            return self.shapes[k]
        self.fail(self.op_name(), "input shape unknown")

    def output(self, node):
        out = node.args[0]
        if not self.is_dep(out):
            self.fail("output", "the output must be one input-dependent tensor")
        return self.key(out)

    def fail(self, what: str, why: str = ""):
        name = self.tg.display_name(self.node)
        detail = f": {why}" if why else ""
        raise UnsupportedOpError(f"node {name!r} ({what}{detail}): no linear relaxation; {_LOCAL_ADVICE}")

    def add(self, op, shape=None, what: str | None = None):
        """Place ``op`` (its operands given as traced nodes or steps) as a new step; ``shape``
        defaults to the current traced node's, ``what`` names a step inside it. Returns the step."""
        for attr in ("src", "a", "b"):
            if hasattr(op, attr):
                setattr(op, attr, self.key(getattr(op, attr)))
        name = self.tg.display_name(self.node)
        k = _Step(f"{name}/{what}" if what else name)
        self.order.append(k)
        self.ops[k] = op
        self.shapes[k] = tuple(shape_of(self.node)[1:]) if shape is None else tuple(shape)
        return k

    def single(self):
        x = self.node.args[0] if self.node.args else None
        if not self.is_dep(x) or len(self.deps()) != 1:
            self.fail(self.op_name(), "the input-dependent tensor must be the first and only such operand")
        return x

    def structural(self, x, run, n: int = 1, has_bias: bool = False, what: str | None = None):
        """A linear op given by ``run`` (data movement, pooling, sums with nonnegative
        weights): transpose by the vector–Jacobian product, ``|W| = W`` (nonnegative weights);
        ``n``: its γ index (terms per entry plus roundings of inexact weights)."""
        in_shape = self.shape(x)
        zero = torch.zeros((1,) + tuple(in_shape), dtype=_F64)
        with torch.no_grad():
            b0 = run(zero)[0]
        bias = b0 if has_bias and bool((b0 != 0).any()) else None
        if not has_bias and bool((b0 != 0).any()):
            self.fail(self.op_name(), "not linear (nonzero at 0)")

        def T(lam):
            u = torch.zeros((lam.shape[0],) + tuple(in_shape), dtype=_F64, requires_grad=True)
            with torch.enable_grad():
                y = run(u)
                (g,) = torch.autograd.grad(y, u, lam.reshape(y.shape))
            return g

        def absfwd(M):
            with torch.no_grad():
                y = run(M)
            if bias is not None:
                y = y - bias
            return _inflate(y, n)

        def fwd(t):
            with torch.no_grad():
                y = run(t)
            return y - bias if bias is not None else y

        return self.add(_Affine(x, T, absfwd, n, bias, fwd=fwd), b0.shape, what)

    def unary(self, x, relaxation, what: str | None = None):
        """``f(x)`` elementwise, ``relaxation`` giving its lines and range (a new step)."""
        return self.add(_Unary(x, relaxation), self.shape(x), what)

    def product(self, a, b, what: str | None = None):
        """``a · b`` elementwise of two input-dependent tensors of the same shape."""
        if self.shape(a) != self.shape(b):
            self.fail(self.op_name(), f"product of input-dependent tensors of shapes {self.shape(a)} and "
                      f"{self.shape(b)} (broadcast it first)")
        return self.add(_Prod(a, b), self.shape(a), what)

    def sum(self, a, b, alpha: float = 1.0, what: str | None = None):
        """``a + α b`` of two input-dependent tensors of the same shape."""
        if self.shape(a) != self.shape(b):
            self.fail(self.op_name(), "broadcasting between input-dependent tensors")
        return self.add(_Sum(a, b, alpha), self.shape(a), what)

    # -- modules -------------------------------------------------------------------------

    def module_identity(self, node, mod):
        x = self.single()
        return self.structural(x, lambda t: mod(t), 1, has_bias=True)

    def module_activation(self, node, mod):
        t = type(mod)
        cls = t.__bases__[0] if t not in activations.MODULES else t
        name, params = activations.module_params(mod, cls)
        return self.activation(name, params)

    def activation(self, name, params):
        x = self.single()
        if name == "relu":
            return self.add(_Act(x, 0.0), self.shape(x))
        if name == "leaky_relu":
            a = params["negative_slope"]
            a = a.item() if isinstance(a, torch.Tensor) and a.numel() == 1 else a
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
                self.fail(f"leaky_relu({a!r})", "the negative slope must be a number in [0, 1] (convex)")
            return self.add(_Act(x, float(a)), self.shape(x))
        if name in ("pos", "positive"):
            return self.structural(x, lambda t: t, 1)
        if name in ("neg", "negative"):
            return self.add(_Affine(x, lambda lam: -lam, lambda M: M, 1, fwd=lambda t: -t), self.shape(x))
        return self.unary(x, self.relaxation(name, params))

    def relaxation(self, name, params):
        """The sound lines of activation ``name`` (:func:`gmfast.lipschitz.relax.get`)."""
        try:
            return relax.get(name, params)
        except UnsupportedOpError as e:
            self.fail(name, str(e))

    def module_linear(self, node, mod):
        x = self.single()
        return self.linear(x, mod.weight, mod.bias)

    def module_conv(self, node, mod):
        x = self.single()
        if mod.padding_mode != "zeros":
            self.fail(type(mod).__name__, f"padding_mode={mod.padding_mode!r}")
        nd = CONVS[type(mod).__bases__[0] if type(mod) not in CONVS else type(mod)]
        rp = mod._reversed_padding_repeated_twice
        pad = tuple(rp[2 * (nd - 1 - d)] for d in range(nd))
        if any(rp[2 * i] != rp[2 * i + 1] for i in range(nd)):
            self.fail(type(mod).__name__, "asymmetric padding")
        return self.conv(x, mod.weight, mod.bias, mod.stride, pad, mod.dilation, mod.groups, nd)

    def module_group_sort(self, node, mod):
        """MaxMin, ``(a, b) ↦ (max(a, b), min(a, b)) = (b + r, a − r)`` with
        ``r = relu(a − b)``: an exact identity, linearised as the steps ``swap`` (``(b, a)``,
        a permutation), ``diff`` (``a − b``), its ReLU, ``spread`` (``(r, −r)``) and the sum
        ``swap + spread``. Larger groups are refused (sorting ``g`` entries needs
        ``g(g − 1)/2`` such comparisons)."""
        x = self.single()
        if type(mod).forward is not GroupSort.forward:
            self.fail(type(mod).__name__, "overrides GroupSort.forward")
        if mod.group_size != 2:
            self.fail(f"GroupSort({mod.group_size})", "only MaxMin (group_size=2) is linearised; a larger group "
                      "sorts by a network of pairwise comparisons that is not implemented")
        shape = self.shape(x)
        if len(shape) < 1 or shape[0] % 2:
            self.fail("MaxMin", f"expects (N, C, ...) with C even; got {shape}")
        half = (shape[0] // 2, 2) + shape[1:]
        hshape = (shape[0] // 2,) + shape[1:]

        def pairs(t):
            return t.reshape((t.shape[0],) + half)

        def diff_fwd(t):
            p = pairs(t)
            return p[:, :, 0] - p[:, :, 1]

        def diff_T(lam):  # (λ, −λ) interleaved: exact
            return torch.stack([lam, -lam], 2).reshape((lam.shape[0],) + shape)

        def diff_abs(M):
            p = pairs(M)
            return _inflate(p[:, :, 0] + p[:, :, 1], 2)

        def spread_fwd(t):
            return torch.stack([t, -t], 2).reshape((t.shape[0],) + shape)

        def spread_T(lam):  # λ_max − λ_min: one rounding per entry
            p = pairs(lam)
            return p[:, :, 0] - p[:, :, 1]

        def spread_abs(M):
            return torch.stack([M, M], 2).reshape((M.shape[0],) + shape)

        swap = self.structural(x, lambda t: pairs(t).flip(2).reshape(t.shape), what="swap")
        d = self.add(_Affine(x, diff_T, diff_abs, 1, fwd=diff_fwd), hshape, "diff")
        r = self.add(_Act(d, 0.0), hshape, "relu")
        spread = self.add(_Affine(r, spread_T, spread_abs, 2, fwd=spread_fwd), shape, "spread")
        return self.sum(swap, spread, 1.0)

    def module_batch_norm(self, node, mod):
        x = self.single()
        if mod.running_var is None:
            self.fail(type(mod).__name__, "track_running_stats=False")
        return self.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps)

    def module_avg_pool(self, node, mod):
        x = self.single()
        return self.structural(x, lambda t: mod(t), math.prod(self.shape(x)) + 2)

    # -- functions -----------------------------------------------------------------------

    def rule_activation(self, node):
        name = node.target if isinstance(node.target, str) else FUNCTION_NAMES[node.target]
        name = name.rstrip("_")
        x = node.args[0] if node.args else arg(node, 0, "input")
        args, kwargs = self.resolve((tuple(node.args[1:]), dict(node.kwargs)), x, None)
        try:
            name, params = activations.call_params(name, args, kwargs)
        except activations.Refusal as e:
            self.fail(name, str(e))
        return self.activation(name, params)

    def rule_dropout(self, node):
        if arg(node, 2, "training", True) is not False:
            self.fail(self.op_name(), "training=True")
        x = self.single()
        return self.structural(x, lambda t: t, 1)

    def rule_reshape(self, node):
        x = self.single()
        if node.target == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            self.fail("view(dtype)", "reinterprets bits")
        args, kwargs = self.resolve((tuple(node.args[1:]), dict(node.kwargs)), x, None)
        if node.op == "call_method":
            if node.target in ("to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda"):
                return self.structural(x, lambda t: t, 1)
            if node.target in ("view", "reshape"):
                return self.structural(x, self.batch_free_reshape(node.target, x, args), 1)
            return self.structural(x, lambda t: getattr(t, node.target)(*args, **kwargs), 1)
        return self.structural(x, lambda t: node.target(t, *args, **kwargs), 1)

    def batch_free_reshape(self, method, x, args):
        """``x.view(B, ...)`` / ``x.reshape(B, ...)`` with ``B`` read from ``x.shape`` at trace
        time (the usual attention code) recorded the traced batch size; the trace's batch
        check keeps the batch first, so the leading size is whatever the rows' count is."""
        target = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
        if not target or not all(isinstance(v, int) for v in target):
            self.fail(f".{method}()", f"shape {target!r} is not a tuple of ints")
        rest = target[1:]
        if target[0] not in (-1, shape_of(x)[0]):
            self.fail(f".{method}()", f"the leading size {target[0]} is not the batch (the batch must stay first)")
        return lambda t: getattr(t, method)((t.shape[0],) + rest)

    def rule_linear(self, node):
        x = self.single()
        w = self.const_value(arg(node, 1, "weight"), "linear")
        b = arg(node, 2, "bias")
        return self.linear(x, w, None if b is None else self.const_value(b, "linear"))

    def rule_conv(self, node):
        """``F.convNd`` with constant weight and bias (e.g. an AOL layer's effective weight,
        a constant node of the trace whose recorded value is the weight the forward uses)."""
        x = self.single()
        nd = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[node.target]
        W = self.const_value(arg(node, 1, "weight"), "conv")
        b = arg(node, 2, "bias")
        b = None if b is None else self.const_value(b, "conv")

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

        stride, padding = tup(arg(node, 3, "stride", 1)), arg(node, 4, "padding", 0)
        dilation, groups = tup(arg(node, 5, "dilation", 1)), arg(node, 6, "groups", 1)
        if padding == "valid":
            padding = 0
        elif padding == "same":
            tot = [dilation[d] * (W.shape[2 + d] - 1) for d in range(nd)]
            if any(t % 2 for t in tot):
                self.fail(self.op_name(), "padding='same' with an even kernel pads asymmetrically")
            padding = tuple(t // 2 for t in tot)
        return self.conv(x, W, b, stride, tup(padding), dilation, groups, nd)

    def rule_add(self, node):
        return self.add_sub(node, 1.0)

    def rule_sub(self, node):
        return self.add_sub(node, -1.0)

    def add_sub(self, node, sign):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        alpha = arg(node, 2, "alpha", 1)
        if isinstance(alpha, torch.fx.Node):
            self.fail(self.op_name(), "alpha is not a python number")
        alpha = sign * float(alpha)
        out = shape_of(node)
        if self.is_dep(a) and self.is_dep(b):
            if shape_of(a) != out or shape_of(b) != out:
                self.fail(self.op_name(), "broadcasting between input-dependent tensors")
            return self.sum(a, b, alpha)
        if self.is_dep(a):
            if shape_of(a) != out:
                self.fail(self.op_name(), "the input-dependent operand is broadcast")
            c = self.const_value(b, self.op_name()) * alpha
            return self.shift(a, c, exact=alpha in (1.0, -1.0))
        if shape_of(b) != out:
            self.fail(self.op_name(), "the input-dependent operand is broadcast")
        if alpha not in (1.0, -1.0):
            self.fail(self.op_name(), "alpha scaling of the input-dependent operand")
        c = self.const_value(a, self.op_name())
        # c + alpha·x: a scale by ±1 (exact) then a shift
        shape = out[1:]

        def T(lam):
            return lam * alpha

        def absfwd(M):
            return M

        scaled = _Affine(b, T, absfwd, 1, torch.broadcast_to(c, shape).clone(), fwd=T)
        return self.add(scaled, shape)

    def shift(self, x, c, exact: bool, what: str | None = None):
        """``x + c`` (``c`` constant, broadcast to ``x``'s shape; ``exact``: ``c`` is the exact
        value, else within ``u|c|`` of it)."""
        shape = self.shape(x)
        bias = self.broadcast(c, shape)
        err = None if exact else bias.abs() * U64
        return self.add(_Affine(x, lambda lam: lam, lambda M: M, 1, bias, err, fwd=lambda t: t), shape, what)

    def broadcast(self, c, shape):
        """Constant ``c`` broadcast to ``shape``, refusing a ``c`` that would enlarge it."""
        if torch.broadcast_shapes(c.shape, shape) != tuple(shape):
            self.fail(self.op_name(), "the input-dependent operand is broadcast")
        return torch.broadcast_to(c, shape).clone()

    def rule_mul(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if self.is_dep(a) and self.is_dep(b):
            return self.mul_dep(a, b)
        x, c = (a, b) if self.is_dep(a) else (b, a)
        return self.scale(x, self.const_value(c, self.op_name()), 1)

    def rule_div(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if arg(node, 2, "rounding_mode") is not None:
            self.fail(self.op_name(), "rounding_mode (a step function)")
        if self.is_dep(b):
            return self.div_dep(a, b) if self.is_dep(a) else self.div_dep(None, b, self.const_value(a, self.op_name()))
        c = self.const_value(b, self.op_name())
        if not bool((c != 0).all()):
            self.fail(self.op_name(), "division by zero")
        # 1/c is not exact: one more rounding per entry
        return self.scale(a, 1.0 / c, 2)

    def scale(self, x, c, n, what: str | None = None):
        """``c · x`` elementwise (``c`` constant; ``n``: 1 if ``c`` is exact, plus one per
        rounding that produced it)."""
        shape = self.shape(x)
        c = self.broadcast(c, shape)
        ca = _inflate(c.abs(), n)
        return self.add(_Affine(x, lambda lam: lam * c, lambda M: M * ca, n, fwd=lambda t: t * c), shape, what)

    # -- the affine pieces ---------------------------------------------------------------

    def linear(self, x, weight, bias, what: str | None = None):
        """``x Wᵀ + b`` over the last dim of ``x``."""
        W = weight.detach().cpu().to(_F64)
        Wa = W.abs()
        out_f, in_f = W.shape
        b = None if bias is None else bias.detach().cpu().to(_F64)

        def T(lam):
            return lam @ W

        def absfwd(M):
            return _inflate(M @ Wa.T, in_f)

        shape = self.shape(x)
        if not shape or shape[-1] != in_f:
            self.fail(self.op_name(), f"linear layer expects {in_f} input features; got shape {shape}")
        out = shape[:-1] + (out_f,)
        b = None if b is None else b.expand(out).clone()  # one bias per entry (tokens share it)
        return self.add(_Affine(x, T, absfwd, out_f, b, fwd=lambda t: t @ W.T), out, what)

    def conv(self, x, weight, bias, stride, pad, dilation, groups, nd):
        in_shape = self.shape(x)
        W = weight.detach().cpu().to(_F64)
        Wa = W.abs()
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        convT = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        st = stride if isinstance(stride, tuple) else (stride,) * nd
        dl = dilation if isinstance(dilation, tuple) else (dilation,) * nd
        k = W.shape[2:]
        with torch.no_grad():
            out_shape = tuple(conv(torch.zeros((1,) + in_shape, dtype=_F64), W, None, st, pad, dl, groups).shape[1:])
        # output_padding so the transpose returns the input's spatial size
        opad = tuple(in_shape[1 + d] - ((out_shape[1 + d] - 1) * st[d] - 2 * pad[d] + dl[d] * (k[d] - 1) + 1)
                     for d in range(nd))
        if any(p < 0 or p >= max(st[d], dl[d]) for d, p in enumerate(opad)):
            self.fail(self.op_name(), "cannot form the transposed convolution")
        n_in_terms = (W.shape[1]) * math.prod(k)
        n_T = W.shape[0] * math.prod(k)
        b = None if bias is None else bias.detach().cpu().to(_F64)
        bias_full = None if b is None else b.reshape((-1,) + (1,) * nd).expand(out_shape).clone()

        def T(lam):
            return convT(lam, W, None, st, pad, opad, groups, dl)

        def absfwd(M):
            return _inflate(conv(M, Wa, None, st, pad, dl, groups), n_in_terms)

        return self.add(_Affine(x, T, absfwd, n_T, bias_full, fwd=lambda t: conv(t, W, None, st, pad, dl, groups)),
                        out_shape)

    def batch_norm(self, x, mean, var, weight, bias, eps):
        shape = self.shape(x)
        nd = len(shape) - 1
        s = 1.0 / torch.sqrt(var.detach().cpu().to(_F64) + float(eps))
        if weight is not None:
            s = s * weight.detach().cpu().to(_F64)
        mu = mean.detach().cpu().to(_F64)
        beta = torch.zeros_like(mu) if bias is None else bias.detach().cpu().to(_F64)
        shift = beta - mu * s
        # ŝ within γ_4 of s (add, sqrt, divide, multiply); shift: two more roundings
        g4 = gamma(4, U64)
        shift_err = gamma(6, U64) * (beta.abs() + mu.abs() * s.abs()) * (1 + 2 * g4) + _TINY
        view = (-1,) + (1,) * nd
        s_b = s.reshape(view)
        sa = _inflate(s.abs(), 5).reshape(view)

        def T(lam):
            return lam * s_b

        def absfwd(M):
            return M * sa

        return self.add(_Affine(x, T, absfwd, 5, shift.reshape(view).expand(shape).clone(),
                                shift_err.reshape(view).expand(shape).clone(), fwd=T), shape)
