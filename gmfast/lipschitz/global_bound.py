"""The global Lipschitz bound as an :class:`~gmfast.lipschitz.walk.Analysis`: every node's
value is ``L(node)``, an upper bound on the Lipschitz constant of *input → that node*
(rules and proofs in the package docstring, :mod:`gmfast.lipschitz`)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from gmfast.lipschitz._norms import (conv_bound as _conv_bound, copy_factor, maxpool_factor, ntuple, schur_factor,
                                     spectral_norm_up, up)
from gmfast.lipschitz import activations
from gmfast.lipschitz.errors import UnsupportedOpError
from gmfast.lipschitz.lipnet_rules import group_sort_factor, periodic_conv_factor
from gmfast.lipschitz.ops import CONVS, LINEAR_INTERPOLATION, MAX_POOLS, arg, rule_class, shape_of
from gmfast.lipschitz.walk import Analysis

class GlobalBound(Analysis):
    """The dynamic program of the global bound (see the package docstring)."""

    def __init__(self, tg, conv_method: str):
        super().__init__(tg)
        self.conv_method = conv_method
        self.L = self.out
        self.layers = []

    def input(self, node):
        return 1.0

    def output(self, node):
        return up(self.lip(node.args[0]), 2 * len(node.all_input_nodes) + 2)

    def covers(self, new, old) -> bool:
        return new <= old

    def lip(self, a) -> float:
        """L of a node (0 for constants), or √(Σ L²) of a nested collection."""
        if isinstance(a, torch.fx.Node):
            return self.L.get(a, 0.0) if self.kind.get(a) == "dep" else 0.0
        if isinstance(a, (tuple, list)):
            return math.sqrt(sum(self.lip(x) ** 2 for x in a))
        if isinstance(a, dict):
            return self.lip(list(a.values()))
        return 0.0

    def broadcast_ratio(self, a) -> float:
        """√(output size / size of ``a``): broadcasting repeats each entry that many times."""
        out, inp = shape_of(self.node), shape_of(a)
        if out is None or inp is None:
            self.fail(self.op_name(), "shapes unknown")
        r = math.prod(out) / max(1, math.prod(inp))
        return math.sqrt(max(r, 1.0))

    def note(self, desc: str, factor: float):
        self.layers.append((self.display_name(self.node), desc, float(factor)))

    def unary(self, factor: float, desc: str, note: bool = True) -> float:
        """L of the node from the op's factor and its single input-dependent input."""
        x = self.node.args[0] if self.node.args else None
        if not self.is_dep(x) or len(self.deps()) != 1:
            self.fail(desc, "the input-dependent tensor must be the first and only such operand")
        if note:
            self.note(desc, factor)
        return up(factor * self.L[x])

    # -- modules ---------------------------------------------------------------------

    def module_vouched(self, node, mod):
        kind = type(mod).__name__
        c = float(mod.lipschitz_constant)
        if not (math.isfinite(c) and c >= 0):
            self.fail(kind, f"lipschitz_constant must be a finite number >= 0; got {c!r}")
        deps = self.deps(node)
        self.note(f"{kind} (lipschitz_constant)", c)
        return up(c * self.lip(deps), 2 * len(deps) + 2)

    def module_activation(self, node, mod):
        name, params = self.activation_params(node, mod)
        return self.activation(name, params, node.args[0] if node.args else None)

    def module_group_sort(self, node, mod):
        return self.unary(*group_sort_factor(mod))

    def module_periodic_conv(self, node, mod):
        return self.unary(*periodic_conv_factor(mod, self.conv_method))

    def module_prelu(self, node, mod):
        a = mod.weight.detach().double().abs().max().item()
        return self.unary(max(1.0, a), type(mod).__name__)

    def module_identity(self, node, mod):
        return self.unary(1.0, type(mod).__name__, note=False)

    def module_linear(self, node, mod):
        W = mod.weight
        return self.unary(spectral_norm_up(W), f"Linear({W.shape[1]}->{W.shape[0]}) spectral norm")

    def module_conv(self, node, mod):
        return self.unary(*self.conv_module(mod, shape_of(node.args[0]), CONVS[rule_class(mod)]))

    def module_batch_norm(self, node, mod):
        kind = type(mod).__name__
        if mod.running_var is None:
            self.fail(kind, "track_running_stats=False: in eval it normalises with batch statistics")
        return self.unary(self.bn_factor(mod.running_var, mod.weight, mod.eps), f"{kind} (eval)")

    def module_max_pool(self, node, mod):
        kind = type(mod).__name__
        if mod.return_indices:
            self.fail(kind, "return_indices=True")
        f = maxpool_factor(mod.kernel_size, mod.stride, mod.dilation, MAX_POOLS[rule_class(mod)])
        return self.unary(f, f"{kind}(k={mod.kernel_size}, s={mod.stride}, d={mod.dilation})")

    def module_avg_pool(self, node, mod):
        return self.unary(schur_factor(mod, shape_of(node.args[0])), f"{type(mod).__name__} (Schur test)")

    def module_adaptive_max_pool(self, node, mod):
        kind = type(mod).__name__
        return self.unary(self.adaptive_max_factor(mod.output_size, kind), kind)

    def module_upsample(self, node, mod):
        if mod.mode not in LINEAR_INTERPOLATION:
            self.fail(f"Upsample(mode={mod.mode!r})", "its weights can be negative")
        return self.unary(schur_factor(mod, shape_of(node.args[0])), f"Upsample({mod.mode}) (Schur test)")

    def module_copy_pad(self, node, mod):
        return self.unary(copy_factor(mod, shape_of(node.args[0])), type(mod).__name__)

    def conv_module(self, mod, shape, nd):
        if shape is None:
            self.fail(type(mod).__name__, "input shape unknown")
        rp = mod._reversed_padding_repeated_twice  # the padding forward applies (per axis, last first)
        pads = tuple((rp[2 * (nd - 1 - d)], rp[2 * (nd - 1 - d) + 1]) for d in range(nd))
        W = mod.weight.detach().cpu().double()
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]

        def apply(x):
            return conv(F.pad(x, rp, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode), W, None,
                        mod.stride, 0, mod.dilation, mod.groups)

        f, how = self.conv_bound(W, shape[-nd:], pads, mod.padding_mode, mod.stride, mod.dilation, mod.groups, apply)
        desc = (f"{type(mod).__name__}({mod.in_channels}->{mod.out_channels}, k={mod.kernel_size}, s={mod.stride}, "
                f"p={mod.padding}, d={mod.dilation}, g={mod.groups}, {mod.padding_mode}) {how}")
        return f, desc

    def conv_bound(self, W, spatial, pads, mode, stride, dilation, groups, apply):
        nd = W.dim() - 2
        try:
            return _conv_bound(W, tuple(spatial), pads, mode, ntuple(stride, nd), ntuple(dilation, nd), groups,
                               self.conv_method, apply)
        except UnsupportedOpError as e:
            self.fail(self.op_name(), str(e))

    @staticmethod
    def bn_factor(var, weight, eps) -> float:
        # |γ|/√(var + ε): three roundings (add, sqrt, divide), one more for |γ|·
        scale = 1.0 / torch.sqrt(var.detach().cpu().double() + float(eps))
        if weight is not None:
            scale = scale * weight.detach().cpu().double().abs()
        return up(scale.abs().max().item(), 4)

    def adaptive_max_factor(self, output_size, what):
        # only global max pooling: one window holding every element, |max a − max b| ≤ ‖a − b‖
        sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
        if any(s != 1 for s in sizes):
            self.fail(what, "only global (output size 1) adaptive max pooling is bounded")
        return 1.0

    # -- functions and methods ---------------------------------------------------------

    def rule_activation(self, node):
        name, params = self.activation_params(node)
        return self.activation(name, params, node.args[0] if node.args else node.kwargs.get("input"))

    def activation(self, name, params, x):
        meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
        try:
            f = activations.factor(name, params, getattr(meta, "dtype", torch.float32))
        except activations.Refusal as e:
            self.fail(name, str(e))
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return self.unary(f, f"{name}({shown})", note=name not in ("neg", "negative", "pos", "positive"))

    def rule_clamp(self, node):
        # |clamp(a) − clamp(b)| ≤ |a − b| for fixed bounds; bound tensors may broadcast
        return self.unary(self.broadcast_ratio(node.args[0]), "clamp")

    def rule_dropout(self, node):
        training = arg(node, 2, "training", True)
        if training is not False:
            self.fail(self.op_name(), "training=True: it is random even in eval")
        return self.unary(1.0, "dropout", note=False)

    def rule_reshape(self, node):
        # a bijection of the entries (or a cast between floating types); `view(dtype)`
        # reinterprets bits instead
        out, inp = shape_of(node), shape_of(node.args[0])
        if node.target == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            self.fail("view(dtype)", "reinterprets bits")
        if out is not None and inp is not None and math.prod(out) != math.prod(inp):
            self.fail(self.op_name(), "changes the number of entries")
        return self.unary(1.0, self.op_name(), note=False)

    def rule_getattr(self, node):
        if node.args[1] not in ("T", "mT", "mH", "H"):
            self.fail(f"attribute .{node.args[1]}")
        return self.unary(1.0, f".{node.args[1]}", note=False)

    def rule_copy(self, node):
        x = node.args[0]
        if shape_of(x) is None:
            self.fail(self.op_name(), "input shape unknown")
        run = self.runner(node, x)
        try:
            f = copy_factor(run, shape_of(x))
        except UnsupportedOpError as e:
            self.fail(self.op_name(), str(e))
        return self.unary(f, self.op_name(), note=f != 1.0)

    def rule_getitem(self, node):
        x = node.args[0]
        if self.is_dep(x) and not hasattr(x.meta.get("tensor_meta"), "shape"):
            # an element of a tuple (split, chunk, unbind): a projection of its parts
            return self.unary(1.0, "getitem", note=False)
        return self.rule_copy(node)

    def rule_pad(self, node):
        mode = arg(node, 2, "mode", "constant")
        if mode == "constant":
            return self.unary(1.0, "pad", note=False)  # constant entries: differences unchanged
        x = node.args[0]
        pad = self.resolve(arg(node, 1, "pad"), x, None)
        f = copy_factor(lambda t: F.pad(t, pad, mode=mode), shape_of(x))
        return self.unary(f, f"pad({mode})")

    def rule_add(self, node):
        return self.add_sub(node)

    def rule_sub(self, node):
        return self.add_sub(node)

    def add_sub(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        alpha = arg(node, 2, "alpha", 1)
        if isinstance(alpha, torch.fx.Node):
            self.fail(self.op_name(), "alpha is not a python number")
        ra = self.broadcast_ratio(a) if self.is_dep(a) else 1.0
        rb = self.broadcast_ratio(b) if self.is_dep(b) else 1.0
        la, lb = ra * self.lip(a), abs(float(alpha)) * rb * self.lip(b)
        L = up(la + lb, 5)
        if self.is_dep(a) and self.is_dep(b):
            self.note(f"{self.op_name()} ({la:.4g} + {lb:.4g})", L / max(self.lip(a), self.lip(b), 1e-300))
        elif max(ra, rb) > 1 or alpha != 1:
            self.note(f"{self.op_name()} (broadcast x{max(ra, rb) ** 2:g}, alpha {alpha})",
                      L / max(self.lip(a), self.lip(b), 1e-300))
        return L

    def rule_mul(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if self.is_dep(a) and self.is_dep(b):
            self.fail(self.op_name(), "product of two input-dependent tensors")
        x, c = (a, b) if self.is_dep(a) else (b, a)
        cmax = self.const_value(c, self.op_name()).abs().max().item()
        f = cmax * self.broadcast_ratio(x)
        self.note(f"{self.op_name()} by a constant (max |c| = {cmax:.4g})", f)
        return up(f * self.L[x], 2)

    def rule_div(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if arg(node, 2, "rounding_mode") is not None:
            self.fail(self.op_name(), "rounding division is discontinuous")
        if not self.is_dep(a) or self.is_dep(b):
            self.fail(self.op_name(), "division by an input-dependent tensor")
        c = self.const_value(b, self.op_name()).abs()
        if c.numel() == 0 or not bool((c > 0).all()):
            self.fail(self.op_name(), "division by a constant with a zero entry")
        inv = up((1.0 / c).max().item())
        f = inv * self.broadcast_ratio(a)
        self.note(f"{self.op_name()} by a constant (max 1/|c| = {inv:.4g})", f)
        return up(f * self.L[a], 2)

    def rule_matmul(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if self.is_dep(a) and self.is_dep(b):
            self.fail(self.op_name(), "product of two input-dependent tensors")
        x, c = (a, b) if self.is_dep(a) else (b, a)
        W = self.const_value(c, self.op_name())
        if W.dim() > 2 or len(shape_of(x) or ()) < 2:
            self.fail(self.op_name(), "only a constant vector or matrix times a batched tensor is bounded")
        f = spectral_norm_up(W.reshape(-1, 1) if W.dim() == 1 else W)
        self.note(f"matmul by a constant {tuple(W.shape)}", f)
        return up(f * self.L[x])

    def rule_linear(self, node):
        W = self.const_value(arg(node, 1, "weight"), "linear")
        if W.dim() != 2:
            self.fail("linear", "weight must be a matrix")
        return self.unary(spectral_norm_up(W), f"linear({W.shape[1]}->{W.shape[0]}) spectral norm")

    def rule_conv(self, node):
        nd = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[node.target]
        W = self.const_value(arg(node, 1, "weight"), "conv")
        stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
        dilation, groups = ntuple(arg(node, 5, "dilation", 1), nd), arg(node, 6, "groups", 1)
        k = W.shape[2:]
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            tot = [dilation[d] * (k[d] - 1) for d in range(nd)]
            pads = tuple((t // 2, t - t // 2) for t in tot)
        else:
            pads = tuple((p, p) for p in ntuple(padding, nd))
        rp = [p for lr in reversed(pads) for p in lr]
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]

        def apply(x):
            return conv(F.pad(x, rp), W, None, stride, 0, dilation, groups)

        f, how = self.conv_bound(W, shape_of(node.args[0])[-nd:], pads, "zeros", stride, dilation, groups, apply)
        return self.unary(f, f"conv{nd}d({W.shape[1] * groups}->{W.shape[0]}) {how}")

    def rule_batch_norm(self, node):
        if arg(node, 5, "training", False):
            self.fail("batch_norm", "training=True normalises with batch statistics")
        var = self.const_value(arg(node, 2, "running_var"), "batch_norm running_var")
        w = arg(node, 3, "weight")
        w = None if w is None else self.const_value(w, "batch_norm weight")
        return self.unary(self.bn_factor(var, w, arg(node, 7, "eps", 1e-5)), "batch_norm (eval)")

    def rule_max_pool(self, node):
        if arg(node, 6, "return_indices", False):
            self.fail(self.op_name(), "return_indices=True")
        nd = len(shape_of(node.args[0])) - 2
        k = arg(node, 1, "kernel_size")
        f = maxpool_factor(k, arg(node, 2, "stride"), arg(node, 4, "dilation", 1), nd)
        return self.unary(f, f"{self.op_name()}(k={k})")

    def rule_avg_pool(self, node):
        x = node.args[0]
        args, kwargs = self.resolve((node.args[1:], dict(node.kwargs)), x, None)
        fn = node.target
        f = schur_factor(lambda t: fn(t, *args, **kwargs), shape_of(x))
        return self.unary(f, f"{self.op_name()} (Schur test)")

    def rule_adaptive_max_pool(self, node):
        if arg(node, 2, "return_indices", False):
            self.fail(self.op_name(), "return_indices=True")
        return self.unary(self.adaptive_max_factor(arg(node, 1, "output_size"), self.op_name()), self.op_name())

    def rule_interpolate(self, node):
        mode = arg(node, 3, "mode", "nearest")
        if mode not in LINEAR_INTERPOLATION:
            self.fail(f"interpolate(mode={mode!r})", "its weights can be negative")
        return self.rule_avg_pool(node)

    def reduced_dims(self, node, default_all: bool):
        shape = shape_of(node.args[0])
        dims = arg(node, 1, "dim", None)
        if dims is None or dims == () or dims == []:
            if not default_all:
                return None
            dims = range(len(shape))
        # (a reduction over the batch dimension, wherever it is, was refused by graph.check_batch)
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list, range)) else (dims,))}
        return math.prod(shape[d] for d in dims)

    def rule_mean(self, node):
        # (Σ x_i)/n over disjoint groups: Cauchy–Schwarz, ‖P‖₂ = 1/√n exactly
        n = self.reduced_dims(node, True)
        return self.unary(up(1.0 / math.sqrt(n), 2), f"mean over {n}")

    def rule_sum(self, node):
        n = self.reduced_dims(node, True)
        return self.unary(up(math.sqrt(n)), f"sum over {n}")

    def rule_amax(self, node):
        self.reduced_dims(node, True)
        return self.unary(1.0, "amax")  # one window per output: |max a − max b| ≤ ‖a − b‖

    def rule_cat(self, node):
        parts = arg(node, 0, "tensors")
        deps = [p for p in parts if self.is_dep(p)]
        if shape_of(node) is None:  # (along the batch dimension: refused by graph.check_batch)
            self.fail(self.op_name(), "shapes unknown")
        L = up(self.lip(list(parts)), 2 * len(parts) + 2)
        if len(deps) > 1:
            self.note(f"{self.op_name()} of {len(deps)} (quadrature)", L / max(self.lip(p) for p in deps))
        return L
