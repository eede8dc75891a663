"""PGD in ℓ2 input space against ``head(encoder(x))``: the check that certificates hold.

Every certified input is attacked inside its certified ball (radius ``shrink · R``, the
ball being open); a *flip* is a point found there that the classifier (the head's own
``predict`` on the encoder's latents) labels differently from the certified prediction. A
sound certificate admits none.
"""

from __future__ import annotations

import torch


def pgd_flips(encoder, head, X, prediction, radius, *, steps: int = 40, restarts: int = 3, shrink: float = 0.999,
              batch_size: int = 500, seed: int = 0) -> torch.Tensor:
    """Bool (N,): whether PGD found a point within ``shrink · radius`` of ``X[i]`` that is
    classified differently from ``prediction[i]`` (rows with radius 0 or abstentions are
    skipped and report False).

    Ascent on ``max_{j≠c} s_j − s_c`` (the head's log-joint scores), normalised-gradient steps
    of ``2.5 R / steps``, projection on the ball, ``restarts`` uniform random starts in the
    ball; the classifier is evaluated at every iterate.

    The attack runs where ``encoder``'s parameters are (inputs moved there batch by batch);
    the random starts are drawn on the CPU from ``seed``, so they do not depend on the device.
    Returns a CPU tensor.
    """
    from gmfast.fit import device_of

    dev = device_of(encoder)
    g = torch.Generator().manual_seed(seed)
    flips = torch.zeros(X.shape[0], dtype=torch.bool)
    prediction, radius = prediction.cpu(), radius.cpu()
    todo = torch.nonzero((radius > 0) & (prediction >= 0)).flatten()
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        flips[idx] = _attack(encoder, head, X[idx].to(dev), prediction[idx], shrink * radius[idx].double(), steps,
                             restarts, g)
    return flips


def _predict(encoder, head, x):
    with torch.no_grad():
        return head.predict(encoder(x).reshape(x.shape[0], -1))


def _attack(encoder, head, x0, pred, R, steps, restarts, g):
    """Flips (CPU bool) for one batch ``x0`` (on the attack's device); ``pred``, ``R`` on the CPU."""
    dev = x0.device
    view = (-1,) + (1,) * (x0.dim() - 1)
    R = R.to(x0.dtype).reshape(view).to(dev)
    onehot = torch.nn.functional.one_hot(pred, head.n_classes_).bool().to(dev)
    flipped = torch.zeros(x0.shape[0], dtype=torch.bool)
    for _ in range(restarts):
        d = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(dev)
        u = torch.rand(x0.shape[0], generator=g, dtype=x0.dtype).reshape(view).to(dev)
        delta = d / d.flatten(1).norm(dim=1).reshape(view) * R * u
        for _ in range(steps):
            delta.requires_grad_(True)
            s = head(encoder(x0 + delta).reshape(x0.shape[0], -1))
            gap = s.masked_fill(onehot, float("-inf")).amax(1) - s[onehot]
            (grad,) = torch.autograd.grad(gap.sum(), delta)
            with torch.no_grad():
                gn = grad.flatten(1).norm(dim=1).reshape(view).clamp_min(1e-30)
                delta = delta + (2.5 / steps) * R * grad / gn
                n = delta.flatten(1).norm(dim=1).reshape(view).clamp_min(1e-30)
                delta = delta * torch.clamp(R / n, max=1.0)
                flipped |= _predict(encoder, head, x0 + delta).cpu() != pred
    return flipped
