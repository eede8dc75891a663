"""The local route on another device (e.g. a GPU): :func:`to_device` moves a linearisation.

:class:`gmfast.lipschitz.local.LocalBounds` (and :class:`gmfast.lipschitz.local_cut.CutBounds`)
linearise on the CPU; their ops keep float64 parameters in attributes and in the closures of
their transposes (``T``), forward maps (``fwd``, ``absfwd``) and relaxations. :func:`to_device`
moves every tensor reachable from the ops there (modules holding tensors are copied there: the
encoder itself is not moved), and sets ``lb.device``, where
:meth:`LocalBounds.prepare` puts the inputs; the tensors the passes create follow the default
device, so the passes run inside ``with torch.device(device):`` (:func:`on_device`).

The bounds are the same argument on any device that computes float64 in IEEE arithmetic with
round-to-nearest: the charges bound every sum of products in any order, with or without FMA
(Higham), as on the CPU; the library functions of the relaxations (``exp``, ``expm1``,
``log1p``, ``erfc``, ``sqrt``) are assumed within 256 ulps (:mod:`gmfast.lipschitz.relax`),
and CUDA documents at most 1–5 ulps for its float64 versions (``sqrt`` correctly rounded).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import itertools
import types

import torch
from torch import nn


def _move(obj, device, seen, copy=False):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=copy)
    if isinstance(obj, nn.Module):  # a copy: the caller's encoder stays where it is
        if next(itertools.chain(obj.parameters(), obj.buffers()), None) is None:
            return obj
        return _copy.deepcopy(obj).to(device)
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device,
                                           torch.Size, types.ModuleType, type)):
        return obj
    seen.add(id(obj))
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_move(v, device, seen, copy) for v in obj)
    if isinstance(obj, list):
        obj[:] = [_move(v, device, seen, copy) for v in obj]
        return obj
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _move(obj[k], device, seen, copy)
        return obj
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                cell.cell_contents = _move(cell.cell_contents, device, seen, copy)
            except ValueError:  # an empty cell
                pass
        if obj.__defaults__:
            obj.__defaults__ = tuple(_move(v, device, seen, copy) for v in obj.__defaults__)
        if obj.__kwdefaults__:
            obj.__kwdefaults__ = {k: _move(v, device, seen, copy) for k, v in obj.__kwdefaults__.items()}
        return obj
    if isinstance(obj, types.MethodType):
        _move(obj.__self__, device, seen, copy)
        return obj
    if isinstance(obj, functools.partial):
        return functools.partial(_move(obj.func, device, seen, copy), *(_move(a, device, seen, copy) for a in obj.args),
                                 **{k: _move(v, device, seen, copy) for k, v in obj.keywords.items()})
    if type(obj).__module__.startswith("gmfast.") and hasattr(obj, "__dict__"):  # ops, relaxations
        for k, v in list(vars(obj).items()):
            setattr(obj, k, _move(v, device, seen, copy))
    return obj


def to_device(lb, device, copy: bool = False):
    """Move the linearisation ``lb`` (its ops' tensors, modules and closures, and its caches)
    to ``device`` (``copy``: new storage even on the same device, to check that nothing still
    uses the old); returns ``lb``. Run its passes inside :func:`on_device` (``device``)."""
    device = torch.device(device)
    seen = set()
    for n, op in lb.ops.items():
        if op is not None:
            _move(op, device, seen, copy)
    lb._tcache, lb._support = {}, {}
    lb.device = device
    return lb


def on_device(device):
    """``with on_device(d):`` the tensors the passes create (``torch.eye``, ``zeros``, ...) go
    to ``d``."""
    return torch.device(device) if device is not None else contextlib.nullcontext()
