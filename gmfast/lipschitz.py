"""Sound upper bounds on the ℓ2→ℓ2 Lipschitz constant of a torch module (DESIGN 1.6).

:func:`lipschitz_bound` traces the module with ``torch.fx`` and runs a dynamic program over
the graph in topological order: every node carries ``L(node)``, an upper bound on the
Lipschitz constant of the map *input → node value* (the input has 1, constants 0). It is
sound because

* composition is submultiplicative: ``Lip(f∘g) ≤ Lip(f)·Lip(g)``;
* sums add: ``Lip(f + g) ≤ Lip(f) + Lip(g)`` (residual connections);
* concatenation is in quadrature: ``‖(f(x)−f(y), g(x)−g(y))‖² ≤ (Lip(f)² + Lip(g)²)‖x−y‖²``;
* every per-layer factor below is an upper bound on that layer's constant, computed in
  float64 and inflated by an explicit allowance for its own rounding.

Per-layer rules: Linear (spectral norm by SVD); Conv1d/Conv2d with zero padding and any
stride, dilation and groups (exactly, by the SVD of the dense operator, when it is small;
otherwise the maximum over an (n + k − 1)-periodic frequency grid of the spectral norm of
the kernel's per-frequency ``c_out × c_in`` DFT matrix: a zero-padded convolution is a
restriction of that circular one, whose singular values these are exactly; Sedghi, Gupta
& Long, ICLR 2019); BatchNorm in eval (``max |γ/√(var+ε)|``); ReLU,
LeakyReLU, Tanh, Hardtanh, ELU (α ≤ 1), Softplus (1), Sigmoid (¼), GELU (1.13), SiLU (1.1);
max and average pooling (with the overlap factor); global means; shape operations,
slicing, Identity and Dropout (1); scalar/constant multiplication and division; ``add``,
``sub``, ``cat``, ``stack``. Input normalisation inside the encoder, ``(x − mean)/std``
with constant tensors, is part of the bound, so radii are in the scale of the encoder's
*own input*.

Anything without a rule is an :class:`UnsupportedOpError` naming the node and the op: a
bound is never guessed. Not covered: softmax, layer norm, attention, products of two
input-dependent tensors, circular/reflect padding. The bound is for the exact-arithmetic
network; its own floating-point error is not bounded here.

Beside the bound, the Jacobian's spectral norm at a few points is reported (exact for small
Jacobians, power iteration otherwise): a lower bound on the true constant, so users see the
gap.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

U64 = 2.0**-53

__all__ = ["LipschitzBound", "UnsupportedOpError", "lipschitz_bound"]


class UnsupportedOpError(ValueError):
    """A graph node has no Lipschitz rule."""


@dataclass(frozen=True)
class LipschitzBound:
    """Result of :func:`lipschitz_bound`.

    bound : float
        Sound upper bound on the ℓ2→ℓ2 Lipschitz constant.
    estimate : float or None
        Power-iteration lower bound (max over a few random points of ‖J(x)‖₂).
    layers : list of (node name, op, factor)
        Per-node factors of the dynamic program, for reading where the bound comes from.
    """

    bound: float
    estimate: float | None = None
    layers: list = field(default_factory=list, compare=False)

    @property
    def gap(self) -> float | None:
        """``bound / estimate`` (≥ 1), or None without an estimate."""
        if not self.estimate:
            return None
        return self.bound / self.estimate

    def __float__(self) -> float:
        return float(self.bound)


# ----------------------------------------------------------------------------- per-layer rules


def _spectral_norm_up(W: torch.Tensor) -> float:
    """Upper bound on ‖W‖₂ of a (batch of) matrices: the largest float64 singular value,
    inflated for the SVD's backward error (``p(n)·u·‖W‖₂`` with a generous ``p(n) = 8n``)."""
    W = W.detach().to(torch.float64) if not W.is_complex() else W.detach().to(torch.complex128)
    if W.numel() == 0:
        return 0.0
    s = torch.linalg.svdvals(W).amax().item()
    n = max(W.shape[-2:])
    return s * (1.0 + 8.0 * (n + 1) * U64)


