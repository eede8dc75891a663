"""The lower estimate of a Lipschitz constant: power iteration on ``JᵀJ`` at a few points
(autograd, float64), the largest ``‖J v‖`` found. Not a certificate; it shows how loose the
sound bound is at most."""

from __future__ import annotations

import math

import torch

from gmfast.lipschitz.graph import dtype_device

def _flat_output(out, n: int) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(n, -1)
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat_output(o, n) for o in out], dim=1)


def _power_iteration(module, points, dtype, n_iter: int, seed: int) -> float:
    """max over points and iterations of ``‖J v‖ / ‖v‖`` with ``v`` from power iteration on
    ``JᵀJ``. The points are evaluated as one batch (samples are independent, so ``J`` is
    block diagonal). ``Jᵀu`` is one reverse pass; ``J v`` is the reverse pass of the linear
    map ``u ↦ Jᵀu`` (forward-mode AD is slower on the CPU for convolutions)."""
    from torch.func import functional_call, vjp

    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v)
             for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    X = points.to(dtype)
    n = X.shape[0]

    def f(x):
        return _flat_output(functional_call(module, state, (x,)), n)

    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(X.shape, generator=g, dtype=torch.float64).to(X)
    view = (n,) + (1,) * (X.dim() - 1)
    best = 0.0
    with torch.enable_grad():
        out, pull = vjp(f, X)
        _, push = vjp(lambda u: pull(u)[0], torch.zeros_like(out))
        for _ in range(n_iter):
            vn = v.reshape(n, -1).norm(dim=1)
            (jv,) = push(v)
            ok = vn > 0
            if bool(ok.any()):
                best = max(best, (jv.reshape(n, -1).norm(dim=1)[ok] / vn[ok]).max().item())
            (w,) = pull(jv)
            wn = w.reshape(n, -1).norm(dim=1)
            if not bool((wn > 0).any()) or not bool(torch.isfinite(wn).all()):
                break
            v = w / torch.where(wn > 0, wn, torch.ones_like(wn)).reshape(view)
    return best


def lower_estimate(module, input_shape, device, n_iter, n_points, seed, points) -> float:
    """The estimate at ``points`` (or ``n_points`` random ones). Any failure (points of the
    wrong shape, a forward that fails on a batch of them) is a ``ValueError`` saying so."""
    if points is None:
        g = torch.Generator().manual_seed(seed)
        points = torch.randn((n_points,) + input_shape, generator=g, dtype=torch.float64)
    points = torch.as_tensor(points).detach()
    if points.numel() == 0 or points.numel() % math.prod(input_shape):
        raise ValueError(f"points must have shape (P, *input_shape) = (P, {', '.join(map(str, input_shape))}); "
                         f"got {tuple(points.shape)}")
    points = points.reshape((-1,) + input_shape).to(device)
    # forward hooks may store derived tensors on the module (hook-based spectral_norm sets
    # .weight): put them back so that the float64 pass leaves no trace
    saved = [(m, k, v) for m in module.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    try:
        try:
            # float64 so that the estimate of a linear map cannot exceed the (exact) bound
            return _power_iteration(module, points, torch.float64, n_iter, seed)
        except RuntimeError:  # a forward that hard-codes float32 tensors: use its own dtype
            return _power_iteration(module, points, dtype_device(module)[0], n_iter, seed)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"the lower estimate failed: {type(module).__name__} fails on a batch of "
                         f"{points.shape[0]} points of shape {input_shape} ({e}); pass estimate=False to skip it"
                         ) from e
    finally:
        for m, k, v in saved:
            object.__setattr__(m, k, v)
