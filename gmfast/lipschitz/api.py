"""The public entry: :func:`lipschitz_bound`, its result :class:`LipschitzBound`, and the
cache of results per module object."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from gmfast.lipschitz.errors import UnsupportedOpError
from gmfast.lipschitz.estimate import lower_estimate
from gmfast.lipschitz.global_bound import GlobalBound
from gmfast.lipschitz.graph import check_same_function, check_trust, dtype_device, trace

__all__ = ["LipschitzBound", "UnsupportedOpError", "clear_cache", "lipschitz_bound"]

_CONV_METHODS = ("fft", "gram", "dense")

@dataclass(frozen=True)
class LipschitzBound:
    """Result of :func:`lipschitz_bound`.

    Attributes
    ----------
    bound : float
        Sound upper bound on ``sup ‖f(x) − f(y)‖₂ / ‖x − y‖₂``.
    estimate : float or None
        Lower bound: the largest ``‖J(x) v‖₂`` (``‖v‖₂ = 1``) found by power iteration on
        ``JᵀJ`` at a few points, evaluated in float64. The true constant lies in
        ``[estimate, bound]`` (up to rounding where forward derives weights in the module's
        own precision, e.g. ``spectral_norm``: ~1e-7 relative for float32).
    layers : list of (str, str, float)
        ``(node name, op description, factor)`` for every node that is not a pure reshape.
        For an op of one input the factor multiplies ``L``; for ``add``/``cat`` it is
        ``L(node) / max L(inputs)``.
    """

    bound: float
    estimate: float | None = None
    layers: list = field(default_factory=list, compare=False)

    @property
    def gap(self) -> float | None:
        """``bound / estimate`` (≥ 1 up to that rounding): how loose the bound can at most be;
        None without an estimate or when the estimate is 0."""
        if not self.estimate:
            return None
        return self.bound / self.estimate

    def __float__(self) -> float:
        return float(self.bound)

    def report(self) -> str:
        """The per-node factors as a table, then the bound, the estimate and the gap."""
        width = max([len(n) for n, _, _ in self.layers] + [4])
        lines = [f"{n:<{width}}  {f:>12.6g}  {d}" for n, d, f in self.layers]
        est = "n/a" if self.estimate is None else f"{self.estimate:.6g}"
        gap = "n/a" if self.gap is None else f"{self.gap:.4g}"
        lines.append(f"bound {self.bound:.6g}, estimate {est}, gap {gap}")
        return "\n".join(lines)

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every cached :func:`lipschitz_bound` result."""
    _CACHE.clear()


def _state(module: nn.Module):
    """What the cache compares: every parameter and buffer (weak reference, version counter,
    storage pointer: replacement, in-place change or ``.data =`` all show) and the public
    scalar attributes of every submodule (stride, eps, slopes, training flags)."""
    tensors = list(module.parameters()) + list(module.buffers())
    refs = [weakref.ref(t) for t in tensors]
    versions = tuple((t._version, t.data_ptr()) for t in tensors)
    config = tuple((name, type(m), tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_")
                                                and isinstance(v, (bool, int, float, str, tuple, type(None))))))
                   for name, m in module.named_modules())
    return refs, versions, config


def _same_state(a, b) -> bool:
    return (len(a[0]) == len(b[0]) and all(r1() is not None and r1() is r2() for r1, r2 in zip(a[0], b[0]))
            and a[1] == b[1] and a[2] == b[2])



