"""Elementwise activations: what torch computes for each module or function *with its
arguments*, and the global Lipschitz factor of that function for every argument value.

:func:`activation_params` turns a module, or a function call with positional or keyword
arguments, into ``(name, params)``: one canonical description that every analysis reads
(the global factor here; tangent/secant bounds of a local analysis later). :func:`factor`
gives ``sup |σ'|`` over the real line, or raises :class:`Refusal` when the function is
discontinuous or not Lipschitz for those arguments. Derivations (each holds for all
arguments allowed; the constants are rounded up):

* ReLU, ReLU6, Hardtanh(min, max) (a clamp; torch refuses min > max), Tanh, Softsign
  ``1/(1+|x|)²``, Tanhshrink ``tanh² x``, LogSigmoid ``σ(−x)``, abs, neg: 1.
* Softshrink(λ): 0 on ``[−λ, λ]``, ``x ∓ λ`` outside; continuous with slope ≤ 1 for
  ``λ ≥ 0``; for ``λ < 0`` the branches overlap and jump (torch refuses it too).
* LeakyReLU(s): slopes 1 and s: ``max(1, |s|)``, any real s. RReLU(l, u) in eval is the
  LeakyReLU of slope ``(l + u)/2`` (in training the slope is random: refused).
* ELU(α): ``x`` for x > 0, ``α(eˣ − 1)`` below; continuous at 0 for any α, slope ``αeˣ``
  with ``|αeˣ| < |α|``: ``max(1, |α|)``, α of either sign.
* CELU(α) = ``max(0, x) + min(0, α(e^{x/α} − 1))``: for α > 0 the slope below 0 is
  ``e^{x/α} ≤ 1``: factor 1. For α < 0, ``e^{x/α}`` grows without bound as x → −∞ (not
  Lipschitz); α = 0 divides by zero: both refused.
* Threshold(t, v): ``x`` if x > t else v: a jump of ``|t − v|`` at t unless ``v = t``, when it
  is ``max(x, t)`` (factor 1). ``v ≠ t`` is refused.
* Softplus(β, t): ``log(1 + e^{βx})/β`` where ``βx ≤ t``, else ``x``. The smooth branch has
  slope ``σ(βx) ∈ (0, 1)`` for any β ≠ 0, but at the switch ``x = t/β`` the function jumps by
  ``log(1 + e^{−t})/|β| > 0``: it is discontinuous for every finite t. The jump is accepted
  only when it is below the rounding the module's own arithmetic commits on that output
  anyway (``u·|t/β|/2`` for the dtype's unit roundoff u, the same class of error as every
  other rounding of the module, which the bound does not cover; the default t = 20 in
  float32: jump 2.1e-9 against 6e-7); otherwise refused (e.g. t = 0: a jump of log 2/β).
* Sigmoid ``σ(1 − σ) ≤ ¼``; Hardsigmoid slope ⅙; Hardswish ``(2x + 3)/6 ∈ (−½, 3/2)`` on
  ``(−3, 3)``, 0 and 1 outside: 1.5.
* GELU ``x·Φ(x)``: ``(xΦ)' = Φ + xφ``, ``(xΦ)'' = φ(2 − x²)``, so the max is at x = √2:
  ``Φ(√2) + √2·φ(√2) = 1.12890`` (min −0.1700 at −√2) → 1.13; ``approximate="tanh"``
  peaks at 1.1289 too (both checked numerically in the tests); any other value is refused.
* SiLU ``x·σ(x)``: max slope 1.0998 (at x ≈ 2.3994; min −0.0998) → 1.1.
* Mish ``x·tanh(softplus x)``: max 1.0886 at x ≈ 1.19 (min −0.2196) → 1.09.
* SELU: slope λ for x > 0, ``λα·eˣ < λα`` below: ``λα = 1.0507009873554805 ·
  1.6732632423543772 = 1.75809934…`` → 1.7581.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Activations without arguments, and their factor.
FIXED = {
    "relu": 1.0, "relu6": 1.0, "tanh": 1.0, "softsign": 1.0, "tanhshrink": 1.0, "logsigmoid": 1.0, "abs": 1.0,
    "neg": 1.0, "negative": 1.0, "pos": 1.0, "positive": 1.0, "sigmoid": 0.25, "hardsigmoid": 1.0 / 6.0,
    "silu": 1.1, "mish": 1.09,
    "hardswish": 1.5, "selu": 1.7581,
}
#: Activations with arguments: torch's positional order after the input, with defaults
#: (None: required).
SIGNATURES = {
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "celu": (("alpha", 1.0),),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
    "softshrink": (("lambd", 0.5),),
    "threshold": (("threshold", None), ("value", None)),
    "rrelu": (("lower", 1.0 / 8.0), ("upper", 1.0 / 3.0), ("training", False)),
    "gelu": (("approximate", "none"),),
}
#: Module classes → (name, the attributes that hold the arguments).
MODULES = {
    nn.ReLU: ("relu", ()), nn.ReLU6: ("relu6", ()), nn.Tanh: ("tanh", ()), nn.Softsign: ("softsign", ()),
    nn.Tanhshrink: ("tanhshrink", ()), nn.LogSigmoid: ("logsigmoid", ()), nn.Sigmoid: ("sigmoid", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()), nn.SiLU: ("silu", ()), nn.Mish: ("mish", ()),
    nn.Hardswish: ("hardswish", ()), nn.SELU: ("selu", ()),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)), nn.ELU: ("elu", ("alpha",)), nn.CELU: ("celu", ("alpha",)),
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")), nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.Softshrink: ("softshrink", ("lambd",)), nn.Threshold: ("threshold", ("threshold", "value")),
    nn.RReLU: ("rrelu", ("lower", "upper", "training")), nn.GELU: ("gelu", ("approximate",)),
}


class Refusal(ValueError):
    """The activation, with these arguments, has no global Lipschitz factor."""


def module_params(mod: nn.Module, cls: type):
    """``(name, params)`` of an activation module of class ``cls`` (its own class, or the
    class a ``parametrize`` subclass was generated from)."""
    name, attrs = MODULES[cls]
    return name, {a: getattr(mod, a) for a in attrs}


def call_params(name: str, args: tuple, kwargs: dict):
    """``(name, params)`` of a call ``f(x, *args, **kwargs)``, arguments matched to torch's
    signature; extra or unknown arguments are refused rather than ignored."""
    sig = SIGNATURES.get(name, ())
    kwargs = {k: v for k, v in kwargs.items() if k not in ("inplace", "input")}
    params = {}
    if len(args) > len(sig) + 1:  # + inplace, the last positional of every F.* form
        raise Refusal(f"unexpected arguments {args!r}")
    for i, (key, default) in enumerate(sig):
        if i < len(args):
            params[key] = args[i]
        elif key in kwargs:
            params[key] = kwargs.pop(key)
        elif default is None:
            raise Refusal(f"missing argument {key!r}")
        else:
            params[key] = default
    if len(args) == len(sig) + 1 and not isinstance(args[-1], bool):
        raise Refusal(f"unexpected arguments {args!r}")
    if kwargs:
        raise Refusal(f"unexpected keyword arguments {sorted(kwargs)}")
    return name, params


def _real(params: dict, key: str) -> float:
    v = params[key]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise Refusal(f"{key}={v!r} is not a real number")
    return float(v)


def factor(name: str, params: dict, dtype: torch.dtype = torch.float32) -> float:
    """``sup |σ'|`` of the activation ``name`` with ``params`` (an upper bound), or
    :class:`Refusal` when it is discontinuous or not Lipschitz. ``dtype``: the module's
    working precision (only Softplus's switch uses it, see the module docstring)."""
    if name in FIXED:
        return FIXED[name]
    if name == "leaky_relu":
        return max(1.0, abs(_real(params, "negative_slope")))
    if name == "rrelu":
        if params["training"] is not False:
            raise Refusal("training=True draws a random slope per call")
        return max(1.0, abs((_real(params, "lower") + _real(params, "upper")) / 2.0) * (1.0 + 2.0**-50))
    if name == "elu":
        return max(1.0, abs(_real(params, "alpha")))
    if name == "celu":
        alpha = _real(params, "alpha")
        if not alpha > 0:
            raise Refusal(f"alpha={alpha!r}: alpha must be > 0 (e^(x/alpha) is unbounded for alpha < 0)")
        return 1.0
    if name == "hardtanh":
        lo, hi = _real(params, "min_val"), _real(params, "max_val")
        if lo > hi:
            raise Refusal(f"min_val={lo!r} > max_val={hi!r}")
        return 1.0
    if name == "softshrink":
        if not _real(params, "lambd") >= 0:
            raise Refusal(f"lambd={params['lambd']!r} < 0: the branches overlap and jump")
        return 1.0
    if name == "threshold":
        t, v = _real(params, "threshold"), _real(params, "value")
        if v != t:
            raise Refusal(f"threshold={t!r}, value={v!r}: a jump of {abs(t - v):.3g} at x = {t!r} (continuous "
                          "only when value == threshold)")
        return 1.0
    if name == "softplus":
        beta, t = _real(params, "beta"), _real(params, "threshold")
        if beta == 0 or math.isinf(beta):
            raise Refusal(f"beta={beta!r}")
        if math.isinf(t):
            if t > 0:
                return 1.0  # never switches: the smooth branch everywhere
            raise Refusal("threshold=-inf: the identity everywhere but where beta*x = -inf")
        jump = math.log1p(math.exp(-t)) / abs(beta) if t > -700 else math.inf
        u = torch.finfo(dtype).eps / 2.0
        if not jump <= u * abs(t / beta) / 2.0:
            raise Refusal(f"beta={beta!r}, threshold={t!r}: it switches to the identity at x = threshold/beta "
                          f"with a jump of log(1 + e^-threshold)/|beta| = {jump:.3g}, larger than the rounding of "
                          f"{dtype} there (raise threshold)")
        return 1.0
    if name == "gelu":
        if params["approximate"] not in ("none", "tanh"):
            raise Refusal(f"approximate={params['approximate']!r}")
        return 1.13
    raise Refusal(f"no rule for activation {name!r}")
