"""Trace a module once and check that the trace can be trusted; every analysis (the global
Lipschitz bound today, local bounds next) runs over the :class:`TracedGraph` built here.

:func:`trace` wraps the module so that it is itself a node, traces it with ``torch.fx``,
classifies every node as input-dependent (``"dep"``), constant (``"const"``) or depending on
the input's shape only (``"meta"``), runs it on a zeros input to record shapes and the
values of constant nodes, and checks that the trace computes what the module computes.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules import module as _module
from torch.nn.utils import parametrizations, parametrize

from gmfast.lipschitz.errors import ADVICE, UnsupportedOpError
from gmfast.lipschitz.ops import function_kind, is_meta, module_kind


# ----------------------------------------------------------------------------- trust checks

#: Forward pre-hooks of the old ``torch.nn.utils.spectral_norm``/``weight_norm``: they set the
#: weight attribute from the stored parameters before each call (deterministically in eval),
#: and every rule reads the weight through that attribute after a call, so the rule sees what
#: forward uses.
_KNOWN_PRE_HOOKS = (importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm,
                    importlib.import_module("torch.nn.utils.weight_norm").WeightNorm)
#: ``parametrize`` parametrizations whose value is a deterministic function of the stored
#: tensors (``_SpectralNorm`` only in eval: in training each call runs a power iteration).
_KNOWN_PARAMETRIZATIONS = (parametrizations._SpectralNorm, parametrizations._Orthogonal,
                           parametrizations._WeightNorm)
#: Modules whose forward reads the training flag: batch statistics, random masks or slopes,
#: a power iteration per call.
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.modules.dropout._DropoutNd, nn.RReLU, nn.MultiheadAttention, parametrizations._SpectralNorm)
#: Global hook tables that change what a module call computes (or which module is called).
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
_CALL_PATH = ("__call__", "_call_impl", "_wrapped_call_impl")
_REMEDY = ("the traced graph does not show what it does, so no bound would hold; remove it before bounding (or "
           f"{ADVICE})")


def _shown(name: str, m: nn.Module) -> str:
    return f"module {name!r} ({type(m).__name__})" if name else f"{type(m).__name__} (the root)"


def check_trust(module: nn.Module) -> None:
    """Refuse every way a module call can compute something other than what the rules read
    from the module's class and attributes (and what the trace shows).

    A *leaf* (a module the trace records as one ``call_module`` node: torch's own layers and
    modules with ``lipschitz_constant``) gets the rule of its class, so for a leaf and every
    module inside it these are refused:

    * forward hooks and pre-hooks (with kwargs or always called, which are also in the
      ``_forward_hooks`` table): a hook can replace the input or output, and the trace does
      not run it (the trace-vs-module check runs the leaf on both sides, so it cannot see
      it). Backward hooks do not change forward values and are allowed;
    * an instance attribute ``forward``, ``__call__``, ``_call_impl`` or
      ``_wrapped_call_impl``, and a class that overrides ``__call__``,
      ``_call_impl`` or ``_wrapped_call_impl``: the call then does not run the class's
      ``forward``.

    A module that is not a leaf is traced *through* its call, hooks and instance ``forward``
    included (``torch.fx`` patches ``nn.Module.__call__``, which runs them on proxies), so
    they are in the graph and need no check. Everywhere:

    * global forward hooks (they run at every leaf call) and global registration hooks (they
      can swap a submodule, parameter or buffer when the tracer copies it);
    * parametrizations other than torch's spectral norm, orthogonal and weight norm;
    * a compiled call (``module.compile()``): it runs a compiled function, not forward;
    * in train mode, only modules whose forward reads the training flag
      (:data:`_MODE_DEPENDENT`, and the old spectral norm's hook) are refused.
    """
    for table in _GLOBAL_HOOKS:
        hooks = getattr(_module, table, None)
        if hooks:
            raise UnsupportedOpError(f"a global module hook is registered (torch.nn.modules.module.{table}: "
                                     f"{list(hooks.values())[:3]}): it changes every module call and {_REMEDY}")
    for attr in _CALL_PATH:
        f = getattr(nn.Module, attr)
        if getattr(f, "__module__", None) != _module.__name__:
            raise UnsupportedOpError(f"torch.nn.Module.{attr} has been replaced ({f!r}): module calls do not run "
                                     "as traced; restore it")
    is_leaf, leaves = _Tracer().is_leaf_module, []

    def inside_leaf(name):
        return any(p == "" or name == p or name.startswith(p + ".") for p in leaves)

    for name, m in module.named_modules(remove_duplicate=False):
        where = _shown(name, m)
        if not inside_leaf(name) and is_leaf(m, name):
            leaves.append(name)
            fwd = type(m).forward
            if not hasattr(m, "lipschitz_constant") and not getattr(fwd, "__module__", "").startswith("torch."):
                raise UnsupportedOpError(f"{where}: {type(m).__name__}.forward has been replaced ({fwd!r}), so its "
                                         f"rule does not describe it; {_REMEDY}")
        odd = [(k, type(t).__name__) for k, t in list(m.named_parameters(recurse=False))
               + list(m.named_buffers(recurse=False)) if type(t) not in (torch.Tensor, nn.Parameter)]
        if odd:
            raise UnsupportedOpError(f"{where}: the tensor subclasses {odd} can change what every op on them "
                                     f"computes (__torch_function__); use plain tensors (or {ADVICE})")
        if m.training and (isinstance(m, _MODE_DEPENDENT) or any(isinstance(h, _KNOWN_PRE_HOOKS[0])
                                                                 for h in m._forward_pre_hooks.values())):
            raise ValueError(f"{where} is in train mode; call .eval() first (its forward depends on the training "
                             "flag: batch statistics, random masks or slopes, or a power iteration per call, so no "
                             "bound would hold)")
        if parametrize.is_parametrized(m):
            for tensor, plist in m.parametrizations.items():
                other = [type(p).__name__ for p in plist if not isinstance(p, _KNOWN_PARAMETRIZATIONS)]
                if other:
                    raise UnsupportedOpError(f"{where}: the parametrization {other} of {tensor!r} is not one whose "
                                             "value the rules can trust (torch's spectral_norm, orthogonal and "
                                             f"weight_norm are); {ADVICE}")
        if vars(m).get("_compiled_call_impl") is not None:
            raise UnsupportedOpError(f"{where} is compiled (module.compile()): its call runs a compiled function "
                                     "instead of forward; bound the uncompiled module")
        if not inside_leaf(name):
            continue  # traced through: its call is in the graph
        if m._forward_hooks or getattr(m, "_forward_hooks_with_kwargs", None) \
                or getattr(m, "_forward_hooks_always_called", None):
            raise UnsupportedOpError(f"{where} has a forward hook ({list(m._forward_hooks.values())[:3]}): "
                                     f"{_REMEDY}")
        unknown = [h for h in m._forward_pre_hooks.values() if not isinstance(h, _KNOWN_PRE_HOOKS)]
        if unknown:
            raise UnsupportedOpError(f"{where} has a forward pre-hook ({unknown[:3]}): {_REMEDY}")
        for attr in ("forward",) + _CALL_PATH:
            if attr in vars(m):
                raise UnsupportedOpError(f"{where} has an instance attribute {attr!r} that replaces its class's "
                                         f"call: {_REMEDY}")
        for attr in _CALL_PATH:
            if getattr(type(m), attr) is not getattr(nn.Module, attr):
                raise UnsupportedOpError(f"{where}: its class overrides {attr}, so a call does not run forward "
                                         f"as traced; {_REMEDY}")


# ----------------------------------------------------------------------------- tracing


class _Tracer(torch.fx.Tracer):
    """Also treats a module with a ``lipschitz_constant`` attribute as a leaf."""

    def is_leaf_module(self, m, qualname):
        return hasattr(m, "lipschitz_constant") or super().is_leaf_module(m, qualname)


class _Root(nn.Module):
    """Wrapper so that the traced module itself is a ``call_module`` node (a bare Linear,
    Conv or BatchNorm then gets its module rule)."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


class _Recorder(ShapeProp):
    """ShapeProp that also keeps the values of the given nodes (constants, shape queries)."""

    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep = keep
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            self.values[n] = out
        return out


class TracedGraph:
    """One traced module: ``gm`` (its graph, the module under the name ``m``), ``kind``
    (node → "dep" / "const" / "meta"), ``values`` (node → value on the zeros input, for
    constant and meta nodes) and ``tensor_meta`` shapes on every node."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.kind = {}
        self.values = {}

    @property
    def nodes(self):
        return self.gm.graph.nodes

    def classify(self):
        """Which nodes depend on the input's values (from the graph's structure alone)."""
        first = True
        for node in self.nodes:
            if node.op == "placeholder":
                if first:
                    self.kind[node], first = "dep", False
                elif node.args:  # an argument with a default value
                    self.kind[node] = "const"
                else:
                    raise ValueError(f"forward takes a second required input {node.name!r}; only one is supported")
            elif node.op == "get_attr":
                self.kind[node] = "const"
            elif node.op != "output":
                kinds = {self.kind[a] for a in node.all_input_nodes}
                if "dep" in kinds:
                    self.kind[node] = "meta" if is_meta(node) else "dep"
                else:
                    self.kind[node] = "meta" if "meta" in kinds else "const"
        return {n for n, k in self.kind.items() if k != "dep"}

    def display_name(self, node) -> str:
        if node.op == "call_module":
            return node.target[2:] if node.target != "m" else type(self.gm.m).__name__
        return node.name


def dtype_device(module: nn.Module):
    """The dtype and device of the module's first floating parameter or buffer."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def trace(module: nn.Module, input_shape: tuple) -> TracedGraph:
    """Check that the module's calls are what the trace can show (:func:`check_trust`),
    trace, classify, propagate shapes (and constant values) on a zeros input."""
    check_trust(module)
    tracer = _Tracer()
    root = _Root(module)
    try:
        graph = tracer.trace(root)
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as e:
        raise UnsupportedOpError(f"torch.fx cannot trace {type(module).__name__} ({e}): no Lipschitz rule; "
                                 f"{ADVICE}") from e
    tg = TracedGraph(torch.fx.GraphModule(tracer.root, graph))
    keep = tg.classify()
    dtype, device = dtype_device(module)
    rec = _Recorder(tg.gm, keep)
    try:
        with torch.no_grad():
            rec.propagate(torch.zeros((1,) + input_shape, dtype=dtype, device=device))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{type(module).__name__} failed on an input of shape {(1,) + input_shape}: {e}") from e
    tg.values = rec.values
    check_casts(tg)
    check_batch(tg, dtype, device, input_shape)
    return tg


