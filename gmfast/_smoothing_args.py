"""Argument checks of :class:`gmfast.smoothing.Smooth` (split from :mod:`gmfast.smoothing`).

Each check names what it expected and what it got: the inputs (:func:`as_input`, and
:class:`one_input` for a batch passed where one input is expected), positive counts
(:func:`positive_int`), the confidence level (:func:`level`) and the estimation schedule of
``certify_adaptive`` (:func:`checkpoints`).
"""

from __future__ import annotations

import operator

import numpy as np
import torch


class one_input:
    """Context for ``certify``/``predict``: ``x`` is sent to the base as a batch of one. A
    multi-dimensional ``x`` the base rejects is most likely a batch passed by mistake; say
    so, and point at the batched method, instead of the base's shape error."""

    def __init__(self, x, method):
        self.x, self.method = x, method

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or self.x.dim() < 2 or not isinstance(exc, (ValueError, RuntimeError)):
            return False
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{self.method} takes one input without a batch dimension (Cohen et al.'s "
            f"{self.method.upper()}); the base rejected x of shape {tuple(self.x.shape)} as a single input "
            f"({type(exc).__name__}: {first}). For a batch (B, *input_shape) call "
            f"{self.method}_batch(X, ...)"
        ) from exc


def as_input(x, name, batched=False):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor; got dtype {x.dtype} (cast with .float())"
        )
    if batched and x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (B, *input_shape); got a scalar")
    return x


def positive_int(value, name):
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def level(alpha):
    alpha = float(alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha!r}")
    return alpha


def checkpoints(schedule, n_max, first=100, growth=4):
    """Cumulative estimation checkpoints; default ``first·growth^j`` capped at ``n_max``."""
    if schedule is None:
        out = []
        n = first
        while n < n_max:
            out.append(n)
            n *= growth
        return out + [n_max]
    out = [positive_int(s, "schedule entries") for s in schedule]
    if not out or any(b <= a for a, b in zip(out, out[1:])) or out[-1] != n_max:
        raise ValueError(
            f"schedule must be strictly increasing and end at n_max={n_max}; got {list(schedule)}"
        )
    return out
