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
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules import module as _module
from torch.nn.utils import parametrizations, parametrize

from gmfast.lipschitz.errors import ADVICE, UnsupportedOpError
from gmfast.lipschitz.ops import is_meta


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
    is_leaf, leaves = _Tracer().is_leaf_module, []
    for name, m in module.named_modules(remove_duplicate=False):
        where = _shown(name, m)
        if is_leaf(m, name) and not any(name == p or name.startswith(p + ".") for p in leaves):
            leaves.append(name)
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
        if not any(name == p or name.startswith(p + ".") for p in leaves):
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