def _lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every ``src`` value is exactly a ``dst`` value (float16 → float32 → float64,
    bfloat16 → float32): then the cast is the identity on values."""
    if src == dst:
        return True
    if not (src.is_floating_point and dst.is_floating_point):
        return False
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.eps <= a.eps and b.max >= a.max and b.smallest_normal <= a.smallest_normal and b.bits >= a.bits


def check_casts(tg: TracedGraph) -> None:
    """A cast to a narrower floating type (``.half()``, ``.bfloat16()``, ``.to(dtype)``,
    ``.type(...)``, ``type_as``, a round trip through ``.float()`` in a float64 module, or a
    type promotion) rounds: a step function with no Lipschitz constant, so it is refused. So
    is every reinterpretation of bits (``view(dtype)``, positional or keyword). Found from the
    dtypes recorded on the zeros input, whatever the spelling."""
    for node in tg.nodes:
        if tg.kind.get(node) != "dep":
            continue
        if node.op == "call_method" and node.target == "view" and (
                "dtype" in node.kwargs or any(isinstance(a, torch.dtype) for a in node.args[1:])):
            raise UnsupportedOpError(f"node {tg.display_name(node)!r} (view(dtype)): reinterprets bits, not a "
                                     f"Lipschitz function; {ADVICE}")
        out = node.meta.get("tensor_meta")
        dst = getattr(out, "dtype", None)
        if dst is None or not dst.is_floating_point:
            continue  # non-floating results are refused by the walk
        for a in node.all_input_nodes:
            src = getattr(a.meta.get("tensor_meta"), "dtype", None)
            # (a non-floating source is refused by the walk, at the op that produced it)
            if tg.kind.get(a) == "dep" and src is not None and src.is_floating_point and not _lossless(src, dst):
                raise UnsupportedOpError(f"node {tg.display_name(node)!r} casts {src} to {dst}: rounding to a "
                                         "narrower type is a step function with no Lipschitz constant; remove the "
                                         f"cast from the encoder (or {ADVICE})")


# ----------------------------------------------------------------------------- batch coupling

#: Kinds whose op acts on each position of its operands separately (broadcasting aside).
_ELEMENTWISE = {"activation", "prelu", "clamp", "dropout", "add", "sub", "mul", "div", "exp", "sqrt", "rsqrt",
                "reciprocal", "square", "pow"}
#: Kinds that only move, copy or drop entries (or add constants): checked with index probes.
_MOVES = {"reshape", "copy", "getitem", "getattr", "pad", "copy_pad", "identity"}
#: Kinds that treat dim 0 as the batch and need a batched input (spatial dims from the name).
_BATCH_FIRST = {"conv", "batch_norm", "max_pool", "avg_pool", "adaptive_max_pool", "upsample", "interpolate"}


class _BatchRun(torch.fx.Interpreter):
    """Runs the graph on a batch and keeps every node's shape(s) and the values of the nodes
    that do not depend on the input's values (shape queries differ with the batch size)."""

    def __init__(self, tg):
        super().__init__(tg.gm)
        self.tg, self.shapes, self.values = tg, {}, {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            self.shapes[n] = [tuple(o.shape) for o in out]
        if self.tg.kind.get(n) in ("const", "meta"):
            self.values[n] = out.detach().cpu() if isinstance(out, torch.Tensor) else out
        return out


def _axis(s2, s3):
    """The batch axis of a tensor whose shape is ``s2`` for a batch of 2 and ``s3`` for 3:
    the one axis of size 2 and 3 in which they differ (None when there is no such axis: the
    batch was reduced, merged with another axis, or repeated)."""
    if not (isinstance(s2, tuple) and isinstance(s3, tuple)) or len(s2) != len(s3):
        return None
    diff = [i for i, (a, b) in enumerate(zip(s2, s3)) if a != b]
    return diff[0] if len(diff) == 1 and (s2[diff[0]], s3[diff[0]]) == (2, 3) else None


def check_batch(tg: TracedGraph, dtype, device, input_shape: tuple) -> None:
    """Refuse any op through which one sample's output can depend on another sample.

    The graph runs on batches of 2 and of 3; the batch axis of every input-dependent tensor
    is the axis whose size follows the batch (a tensor without one has reduced, merged or
    repeated the batch: refused). Then, per op kind: elementwise ops must keep the batch
    axes of their operands aligned; ops that only move entries (reshape, view, transpose,
    flip, roll, indexing, padding, ...) are run on two *index probes* (each entry holds its
    sample's number, plus an offset the second time, so moved entries and constants are told
    apart) and every moved entry must land in its own sample's slice; reductions must not
    reduce the batch axis (nor may softmax or LayerNorm normalise over it); Linear/matmul must
    not contract it, and a product of two input-dependent tensors needs it as the same leading
    dimension of both; convolutions, pooling, batch
    norm and interpolation need it first in a batched input; other ops (vouched modules)
    need it first in and out; every output needs it first.
    """
    runs = []
    for b in (2, 3):
        r = _BatchRun(tg)
        try:
            with torch.no_grad():
                r.run(torch.zeros((b,) + input_shape, dtype=dtype, device=device))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise UnsupportedOpError(f"the module fails on a batch of {b} inputs of shape {input_shape} ({e}): "
                                     "samples must be processed independently; no Lipschitz rule; "
                                     f"{ADVICE}") from e
        runs.append(r)
    r2, r3 = runs
    axes, unruled = {}, set()

    def fail(node, why):
        raise UnsupportedOpError(f"node {tg.display_name(node)!r} mixes samples of the batch ({why}): each "
                                 f"input's output must depend on that input alone; no Lipschitz rule; {ADVICE}")

    for node in tg.nodes:
        if node.op == "output":
            outs = [a for a in node.all_input_nodes if tg.kind.get(a) == "dep"]
            for a in outs:
                if axes.get(a) != 0 and a not in unruled:
                    fail(a, "an output whose first dimension is not the batch")
            return
        if tg.kind.get(node) != "dep":
            continue
        s2, s3 = r2.shapes.get(node), r3.shapes.get(node)
        if node.op == "placeholder":
            axes[node] = 0
            continue
        mod = tg.gm.get_submodule(node.target) if node.op == "call_module" else None
        if (module_kind(mod) if mod is not None else function_kind(node)[0]) is None \
                or any(a in unruled for a in node.all_input_nodes):
            unruled.add(node)  # an op without a rule (or after one): the walk refuses it by name
            continue
        if isinstance(s3, list):
            ax = [_axis(a, b) for a, b in zip(s2, s3)]
            if None in ax:
                fail(node, f"a part of shape {s2[ax.index(None)]} for a batch of 2 and {s3[ax.index(None)]} for 3")
        else:
            ax = _axis(s2, s3)
            if ax is None:
                fail(node, f"shape {s2} for a batch of 2 and {s3} for 3: the batch dimension is reduced, merged "
                           "or repeated")
        axes[node] = ax
        _check_op(tg, node, axes, r3, fail)


def _check_op(tg, node, axes, r3, fail):
    deps = [a for a in node.all_input_nodes if tg.kind.get(a) == "dep"]
    out = axes[node]
    mod = tg.gm.get_submodule(node.target) if node.op == "call_module" else None
    kind = module_kind(mod) if mod is not None else function_kind(node)[0]
    x = node.args[0] if node.args else None
    if kind is None:
        return  # no rule: the walk refuses it, naming the op
    if isinstance(x, torch.fx.Node) and isinstance(axes.get(x), list):  # an element of a tuple
        if kind != "getitem" or not isinstance(node.args[1], int):
            return  # the op that made the tuple has no rule (torch.sort ...): the walk refuses it
        if out != axes[x][node.args[1]]:
            fail(node, "an element of a split whose batch axis moved")
        return
    if kind in _ELEMENTWISE:
        rank = len(r3.shapes[node])
        for a in deps:
            if not isinstance(axes[a], int) or axes[a] + rank - len(r3.shapes[a]) != out:
                fail(node, "operands whose batch dimensions do not line up")
        return
    if kind in _MOVES:
        _probe(tg, node, mod, axes, r3, fail)
        return
    if kind in ("mean", "sum", "amax"):
        rank = len(r3.shapes[x])
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = r3.values.get(dims, dims) if isinstance(dims, torch.fx.Node) else dims
        dims = range(rank) if dims is None or dims == () or dims == [] else dims
        dims = dims if isinstance(dims, (tuple, list, range)) else (dims,)
        if axes[x] in {int(d) % rank for d in dims}:
            fail(node, f"a {kind} over the batch dimension")
        return
    if kind in ("softmax", "layer_norm"):
        rank = len(r3.shapes[x])
        if kind == "softmax":
            dim = mod.dim if mod is not None else node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if not isinstance(dim, int):
                fail(node, f"softmax needs an explicit integer dim; got {dim!r}")
            dims = {dim % rank}
        else:
            ns = mod.normalized_shape if mod is not None else \
                node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else ())
            ns = r3.values.get(ns, ns) if isinstance(ns, torch.fx.Node) else ns
            k = len(ns) if isinstance(ns, (tuple, list, torch.Size)) else 1
            dims = set(range(rank - k, rank))
        if axes[x] in dims or out != axes[x]:
            fail(node, f"a {kind} over the batch dimension")
        return
    if kind == "matmul" and len(deps) == 2:  # x @ y, both input-dependent: batch dims must line up
        a, b = node.args[0], node.args[1]
        ra, rb, ro = len(r3.shapes[a]), len(r3.shapes[b]), len(r3.shapes[node])
        if not (axes[a] < ra - 2 and axes[b] < rb - 2 and axes[a] - ra == axes[b] - rb == out - ro):
            fail(node, "a product of two input-dependent tensors whose batch dimensions are not the same leading "
                       "dimension of both")
        return
    if kind in ("linear", "matmul"):
        rank = len(r3.shapes[x] if isinstance(x, torch.fx.Node) else ())
        if kind == "matmul" and not tg.kind.get(x) == "dep":  # constant @ x: contracts x's dim -2
            x = node.args[1]
            rank = len(r3.shapes[x])
            if axes[x] == rank - 2 or rank < 3 and axes[x] == 0:
                fail(node, "a product that contracts the batch dimension")
        elif axes[x] == rank - 1:
            fail(node, "a product that contracts the batch dimension")
        if out != axes[x]:
            fail(node, "a product that moves the batch dimension")
        return
    if kind == "cat":
        parts = [p for p in node.args[0] if isinstance(p, torch.fx.Node) and tg.kind.get(p) == "dep"]
        if len({axes[p] for p in parts}) != 1:
            fail(node, "parts whose batch dimensions differ")
        a = axes[parts[0]]
        if node.target is torch.stack:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % (len(r3.shapes[node]))
            if out != a + (dim <= a):
                fail(node, "a stack that moves the batch dimension")
        elif out != a:
            fail(node, "a concatenation along the batch dimension")
        return
    if kind in _BATCH_FIRST:
        name = type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))
        nd = int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else None
        rank = len(r3.shapes[x])
        need = {"batch_norm": rank >= 2, "upsample": rank >= 3, "interpolate": rank >= 3}.get(
            kind, rank == (nd or 0) + 2)
        if axes[x] != 0 or out != 0 or not need:
            fail(node, f"{name} needs the batch first in a batched input; got the batch in dim {axes[x]} of a "
                       f"{rank}-d input")
        return
    for a in deps:  # anything else (vouched modules, ...): batch first in and out
        if axes[a] != 0 or out != 0:
            fail(node, "an op that needs the batch as its first dimension")


