"""Moving the local route's linearisation to another device (:mod:`gmfast.lipschitz.local_device`).

No second device is needed to check the move: ``to_device(lb, "cpu", copy=True)`` gives every
tensor it reaches new storage, and a torch-function mode then asserts that no op of the
passes touches any tensor that was alive before the move (the old storage kept alive, so no
address is reused): a tensor the move missed (an attribute, a closure, a module) would be
caught there exactly as it would fail on a GPU. The bounds and radii are the same, bit for bit.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import gmfast
from gmfast.lipschitz.local import LocalBounds
from gmfast.lipschitz.local_cut import CutBounds, tied_margin_radius
from gmfast.lipschitz.local_device import on_device, to_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_local_transformer as tlt  # noqa: E402  (the tiny transformer and its cuts)

F64 = torch.float64


class _NoOldStorage(TorchFunctionMode):
    """Records every op that reads a tensor whose storage is in ``ptrs``."""

    def __init__(self, ptrs):
        super().__init__()
        self.ptrs, self.hits = ptrs, set()

    def _check(self, a, func):
        if isinstance(a, torch.Tensor):
            if a.untyped_storage().data_ptr() in self.ptrs:
                self.hits.add(str(func))
        elif isinstance(a, (list, tuple)):
            for b in a:
                self._check(b, func)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._check(list(args) + list(kwargs.values()), func)
        return func(*args, **kwargs)


def _alive_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated module attributes
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() > 0]


def _moved_run(make, x, run, only_new=False):
    """``run(lb)`` on ``make()`` moved with ``copy=True``, asserting no op reads a tensor that
    was alive before the move (``only_new``: only those the linearisation created, e.g. when
    ``run`` also evaluates the encoder and the head, whose own tensors it may read)."""
    before = {t.untyped_storage().data_ptr() for t in _alive_tensors()} if only_new else set()
    lb = make()
    keep = _alive_tensors()  # kept alive: their addresses cannot be reused by new tensors
    ptrs = {t.untyped_storage().data_ptr() for t in keep} - before - {x.untyped_storage().data_ptr()}
    assert ptrs
    to_device(lb, "cpu", copy=True)
    mode = _NoOldStorage(ptrs)
    with on_device("cpu"), mode:
        out = run(lb)
    assert not mode.hits, f"ops still reading tensors from before the move: {sorted(mode.hits)}"
    del keep
    return out


def test_moved_linearisation_uses_no_old_tensor_and_gives_the_same_bounds():
    """LocalBounds and CutBounds (rich cuts, forward chains) on the tiny transformer behind
    :class:`TokenPerturbation` (a constant placement matrix and sequence), ℓ2 and ℓ∞."""
    m = tlt._tiny()
    e = torch.randn(1, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    w = tlt.te.TokenPerturbation(m, e, [1]).double().eval()
    x = torch.cat([w.tokens(e), w.tokens(e) + 0.1])
    makers = (lambda: LocalBounds(w, (1, 4)), lambda: CutBounds(w, (1, 4), tlt._TINY_RICH_CUTS))
    for make, (norm, eps) in zip(makers, ((2, 1e-2), (math.inf, 5e-3))):
        def run(lb, norm=norm, eps=eps):
            return lb.output_box(lb.prepare(x, eps, norm))
        ref = run(make())
        own = [t.untyped_storage().data_ptr() for t in w.parameters()]
        got = _moved_run(make, x, run)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert own == [t.untyped_storage().data_ptr() for t in w.parameters()]  # the encoder itself is not moved


def test_tied_margin_radius_follows_the_device():
    """The radius search on a moved linearisation (inputs, head rows and passes on its
    device) returns the same radii."""
    m, head, X, y = tlt._tiny_problem(3.0)
    x = X[:2]
    pred0, r0 = tied_margin_radius(LocalBounds(m, (3, 4)), m, head, x, 2, steps=1, start=1e-3)
    pred, r = _moved_run(lambda: LocalBounds(m, (3, 4)), x,
                         lambda lb: tied_margin_radius(lb, m, head, x, 2, steps=1, start=1e-3), only_new=True)
    assert torch.equal(pred, pred0) and torch.equal(r, r0) and bool((r0 > 0).any())
    assert isinstance(head, gmfast.GaussianMixtureHead)


def test_prepare_puts_inputs_on_the_linearisation_device():
    lb = LocalBounds(tlt._tiny(), (3, 4))
    assert lb.device == torch.device("cpu")
    ctx = lb.prepare(torch.zeros(1, 3, 4, dtype=torch.float32), 0.1, 2)
    assert ctx["x"].dtype == F64 and ctx["x"].device == lb.device
    assert importlib.util.find_spec("gmfast.lipschitz.local_device") is not None