#: Largest dense operator (entries) whose spectral norm is computed exactly by SVD.
_DENSE_LIMIT = 4_000_000
#: The convolution method of the trace in progress (set by lipschitz_bound).
_CONV_METHOD = ["auto"]


def _conv_dense_norm(conv, in_shape, nd: int) -> float:
    """Exact ‖·‖₂ of the (linear part of the) convolution on ``in_shape``, from its dense
    matrix: the convolution applied to every unit input, then an SVD (float64)."""
    W = conv.weight.detach().to(torch.float64)
    c_in = W.shape[1] * conv.groups
    shape = (c_in,) + tuple(in_shape[-nd:])
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + shape)
    fn = F.conv1d if nd == 1 else F.conv2d
    cols = fn(eye, W, None, conv.stride, conv.padding, conv.dilation, conv.groups).reshape(n, -1)
    return _spectral_norm_up(cols)


def _conv_bound(conv: nn.Module, in_shape, method: str = "auto") -> float:
    """Spectral-norm bound of a zero-padded Conv1d/Conv2d on inputs of spatial size ``in_shape``.

    ``method``: ``"dense"`` (exact, from the dense operator), ``"fft"`` (the periodic-grid
    bound), or ``"auto"`` (dense when the operator has at most ``_DENSE_LIMIT`` entries).
    """
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise UnsupportedOpError(f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}: no rule "
                                 "(only zero padding is bounded)")
    W = conv.weight.detach().to(torch.float64)  # (c_out, c_in / g, *k)
    nd = W.dim() - 2
    if method not in ("auto", "dense", "fft"):
        raise ValueError(f"conv method must be 'auto', 'dense' or 'fft'; got {method!r}")
    n_in = W.shape[1] * conv.groups * math.prod(in_shape[-nd:])
    n_out = W.shape[0] * math.prod(in_shape[-nd:])  # ≥ the output size for stride ≥ 1, 'valid'/'same'
    if method == "dense" or (method == "auto" and n_in * n_out <= _DENSE_LIMIT):
        return _conv_dense_norm(conv, in_shape, nd)
    dil = conv.dilation if isinstance(conv.dilation, tuple) else (conv.dilation,) * nd
    spatial = list(in_shape[-nd:])
    k = list(W.shape[2:])
    keff = [dil[i] * (k[i] - 1) + 1 for i in range(nd)]
    grid = [spatial[i] + keff[i] - 1 for i in range(nd)]
    # place the dilated kernel on the periodic grid, then its DFT per (out, in) channel pair
    Kp = W.new_zeros(W.shape[:2] + tuple(grid))
    idx = (slice(None), slice(None)) + tuple(slice(0, keff[i], dil[i]) for i in range(nd))
    Kp[idx] = W
    Kf = torch.fft.fftn(Kp, dim=tuple(range(2, 2 + nd)))  # (c_out, c_in/g, *grid)
    g = conv.groups
    c_out, c_in_g = W.shape[0], W.shape[1]
    per = c_out // g
    best = 0.0
    for gi in range(g):
        blk = Kf[gi * per:(gi + 1) * per]  # (per, c_in_g, *grid)
        mats = blk.reshape(per, c_in_g, -1).permute(2, 0, 1)  # (frequencies, per, c_in_g)
        best = max(best, _spectral_norm_up(mats))
    # FFT rounding: each DFT entry is off by at most ~ c·log2(N)·u·Σ|w| (Higham, §24.1);
    # the Frobenius norm of that error matrix bounds its effect on σ_max (Weyl)
    n = math.prod(grid)
    fft_err = 10.0 * (math.log2(max(n, 2)) + 2) * U64 * math.sqrt(math.prod(k)) * torch.linalg.vector_norm(W).item()
    return best + fft_err