def _probe(tg, node, mod, axes, r3, fail):
    """Run a data-movement op on index probes (entry = its sample's number + offset) and check
    that every moved entry lands in its own sample's slice of the output."""
    x = node.args[0]
    a, shape = axes[x], r3.shapes[x]
    others = []

    def value(n):
        if n not in r3.values:
            others.append(n)
        return r3.values.get(n)

    args, kwargs = map_arg((tuple(node.args[1:]), dict(node.kwargs)), value)
    if others:
        fail(node, "a second input-dependent operand")

    def run(offset):
        view = [1] * len(shape)
        view[a] = shape[a]
        p = (torch.arange(1, shape[a] + 1, dtype=torch.float64).reshape(view) + offset).expand(shape).clone()
        if mod is not None:
            return mod(p)
        if node.op == "call_method":
            return getattr(p, node.target)(*args, **kwargs)
        if node.target is getattr:
            return getattr(p, args[0])
        return node.target(p, *args, **kwargs)

    try:
        with torch.no_grad():
            o1, o2 = run(0.0), run(1000.0)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        fail(node, f"the batch dimension could not be followed through it: {e}")
    parts1 = o1 if isinstance(o1, (tuple, list)) else (o1,)
    parts2 = o2 if isinstance(o2, (tuple, list)) else (o2,)
    outs = axes[node] if isinstance(axes[node], list) else [axes[node]]
    for p1, p2, ao in zip(parts1, parts2, outs):
        moved = (p2 - p1) == 1000.0
        want = torch.arange(1, p1.shape[ao] + 1, dtype=p1.dtype, device=p1.device).reshape(
            [-1 if i == ao else 1 for i in range(p1.dim())])
        if not bool(((p1 == want) | ~moved).all()) or not bool((moved | (p1 == p2)).all()):
            fail(node, f"{tg.display_name(node)} moves entries between samples")


def check_same_function(tg: TracedGraph, module: nn.Module, input_shape: tuple) -> None:
    """The graph must compute what the module computes: tracing turns ``a += b`` into an
    out-of-place add and bakes in python control flow; random ops differ run to run."""
    dtype, device = dtype_device(module)
    x = torch.randn((1,) + input_shape, generator=torch.Generator().manual_seed(12345)).to(device, dtype)
    with torch.no_grad():
        same = _outputs_match(tg.gm(x), module(x))
    if not same:
        raise UnsupportedOpError(f"the torch.fx trace of {type(module).__name__} computes a different function than "
                                 "the module (random ops, in-place updates of aliased tensors or python control "
                                 "flow): no Lipschitz rule; pass lipschitz=<float> explicitly")


def _outputs_match(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        scale = b.detach().abs().max().item() if b.numel() else 0.0
        return bool((a - b).abs().max().item() <= 1e-5 * scale + 1e-30) if b.numel() else True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_outputs_match(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_outputs_match(a[k], b[k]) for k in a)
    return a == b
