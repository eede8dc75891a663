"""Trace a module once and check that the trace can be trusted; every analysis (the global
Lipschitz bound today, local bounds next) runs over the :class:`TracedGraph` built here.

:func:`trace` wraps the module so that it is itself a node, traces it with ``torch.fx``,
classifies every node as input-dependent (``"dep"``), constant (``"const"``) or depending on
the input's shape only (``"meta"``), runs it on a zeros input to record shapes and the
values of constant nodes, and checks that the trace computes what the module computes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from gmfast.lipschitz.errors import ADVICE, UnsupportedOpError
from gmfast.lipschitz.ops import is_meta


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
    """Trace, classify, propagate shapes (and constant values) on a zeros input."""
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
    return tg


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