def _bn_bound(bn: nn.Module) -> float:
    if bn.running_var is None:
        raise UnsupportedOpError(f"{type(bn).__name__} without running statistics (track_running_stats=False): "
                                 "its eval-mode map depends on the batch; no rule")
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double().abs()
    return scale.abs().max().item() * (1.0 + 4 * U64)


def _window_overlap(k, s, dil=1) -> int:
    """Max number of pooling windows (kernel k, stride s, dilation) holding one element."""
    keff = dil * (k - 1) + 1
    return min(k, math.ceil(keff / s))


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _maxpool_bound(kernel, stride, dilation, nd) -> float:
    # |max(a) − max(b)| ≤ max|a − b| ≤ ‖a − b‖₂ over each window; summing the squares over
    # windows counts every element at most `overlap` times.
    k, s, dl = _tuple(kernel, nd), _tuple(stride or kernel, nd), _tuple(dilation, nd)
    return math.sqrt(math.prod(_window_overlap(k[i], s[i], dl[i]) for i in range(nd)))


def _avgpool_bound(kernel, stride, nd, count_include_pad=True, divisor_override=None) -> float:
    # output = Σ_window x / c; by Cauchy–Schwarz (Σ_window x)² ≤ |window|·Σ_window x², and each
    # element lies in ≤ m windows: factor √(m·|window|)/c. With count_include_pad=False the
    # divisor is the number of valid elements c ≥ 1 with |valid window| = c: factor √(m/c) ≤ √m.
    k, s = _tuple(kernel, nd), _tuple(stride or kernel, nd)
    m = math.prod(_window_overlap(k[i], s[i]) for i in range(nd))
    size = math.prod(k)
    if divisor_override:
        return math.sqrt(m * size) / divisor_override
    if count_include_pad:
        return math.sqrt(m / size)
    return math.sqrt(m)


def _adaptive_avg_bound(in_spatial, out_size) -> float:
    """Adaptive average pooling: regions [⌊iH/o⌋, ⌈(i+1)H/o⌉) may overlap; per dimension the
    factor is √(max overlap / min region size) (same Cauchy–Schwarz argument as above)."""
    out_size = _tuple(out_size, len(in_spatial))
    f = 1.0
    for H, o in zip(in_spatial, out_size):
        o = H if o is None else o
        regions = [(math.floor(i * H / o), math.ceil((i + 1) * H / o)) for i in range(o)]
        cover = [0] * H
        for a, b in regions:
            for t in range(a, b):
                cover[t] += 1
        f *= math.sqrt(max(cover) / min(b - a for a, b in regions))
    return f


# max of the derivative: GELU x·Φ(x) peaks at x = √2 with Φ(√2) + √2·φ(√2) ≈ 1.1289;
# SiLU x·σ(x) peaks at ≈ 1.0998; rounded up.
_ACTIVATION = {
    nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Tanh: 1.0, nn.Hardtanh: 1.0, nn.Softplus: 1.0, nn.Identity: 1.0,
    nn.Sigmoid: 0.25, nn.GELU: 1.13, nn.SiLU: 1.1, nn.Flatten: 1.0, nn.Unflatten: 1.0,
    nn.Dropout: 1.0, nn.Dropout1d: 1.0, nn.Dropout2d: 1.0, nn.AlphaDropout: 1.0,
}
_FUNCTIONS = {
    F.relu: 1.0, torch.relu: 1.0, F.relu6: 1.0, torch.tanh: 1.0, F.tanh: 1.0, F.hardtanh: 1.0, F.softplus: 1.0,
    torch.sigmoid: 0.25, F.sigmoid: 0.25, F.gelu: 1.13, F.silu: 1.1, F.dropout: 1.0,
    torch.flatten: 1.0, torch.reshape: 1.0, torch.squeeze: 1.0, torch.unsqueeze: 1.0, torch.permute: 1.0,
    torch.transpose: 1.0, torch.clone: 1.0, operator.neg: 1.0, torch.neg: 1.0, operator.pos: 1.0,
}
_METHODS = {
    "relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "view": 1.0, "reshape": 1.0, "flatten": 1.0, "permute": 1.0,
    "transpose": 1.0, "contiguous": 1.0, "squeeze": 1.0, "unsqueeze": 1.0, "clone": 1.0, "float": 1.0,
    "double": 1.0, "neg": 1.0, "view_as": 1.0, "reshape_as": 1.0, "detach": 0.0,
}