def lipschitz_bound(module: nn.Module, input_shape, *, estimate: bool = True, n_iter: int = 50, seed: int = 0,
                    cache: bool = True, conv_method: str = "fft", n_points: int = 4, points=None) -> LipschitzBound:
    """Sound upper bound on the ℓ2→ℓ2 Lipschitz constant of ``module`` on inputs of one shape.

    The bound holds for ``f(x) = module(x[None])[0]``, ``x`` of shape ``input_shape``:
    ``‖f(x) − f(y)‖₂ ≤ bound·‖x − y‖₂`` for all ``x, y``. It comes from a dynamic program over
    the ``torch.fx`` graph: composition multiplies factors (submultiplicativity), residual
    ``add`` sums them (triangle inequality), ``cat`` combines them in quadrature, and every
    per-op factor is an upper bound including its float64 rounding (rules and proofs in the
    module docstring). An op without a rule raises :class:`UnsupportedOpError`; nothing is
    guessed. Radii derived from the bound are in the scale of the encoder's **own input**:
    a normalisation ``(x − mean)/std`` inside the module is part of the bound.

    Not covered: the module's own floating-point error (the bound is for exact arithmetic
    with the stored parameters); modules that mix samples across the batch; ops without a
    rule (softmax, layer norm, attention, products of input-dependent tensors).

    Parameters
    ----------
    module : nn.Module
        Maps a batch (N, *input_shape) to (N, ...) (or a tuple of such, bounded as their
        concatenation), processing samples independently. Submodules whose forward reads
        the training flag (batch norm, dropout, RReLU, spectral norm) must be in eval mode.
    input_shape : tuple of int
        One input's shape without the batch dimension, e.g. ``(3, 32, 32)`` or ``(d,)``;
        convolution bounds depend on the spatial size.
    estimate : bool
        Also compute a lower bound: power iteration on ``JᵀJ`` (autograd, float64) at a few
        points, the largest ``‖J v‖`` found. For a piecewise-linear or smooth network this is
        at most the true constant, so the truth lies in ``[estimate, bound]``.
    n_iter : int
        Power iterations per point.
    seed : int
        Seed of the random points and start vectors.
    cache : bool
        Reuse the result of an identical earlier call on the same module object, keyed by
        (input_shape, conv_method, estimate, n_iter, n_points, seed), as long as no parameter
        or buffer was replaced or changed (weak reference, version counter and storage
        pointer of each are compared) and no public scalar attribute of a submodule
        changed. Changes that bypass version counters (writes through ``.data``) or to the
        forward code are not seen: pass ``cache=False`` or call :func:`clear_cache`.
    conv_method : {"fft", "gram", "dense"}
        Convolution bound: per-frequency SVDs on the periodic grid (default), Gram
        iteration on the same matrices, or the exact norm of the dense operator when it has
        at most 2**23 entries (the "fft" bound beyond).
    n_points : int
        Random standard-normal points for the estimate.
    points : tensor (P, *input_shape), optional
        Points for the estimate instead of random ones (real inputs give a more telling
        estimate). Results with ``points`` are not cached.

    Returns
    -------
    LipschitzBound
        ``bound``, ``estimate``, ``gap = bound/estimate`` and the per-node ``layers``.

    Raises
    ------
    ValueError
        A submodule whose forward depends on the training flag (batch norm, dropout, RReLU,
        spectral norm's power iteration) is in train mode, or the module fails on an input
        of this shape.
    UnsupportedOpError
        An op has no rule, the module cannot be traced by ``torch.fx``, or its calls do
        something the trace does not show (hooks, overridden ``forward``/``__call__``,
        unknown parametrizations), or outputs depend on other rows of the batch.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints; got {input_shape!r}")
    if conv_method not in _CONV_METHODS:
        raise ValueError(f"conv_method must be one of {_CONV_METHODS}; got {conv_method!r}")
    for name, v in (("n_iter", n_iter), ("n_points", n_points)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    check_trust(module)  # before the cache: hooks and overrides are not part of its key
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None:
            shown = name or f"{type(m).__name__} (the root)"
            raise UnsupportedOpError(f"module {shown!r} ({type(m).__name__} with track_running_stats=False): no "
                                     "Lipschitz rule (in eval it normalises with batch statistics); pass "
                                     "lipschitz=<float> explicitly or wrap it")
    key = (input_shape, conv_method, bool(estimate), n_iter, n_points, seed)
    use_cache = cache and points is None
    state = _state(module) if use_cache else None
    if use_cache:
        hit = _CACHE.get(module, {}).get(key)
        if hit is not None and _same_state(hit[0], state):
            return hit[1]

    bound, layers = _graph_bound(module, input_shape, conv_method)
    device = dtype_device(module)[1]
    est = lower_estimate(module, input_shape, device, n_iter, n_points, seed, points) if estimate else None
    result = LipschitzBound(bound=bound, estimate=est, layers=layers)
    if use_cache:
        _CACHE.setdefault(module, {})[key] = (state, result)
    return result




def _graph_bound(module: nn.Module, input_shape: tuple, conv_method: str):
    """Trace and check the module, run the global analysis over its graph."""
    tg = trace(module, input_shape)
    dp = GlobalBound(tg, conv_method)
    bound = dp.run()
    check_same_function(tg, module, input_shape)
    return bound, dp.layers
