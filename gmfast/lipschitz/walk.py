"""The walk over a :class:`~gmfast.lipschitz.graph.TracedGraph` that every analysis shares.

An :class:`Analysis` computes one value per input-dependent node in topological order (the
global bound: a Lipschitz constant; a local bound: linear bounds, next). The walk resolves
each node to its *kind* (:mod:`gmfast.lipschitz.ops`) and calls the analysis's
``module_<kind>(node, mod)`` or ``rule_<kind>(node)``; a kind the analysis does not
implement, and every op outside the vocabulary, is refused with
:class:`~gmfast.lipschitz.errors.UnsupportedOpError` naming the node. Checks that do not
depend on the analysis (non-floating results, in-place updates seen by other nodes) live
here too.
"""

from __future__ import annotations

import torch
from torch.fx.node import map_arg

from gmfast.lipschitz.errors import ADVICE, UnsupportedOpError
from gmfast.lipschitz.graph import TracedGraph
from gmfast.lipschitz import activations
from gmfast.lipschitz.ops import (ACTIVATION_MODULES, activation_name, function_kind, may_alias, module_kind, op_name,
                                  rule_class)


class Analysis:
    """Base of the analyses over one traced graph. Subclasses implement ``input(node)``,
    ``output(node)``, ``covers(new, old)`` and the per-kind rules."""

    def __init__(self, tg: TracedGraph):
        self.tg = tg
        self.gm = tg.gm
        self.kind = tg.kind
        self.values = tg.values
        self.out = {}  # node -> this analysis's value
        self.node = None

    # -- to implement --------------------------------------------------------------------

    def input(self, node):
        """The value of the input placeholder."""
        raise NotImplementedError

    def output(self, node):
        """The result, from the output node (whose ``args[0]`` holds the outputs)."""
        raise NotImplementedError

    def covers(self, new, old) -> bool:
        """Whether an in-place op whose value is ``new`` leaves ``old`` (the value of the
        tensor it overwrites) valid for every other node that sees that tensor."""
        return False

    # -- the walk ------------------------------------------------------------------------

    def run(self):
        for node in self.tg.nodes:
            self.node = node
            if node.op == "output":
                return self.output(node)
            if self.kind[node] != "dep":
                continue
            if node.op == "placeholder":
                self.out[node] = self.input(node)
                continue
            meta = node.meta.get("tensor_meta")
            if hasattr(meta, "dtype") and not meta.dtype.is_floating_point:
                self.fail(self.op_name(), f"its result is {meta.dtype}, not a real-valued function")
            if node.op == "call_module":
                mod = self.gm.get_submodule(node.target)
                kind = module_kind(mod)
                # an activation may have a rule of its own name (module_leaky_relu), else the
                # family's rule (module_activation)
                rule = getattr(self, f"module_{ACTIVATION_MODULES[rule_class(mod)]}", None) \
                    if kind == "activation" else None
                rule = rule or (getattr(self, f"module_{kind}", None) if kind else None)
                if rule is None:
                    self.fail(f"module {type(mod).__name__}")
                value = rule(node, mod)
                inplace = bool(getattr(mod, "inplace", False))
            else:
                kind, inplace = function_kind(node)
                rule = getattr(self, f"rule_{activation_name(node)}", None) if kind == "activation" else None
                rule = rule or (getattr(self, f"rule_{kind}", None) if kind else None)
                if rule is None:
                    self.fail(inplace if kind is None else self.op_name())
                value = rule(node)
            if inplace:
                self.check_inplace(node, value)
            self.out[node] = value
        raise UnsupportedOpError("the traced graph has no output")

    def check_inplace(self, node, value):
        """An in-place op changes its first argument and every tensor that aliases it. If the
        analysis says the new value is covered by the old one, every such tensor keeps a valid
        value; otherwise no other node may observe the change: each tensor on the alias chain
        back to the freshly computed one must have no user but the next one in the chain."""
        a = node.args[0]
        if self.covers(value, self.out[a]):
            return
        chain, nxt = a, node
        while True:
            if set(chain.users) != {nxt}:
                self.fail(f"in-place {self.op_name()}", f"{chain.name!r} is also used elsewhere")
            if not (may_alias(self.gm, chain) and chain.args and isinstance(chain.args[0], torch.fx.Node)):
                return
            chain, nxt = chain.args[0], chain

    # -- helpers -------------------------------------------------------------------------

    def fail(self, what: str, why: str = ""):
        name = self.tg.display_name(self.node)
        detail = f": {why}" if why else ""
        raise UnsupportedOpError(f"node {name!r} ({what}{detail}): no Lipschitz rule; {ADVICE}")

    def display_name(self, node) -> str:
        return self.tg.display_name(node)

    def op_name(self) -> str:
        return op_name(self.node)

    def is_dep(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and self.kind.get(a) == "dep"

    def deps(self, node=None):
        """The input-dependent nodes among ``node``'s inputs."""
        return [a for a in (node or self.node).all_input_nodes if self.kind[a] == "dep"]

    def const_value(self, a, what: str):
        """A python number or the value of a constant node, as a float64 tensor."""
        if isinstance(a, bool) or a is None:
            self.fail(what, f"unsupported operand {a!r}")
        if isinstance(a, (int, float)):
            return torch.tensor(float(a), dtype=torch.float64)
        if isinstance(a, torch.fx.Node) and self.kind.get(a) == "const":
            v = self.values.get(a)
            if isinstance(v, torch.Tensor) and not (v.is_complex() or v.dtype == torch.bool):
                return v.detach().cpu().to(torch.float64)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return torch.tensor(float(v), dtype=torch.float64)
        if isinstance(a, torch.fx.Node) and self.kind.get(a) == "meta":
            self.fail(what, "the operand depends on the input's shape")
        if self.is_dep(a):
            self.fail(what, "the operand depends on the input")
        self.fail(what, f"unsupported operand {a!r}")

    def activation_params(self, node, mod=None):
        """``(name, params)`` of an activation node (module ``mod``, or a function/method
        call with its positional and keyword arguments matched to torch's signature; constant
        operands resolved to their values): the one description every analysis reads
        (:mod:`gmfast.lipschitz.activations`)."""
        if mod is not None:
            return activations.module_params(mod, rule_class(mod))
        name = activation_name(node)
        x = node.args[0] if node.args else node.kwargs.get("input")
        args, kwargs = self.resolve((tuple(node.args[1:]), dict(node.kwargs)), x, None)
        try:
            return activations.call_params(name, args, kwargs)
        except activations.Refusal as e:
            self.fail(name, str(e))

    def runner(self, node, x):
        """``t ↦`` the node's op applied to ``t`` in place of ``x`` (its other arguments resolved
        to their recorded values): a method call or a function call."""
        args, kwargs = self.resolve((tuple(node.args[1:]), dict(node.kwargs)), x, None)
        if node.op == "call_method":
            return lambda t: getattr(t, node.target)(*args, **kwargs)
        return lambda t: node.target(t, *args, **kwargs)

    def resolve(self, args, x_node, x_value):
        """``args`` with ``x_node`` replaced by ``x_value`` and every other node by its recorded
        value (constants and shape queries); another input-dependent node is an error."""

        def value(n):
            if n is x_node:
                return x_value
            if self.kind.get(n) in ("const", "meta"):
                v = self.values[n]
                return v.detach().cpu() if isinstance(v, torch.Tensor) else v  # the probes run on the CPU
            self.fail(self.op_name(), "a second input-dependent operand")

        return map_arg(args, value)