def _module_factor(mod: nn.Module, in_shape, name: str) -> float:
    for cls, f in _ACTIVATION.items():
        if type(mod) is cls:
            return f
    if isinstance(mod, nn.LeakyReLU):
        return max(1.0, abs(mod.negative_slope))
    if isinstance(mod, nn.ELU):
        if mod.alpha > 1:
            return float(mod.alpha)
        return 1.0
    if isinstance(mod, nn.Linear):
        return _spectral_norm_up(mod.weight)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return _conv_bound(mod, in_shape, _CONV_METHOD[0])
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _bn_bound(mod)
    if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)):
        nd = 1 if isinstance(mod, nn.MaxPool1d) else 2
        return _maxpool_bound(mod.kernel_size, mod.stride, mod.dilation, nd)
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)):
        nd = 1 if isinstance(mod, nn.AvgPool1d) else 2
        return _avgpool_bound(mod.kernel_size, mod.stride, nd, mod.count_include_pad,
                              getattr(mod, "divisor_override", None))
    if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        nd = 1 if isinstance(mod, nn.AdaptiveAvgPool1d) else 2
        return _adaptive_avg_bound(list(in_shape[-nd:]), mod.output_size)
    raise UnsupportedOpError(f"node {name!r}: module {type(mod).__name__} has no Lipschitz rule; pass "
                             "lipschitz=<float> explicitly or wrap it in a module with a known bound")


# ----------------------------------------------------------------------------- the graph DP


class _Conv:
    """The attributes :func:`_conv_bound` reads, for a functional convolution."""

    def __init__(self, weight, stride, padding, dilation, groups):
        self.weight, self.stride, self.padding, self.dilation, self.groups = weight, stride, padding, dilation, groups
        self.padding_mode = "zeros"


def _functional_factor(node, tgt, consts, name) -> float:
    """Rules for F.linear / F.conv1d / F.conv2d / F.batch_norm / F.pad with constant weights."""
    args, kw = list(node.args), dict(node.kwargs)

    def arg(i, key, default=None):
        return kw.get(key, args[i] if len(args) > i else default)

    def const(a, what):
        c = consts.get(a) if isinstance(a, torch.fx.Node) else (a if isinstance(a, torch.Tensor) else None)
        if c is None:
            raise UnsupportedOpError(f"node {name!r}: {tgt.__name__} with an input-dependent {what}; no rule")
        return c

    if tgt is F.linear:
        return _spectral_norm_up(const(arg(1, "weight"), "weight"))
    if tgt in (F.conv1d, F.conv2d):
        nd = 1 if tgt is F.conv1d else 2
        conv = _Conv(const(arg(1, "weight"), "weight"), arg(3, "stride", 1), arg(4, "padding", 0),
                     _tuple(arg(5, "dilation", 1), nd), arg(6, "groups", 1))
        if isinstance(conv.padding, str) and conv.padding not in ("valid", "same"):
            raise UnsupportedOpError(f"node {name!r}: padding={conv.padding!r}; no rule")
        return _conv_bound(conv, _shape(args[0]), _CONV_METHOD[0])
    if tgt is F.batch_norm:
        if arg(5, "training", False):
            raise UnsupportedOpError(f"node {name!r}: batch_norm with training=True")
        var = const(arg(2, "running_var"), "running variance").double()
        w = arg(3, "weight")
        scale = 1.0 / torch.sqrt(var + float(arg(7, "eps", 1e-5)))
        if w is not None:
            scale = scale * const(w, "weight").double().abs()
        return scale.abs().max().item() * (1.0 + 4 * U64)
    mode = arg(2, "mode", "constant")
    if mode != "constant":
        raise UnsupportedOpError(f"node {name!r}: pad with mode={mode!r}; no rule (only zero padding)")
    return 1.0  # adding constant entries: differences are unchanged


