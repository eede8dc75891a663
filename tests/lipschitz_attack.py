"""Attacks on a claimed Lipschitz bound, independent of gmfast's code paths: observed
difference quotients ‖f(x) − f(y)‖/‖x − y‖ (far, near and straddling pairs), spectral norms
of the dense Jacobian at random points, and a short gradient ascent on the quotient, all in
float64 on the module as the caller will call it (hooks, overrides and all)."""

import copy

import pytest
import torch

from gmfast.lipschitz import UnsupportedOpError, lipschitz_bound

#: Refusals must say what to do.
ADVICE = ("pass lipschitz=<float>", "remove it", "call .eval()", "bound the uncompiled module")


def as_float64(module):
    """A float64 copy of ``module`` (hooks and instance attributes travel with deepcopy)."""
    return copy.deepcopy(module).double()


def observed_ratio(module, input_shape, *, n_pairs=64, n_jac=3, ascent_steps=40, scale=2.0, seed=0):
    """The largest Lipschitz quotient found for ``x ↦ module(x[None])[0]``. ``module`` is
    called on batches of one row, so batch coupling cannot hide a ratio."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(input_shape)

    def f(x):
        out = module(x)
        if isinstance(out, (tuple, list)):
            out = torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1)
        return out.reshape(out.shape[0], -1)

    def one(x):  # evaluate row by row: each output must depend on its own input only
        return torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])])

    x = scale * torch.randn((n_pairs,) + shape, generator=g, dtype=torch.float64)
    far = scale * torch.randn((n_pairs,) + shape, generator=g, dtype=torch.float64)
    near = x + 1e-4 * torch.randn((n_pairs,) + shape, generator=g, dtype=torch.float64)
    tiny = torch.full((n_pairs,) + shape, 1e-3, dtype=torch.float64) * torch.sign(torch.randn(
        (n_pairs,) + shape, generator=g, dtype=torch.float64))  # straddles kinks/jumps at 0
    best, start = 0.0, None
    with torch.no_grad():
        fx = one(x)
        for a, b, fa in ((x, far, fx), (x, near, fx), (tiny, -tiny, None)):
            fa = one(a) if fa is None else fa
            r = (fa - one(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
            r = torch.nan_to_num(r, nan=float("inf"))
            i = int(r.argmax())
            if r[i].item() > best:
                best, start = r[i].item(), (a[i:i + 1].clone(), b[i:i + 1].clone())
    for i in range(min(n_jac, n_pairs)):
        J = torch.autograd.functional.jacobian(lambda t: f(t).reshape(-1), x[i:i + 1]).reshape(-1, x[0].numel())
        best = max(best, torch.linalg.matrix_norm(J, 2).item())
    if start is None or ascent_steps == 0:
        return best
    a, b = (t.requires_grad_(True) for t in start)
    opt = torch.optim.Adam([a, b], lr=1e-2)
    for _ in range(ascent_steps):
        d = (a - b).norm()
        if not d.item() > 0:
            break
        q = (f(a) - f(b)).norm() / d
        if not torch.isfinite(q):
            return float("inf")
        best = max(best, q.item())
        opt.zero_grad()
        (-q).backward()
        opt.step()
    return best


def sound_or_refused(module, input_shape, *, rel=1e-6, **attack):
    """Either ``lipschitz_bound`` refuses ``module`` with a clear error (an
    :class:`UnsupportedOpError`/``ValueError`` that says what to do), or its bound is at least
    every quotient the attack finds. Returns the bound, or None when refused."""
    try:
        bound = lipschitz_bound(module, input_shape, estimate=False, cache=False).bound
    except (UnsupportedOpError, ValueError) as e:
        msg = str(e)
        assert any(a in msg for a in ADVICE), f"refusal without advice: {msg}"
        assert type(e) in (UnsupportedOpError, ValueError), type(e)
        return None
    seen = observed_ratio(as_float64(module), input_shape, **attack)
    if seen > bound * (1 + rel) + 1e-12:
        pytest.fail(f"bound {bound:.6g} < observed ratio {seen:.6g} for {module}")
    return bound