def _shape(node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _const_value(arg, consts):
    """A python number or a constant tensor (a get_attr or a node computed from constants)."""
    if isinstance(arg, (int, float)):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, torch.fx.Node) and arg in consts:
        return consts[arg]
    return None


def _graph_bound(gm: torch.fx.GraphModule):
    L, consts, layers = {}, {}, []

    def lip(a):
        if isinstance(a, torch.fx.Node):
            return L.get(a, 0.0)
        if isinstance(a, (tuple, list)):
            return math.sqrt(sum(lip(x) ** 2 for x in a))
        return 0.0

    for node in gm.graph.nodes:
        op, tgt = node.op, node.target
        args = node.args
        name = node.name
        if op == "placeholder":
            L[node] = 1.0
            continue
        if op == "get_attr":
            obj = gm
            for part in tgt.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                consts[node] = obj.detach().double()
            L[node] = 0.0
            continue
        if op == "output":
            out = lip(args[0])
            return out, layers
        if all(L.get(a, 0.0) == 0.0 for a in node.all_input_nodes):  # a constant (or shape arithmetic)
            L[node] = 0.0
            continue
        x = args[0] if args else None
        lx = lip(x)
        if op == "call_module":
            mod = gm.get_submodule(tgt)
            in_shape = _shape(x) if isinstance(x, torch.fx.Node) else None
            f = _module_factor(mod, in_shape, name)
            L[node] = f * lx
            layers.append((name, type(mod).__name__, f))
            continue
        if op == "call_function" and tgt in (F.linear, F.conv1d, F.conv2d, F.batch_norm, F.pad):
            f = _functional_factor(node, tgt, consts, name)
            L[node] = f * lx
            layers.append((name, tgt.__name__, f))
            continue
        if op == "call_function" and tgt in (operator.add, torch.add, operator.sub, torch.sub):
            alpha = abs(float(node.kwargs.get("alpha", 1.0)))
            L[node] = lip(args[0]) + alpha * lip(args[1])
            layers.append((name, "add", 1.0))
            continue
        if op in ("call_function", "call_method") and tgt in (operator.mul, torch.mul, "mul", operator.truediv,
                                                              torch.div, "div"):
            a, b = args[0], args[1]
            la, lb = lip(a), lip(b)
            if la > 0 and lb > 0:
                raise UnsupportedOpError(f"node {name!r}: product of two input-dependent tensors ({tgt}); no rule")
            other = b if la > 0 else a
            c = _const_value(other, consts)
            if c is None:
                raise UnsupportedOpError(f"node {name!r}: {tgt} by a non-constant operand; no rule")
            if tgt in (operator.truediv, torch.div, "div"):
                if la == 0:
                    raise UnsupportedOpError(f"node {name!r}: division by an input-dependent tensor; no rule")
                f = (1.0 / c.abs()).max().item()
            else:
                f = c.abs().max().item()
            L[node] = f * (la + lb) * (1 + 2 * U64)
            layers.append((name, str(getattr(tgt, "__name__", tgt)), f))
            continue
        if op == "call_function" and tgt in (torch.cat, torch.stack, torch.concat):
            L[node] = lip(list(args[0]))
            layers.append((name, tgt.__name__, 1.0))
            continue
        if op == "call_function" and tgt is operator.getitem:
            L[node] = lx  # slicing / indexing selects coordinates: a projection
            continue
        if op == "call_function" and tgt in _FUNCTIONS:
            f = _FUNCTIONS[tgt]
            if tgt is F.dropout and node.kwargs.get("training", args[2] if len(args) > 2 else False):
                raise UnsupportedOpError(f"node {name!r}: F.dropout with training=True")
            L[node] = f * lx
            continue
        if op == "call_function" and tgt is F.leaky_relu:
            slope = node.kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            L[node] = max(1.0, abs(slope)) * lx
            continue
        if op == "call_method" and tgt in _METHODS:
            L[node] = _METHODS[tgt] * lx
            continue
        if (op == "call_method" and tgt == "mean") or (op == "call_function" and tgt is torch.mean):
            shp = _shape(x)
            dims = node.kwargs.get("dim", args[1] if len(args) > 1 else None)
            if shp is None:
                raise UnsupportedOpError(f"node {name!r}: mean over an input of unknown shape")
            dims = range(1, len(shp)) if dims is None else (dims if isinstance(dims, (tuple, list)) else (dims,))
            if any(d % len(shp) == 0 for d in dims):
                raise UnsupportedOpError(f"node {name!r}: a mean over the batch dimension mixes inputs; no rule")
            n = math.prod(shp[d] for d in dims)
            L[node] = lx / math.sqrt(n)  # (Σ x)/n: Cauchy–Schwarz gives 1/√n
            continue
        if op == "call_function" and tgt in (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                                             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
            nd = 1 if "1d" in tgt.__name__ else 2
            kw = dict(node.kwargs)
            if tgt in (F.max_pool1d, F.max_pool2d):
                k = kw.get("kernel_size", args[1])
                f = _maxpool_bound(k, kw.get("stride", args[2] if len(args) > 2 else None) or k,
                                   kw.get("dilation", args[4] if len(args) > 4 else 1), nd)
            elif tgt in (F.avg_pool1d, F.avg_pool2d):
                k = kw.get("kernel_size", args[1])
                f = _avgpool_bound(k, kw.get("stride", args[2] if len(args) > 2 else None) or k, nd,
                                   kw.get("count_include_pad", True), kw.get("divisor_override", None))
            else:
                f = _adaptive_avg_bound(list(_shape(x)[-nd:]), kw.get("output_size", args[1]))
            L[node] = f * lx
            layers.append((name, tgt.__name__, f))
            continue
        desc = tgt if isinstance(tgt, str) else getattr(tgt, "__name__", repr(tgt))
        raise UnsupportedOpError(f"node {name!r}: {op} {desc!r} has no Lipschitz rule; pass lipschitz=<float> "
                                 "explicitly or wrap it in a module with a known bound")
    raise UnsupportedOpError("the traced graph has no output")


# ----------------------------------------------------------------------------- estimate, cache


def _local_norm(module, x) -> float:
    """‖J(x)‖₂ (or a lower bound on it) at one input ``x`` of shape (1, ...).

    Small Jacobians (≤ 4M entries) are formed exactly by reverse mode (one batched ``vjp``)
    and their spectral norm taken; larger ones get power iteration on ``JᵀJ``, with ``J v``
    from the double-``vjp`` identity ``J v = ∂/∂u ⟨Jᵀu, v⟩`` (forward-mode AD through
    convolutions is two orders of magnitude slower on the CPU).
    """
    from torch.func import jacrev, vjp

    f = lambda t: module(t).reshape(-1)  # noqa: E731
    out = f(x)
    if out.numel() * x.numel() <= 4_000_000:
        J = jacrev(f)(x).reshape(out.numel(), -1)
        return torch.linalg.matrix_norm(J.double(), 2).item()
    _, pull = vjp(f, x)
    u = torch.zeros_like(out, requires_grad=True)
    (jtu,) = torch.autograd.grad(f(x), x, u, create_graph=True)  # linear in u
    v = torch.randn_like(x)
    v = v / v.norm()
    s = 0.0
    for _ in range(30):
        (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
        (jtjv,) = pull(jv)
        s = max(s, jv.norm().item())
        nrm = jtjv.norm()
        if not torch.isfinite(nrm) or nrm == 0:
            break
        v = jtjv / nrm
    return s


def _power_estimate(module: nn.Module, input_shape, seed: int, points=None, n_points: int = 4) -> float:
    """max over points of ‖J(x)‖₂ (see :func:`_local_norm`): a lower bound on the Lipschitz
    constant, since for an a.e.-differentiable f, Lip(f) = sup_x ‖J(x)‖₂. ``points`` (N, ...)
    are used when given (real inputs give a far more telling estimate than random ones),
    else ``n_points`` standard normal inputs."""
    import warnings

    p = next(iter(module.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    if points is None:
        g = torch.Generator().manual_seed(seed)
        points = torch.randn((n_points,) + tuple(input_shape), generator=g)
    best = 0.0
    with warnings.catch_warnings():
        # oneDNN's convolution gradients are very slow for single small inputs: use the
        # native kernels here (the flag is process-wide; it is restored on exit)
        warnings.simplefilter("ignore", UserWarning)
        with torch.enable_grad(), torch.backends.mkldnn.flags(enabled=False):
            for x in points:
                x = x.reshape((1,) + tuple(input_shape)).to(device, dtype)
                best = max(best, _local_norm(module, x))
    return best


class _Root(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _signature(module: nn.Module):
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    tensors = list(module.parameters()) + list(module.buffers())
    return tuple((id(t), t._version) for t in tensors) + tuple(m.training for m in module.modules())


def lipschitz_bound(module: nn.Module, input_shape, *, estimate: bool = True, points=None, seed: int = 0,
                    cache: bool = True, conv_method: str = "auto") -> LipschitzBound:
    """Sound upper bound on the ℓ2→ℓ2 Lipschitz constant of ``module`` (see the module doc).

    Parameters
    ----------
    module : nn.Module in eval mode, mapping (N, *input_shape) to (N, ...)
    input_shape : tuple
        One input's shape, without the batch dimension (e.g. ``(3, 32, 32)``); convolution
        bounds depend on the spatial size.
    estimate : bool
        Also compute the lower bound ``max_x ‖J(x)‖₂`` over a few points.
    points : tensor (N, *input_shape), optional
        Where to evaluate that estimate (e.g. a few real inputs); default: 4 random normal
        inputs drawn with ``seed``.
    cache : bool
        Reuse the result for the same module and shape until a parameter or buffer changes
        (tracked with tensor version counters).
    conv_method : {"auto", "dense", "fft"}
        Convolutions: the exact norm of the dense operator (small inputs), the periodic
        frequency-grid bound (any size), or ``"auto"`` (dense up to 4M matrix entries).

    Returns
    -------
    LipschitzBound with ``bound`` (sound), ``estimate`` (lower bound) and per-node ``layers``.

    Raises
    ------
    ValueError if a submodule is in train mode; UnsupportedOpError for an op without a rule.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    training = [name or type(m).__name__ for name, m in module.named_modules() if m.training]
    if training:
        raise ValueError(f"module {training[-1]!r} is in train mode; call .eval() first (BatchNorm and "
                         "Dropout compute a different function in training, so no bound would hold)")
    input_shape = tuple(int(s) for s in input_shape)
    if conv_method not in ("auto", "dense", "fft"):
        raise ValueError(f"conv_method must be 'auto', 'dense' or 'fft'; got {conv_method!r}")
    key = (input_shape, bool(estimate), int(seed), None if points is None else id(points), conv_method)
    sig = _signature(module)
    if cache:
        hit = _CACHE.get(module, {}).get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
    from torch.fx.passes.shape_prop import ShapeProp

    # trace a wrapper so the module itself is a call_module node: a bare nn.Linear, Conv or
    # BatchNorm then gets its module rule instead of being traced into
    gm = torch.fx.symbolic_trace(_Root(module))
    p = next(iter(module.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros((1,) + input_shape, dtype=dtype, device=device))
    _CONV_METHOD[0] = conv_method
    try:
        bound, layers = _graph_bound(gm)
    finally:
        _CONV_METHOD[0] = "auto"
    est = _power_estimate(module, input_shape, seed, points) if estimate else None
    result = LipschitzBound(bound=float(bound), estimate=est, layers=layers)
    if cache:
        _CACHE.setdefault(module, {})[key] = (sig, result)
    return result
