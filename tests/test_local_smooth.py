"""The local (CROWN) route's general nonlinear steps: ``unary`` (an elementwise function with
lines from a relaxation) and ``prod`` (McCormick planes for a product of two input-dependent
tensors). Bounds against dense grids and 50-digit evaluation, certificates against PGD, and
the smooth activations of :mod:`gmfast.lipschitz.relax` wired through ``activation()``."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch import nn

from gmfast import Certifier
from gmfast.lipschitz.linearize import _Builder
from gmfast.lipschitz.local import LocalBounds

from test_local_bounds import _attack_check, fitted_head

F64 = torch.float64


def _dn(t):
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def _up(t):
    return torch.nextafter(t, torch.full_like(t, math.inf))


class SquareLines:
    """``z²`` on ``[l, u]``, written here independently of gmfast.lipschitz.relax: the
    tangent at the (rounded) midpoint ``m`` below (``z² ≥ 2m z − m²`` for every real ``z``),
    the line of slope ``l + u`` (rounded) above with the offset ``max(l² − a l, u² − a u)``
    (a convex function minus a line is largest at an end), every offset rounded outward."""

    name = "square"

    def lines(self, l, u):
        m = 0.5 * (l + u)
        al = 2.0 * m  # exact doubling
        bl = -_up(m * m)
        au = l + u

        def g(z):  # an upper bound on z² − au·z
            return _up(_up(z * z) - _dn(au * z))

        return al, bl, au, torch.maximum(g(l), g(u))

    def range(self, l, u):
        lo = torch.where((l <= 0) & (u >= 0), torch.zeros_like(l), _dn(torch.minimum(l * l, u * u)))
        return lo, _up(torch.maximum(l * l, u * u))


def grid2(norm, n=201):
    t = torch.linspace(-1, 1, n, dtype=F64)
    g = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    return g[g.norm(dim=1) <= 1] if norm == 2 else g


def check_against_grid(net, lb, x, lam, norm, eps, mp_net=None, slack=None):
    """The bound is below the minimum over a dense grid of the ball (float64) and, when
    ``mp_net`` is given, below the 50-digit value at the grid's minimiser; returns the gaps."""
    low = lb.lower(lam, lb.prepare(x, eps, norm))
    assert not bool(torch.isnan(low).any())
    g = grid2(norm)
    gaps = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            pts = x[b] + eps * g
            vals = net(pts) @ lam[b].T
            mins, arg = vals.min(0)
            assert bool((low[b] <= mins).all()), (norm, eps, b)
            if mp_net is not None:
                for r in range(lam.shape[1]):
                    exact = mp_net([mpmath.mpf(v) for v in pts[arg[r]].tolist()], lam[b, r].tolist())
                    assert mpmath.mpf(low[b, r].item()) <= exact
            gaps.append(mins - low[b])
    return torch.stack(gaps)


class SquareNet(nn.Module):
    """``c(softsign(a(x)))``; the tests certify it with softsign relaxed as ``z²`` (the engine
    alone, with the relaxation above), so the reference computes ``c(a(x)²)``."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.c = nn.Linear(2, 6), nn.Softsign(), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(self.act(self.a(x)))

    def reference(self, x):
        return self.c(self.a(x) ** 2)


class ProdNet(nn.Module):
    """``c(relu(a(x)) · b(x))``: a product of two input-dependent tensors."""

    def __init__(self, d_in=2, w=6, latent=3):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d_in, w), nn.Linear(d_in, w), nn.Linear(w, latent)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) * self.b(x))


def _mp_affine(lin, v):
    W, b = lin.weight.tolist(), lin.bias.tolist()
    return [sum(mpmath.mpf(W[i][j]) * v[j] for j in range(len(v))) + mpmath.mpf(b[i]) for i in range(len(W))]


def test_unary_step_with_a_known_relaxation(monkeypatch):
    """The unary step (lines, offsets, charges, intervals, refinement of its input) with a
    relaxation written in this file: the bound of ``c(a(x)²)`` is below a dense grid and the
    50-digit value at its minimiser, and close to it on small balls."""
    monkeypatch.setattr(_Builder, "relaxation", lambda self, name, params: SquareLines())
    torch.manual_seed(5)
    net = SquareNet().double().eval()
    lb = LocalBounds(net, (2,))
    assert [lb.ops[n].kind for n in lb.order[1:]] == ["affine", "unary", "affine"]
    mpmath.mp.dps = 50

    def mp_net(v, lam):
        h = [z * z for z in _mp_affine(net.a, v)]
        return sum(mpmath.mpf(l) * o for l, o in zip(lam, _mp_affine(net.c, h)))

    ref = type("Ref", (), {"__call__": lambda self, t: net.reference(t)})()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(4, 2, 3, generator=g, dtype=F64)
    for norm in (2, math.inf):
        for eps in (0.01, 0.2, 0.8):
            gaps = check_against_grid(ref, lb, x, lam, norm, eps, mp_net)
            if eps == 0.01:
                assert float(gaps.max()) < 0.02


def test_product_bound_below_grid_and_mpmath():
    torch.manual_seed(7)
    net = ProdNet().double().eval()
    lb = LocalBounds(net, (2,))
    assert "prod" in [lb.ops[n].kind for n in lb.order[1:]]
    mpmath.mp.dps = 50

    def mp_net(v, lam):
        h = [max(p, 0) * q for p, q in zip(_mp_affine(net.a, v), _mp_affine(net.b, v))]
        return sum(mpmath.mpf(l) * o for l, o in zip(lam, _mp_affine(net.c, h)))

    g = torch.Generator().manual_seed(8)
    x = torch.rand(4, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(4, 2, 3, generator=g, dtype=F64)
    for norm in (2, math.inf):
        for eps in (0.01, 0.2, 0.8):
            gaps = check_against_grid(net, lb, x, lam, norm, eps, mp_net)
            if eps == 0.01:
                assert float(gaps.max()) < 0.02


def test_square_of_one_tensor_is_a_product_with_itself():
    """``h · h`` (the same node twice): both planes' rows accumulate on one node."""
    torch.manual_seed(9)

    class Sq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(2, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = self.a(x)
            return self.c(h * h)

    net = Sq().double().eval()
    lb = LocalBounds(net, (2,))
    x = torch.rand(3, 2, dtype=F64)
    lam = torch.randn(3, 2, 2, dtype=F64)
    for norm in (2, math.inf):
        check_against_grid(net, lb, x, lam, norm, 0.3)


class Tokens(nn.Module):
    """Per-token linear layers on (B, T, d) inputs, reshapes whose batch size is read from
    ``x.shape`` (recorded at trace time), a quotient of input-dependent tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(1, 3), nn.Linear(6, 3)

    def forward(self, x):
        B = x.shape[0]
        h = torch.relu(self.a(x.view(B, 2, 1)))
        q = h / (2.0 + h * h)
        return self.c(q.reshape(B, 6))


def test_token_linear_batch_reshape_and_quotient():
    torch.manual_seed(14)
    net = Tokens().double().eval()
    lb = LocalBounds(net, (2,))
    g = torch.Generator().manual_seed(15)
    x = torch.rand(5, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(5, 2, 3, generator=g, dtype=F64)
    for norm in (2, math.inf):
        for eps in (0.01, 0.3):
            gaps = check_against_grid(net, lb, x, lam, norm, eps)
            if eps == 0.01:
                assert float(gaps.max()) < 0.05


def test_unbounded_intervals_give_minus_infinity_not_nan():
    """Products that overflow float64 (a ball of radius 1e300) leave infinite intervals: the
    bound is −∞ (no certificate), never NaN."""
    torch.manual_seed(13)
    net = ProdNet().double().eval()
    lb = LocalBounds(net, (2,))
    low = lb.lower(torch.ones(2, 1, 3, dtype=F64), lb.prepare(torch.rand(2, 2, dtype=F64), 1e300, 2))
    assert bool((low == -math.inf).all())


@pytest.mark.parametrize("norm", [2, math.inf])
def test_product_route_survives_pgd(norm):
    pairs, flips = 0, 0
    for seed in range(2):
        torch.manual_seed(seed)
        enc = ProdNet(d_in=4, w=12, latent=4).double().eval()
        head, X = fitted_head(enc, (4,), K=3, seed=seed)
        cert, n = _attack_check(enc, head, X[:40], norm, "local", domain=(0.0, 1.0), n_restarts=3)
        pairs += n
        from gmfast.attack import pgd_min_margin

        ok = cert.radius > 0
        m, _ = pgd_min_margin(enc, head, X[:40][ok], cert.prediction[ok], 20 * cert.radius[ok], norm,
                              domain=(0.0, 1.0) if norm == math.inf else None, steps=20, restarts=1)
        flips += int((m < 0).sum())
    assert pairs >= 20
    assert flips > 0


# ------------------------------------------------------------------ the smooth activations


SMOOTH = [nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.SiLU(), nn.Softplus(),
          nn.Softplus(beta=2.0, threshold=5.0), nn.ELU(), nn.SELU(), nn.CELU(0.5), nn.Hardsigmoid(),
          nn.Hardswish(), nn.Hardtanh(), nn.ReLU6()]
#: no proof of their curvature shape yet (gmfast.lipschitz.relax): refused, never relaxed loosely
REFUSED = [nn.GELU(approximate="tanh"), nn.Mish()]


@pytest.mark.parametrize("act", REFUSED, ids=lambda m: repr(m))
def test_activation_without_relaxation_is_refused_by_the_local_route(act):
    from gmfast.lipschitz.errors import UnsupportedOpError

    net = nn.Sequential(nn.Linear(2, 4), act, nn.Linear(4, 3)).double().eval()
    with pytest.raises(UnsupportedOpError, match="relaxation"):
        LocalBounds(net, (2,)).prepare(torch.zeros(1, 2, dtype=torch.float64), 0.1, 2)


@pytest.mark.parametrize("act", SMOOTH, ids=lambda m: repr(m))
def test_smooth_activation_bound_below_dense_grid(act):
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(2, 8), act, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        net[0].weight.mul_(3.0)  # pre-activations over several units: every shape of each function
    lb = LocalBounds(net, (2,))
    assert [lb.ops[n].kind for n in lb.order[1:]].count("unary") == 2
    g = torch.Generator().manual_seed(11)
    x = torch.rand(4, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(4, 2, 3, generator=g, dtype=F64)
    for norm in (2, math.inf):
        for eps in (0.01, 0.3):
            gaps = check_against_grid(net, lb, x, lam, norm, eps)
            if eps == 0.01:
                assert float(gaps.max()) < 0.05, repr(act)


@pytest.mark.parametrize("norm", [2, math.inf])
def test_smooth_route_survives_pgd(norm):
    pairs, flips = 0, 0
    for seed, act in enumerate((nn.GELU(), nn.ELU())):
        torch.manual_seed(seed)
        enc = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
        head, X = fitted_head(enc, (4,), K=3, seed=seed)
        cert, n = _attack_check(enc, head, X[:30], norm, "local", domain=(0.0, 1.0), n_restarts=3)
        pairs += n
        from gmfast.attack import pgd_min_margin

        ok = cert.radius > 0
        m, _ = pgd_min_margin(enc, head, X[:30][ok], cert.prediction[ok], 20 * cert.radius[ok], norm,
                              domain=(0.0, 1.0) if norm == math.inf else None, steps=20, restarts=1)
        flips += int((m < 0).sum())
    assert pairs >= 20
    assert flips > 0


def test_smooth_encoder_local_route_beats_global():
    """On a tanh MLP the local route is above the global one on most inputs, and auto takes it."""
    torch.manual_seed(12)
    enc = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).double().eval()
    head, X = fitted_head(enc, (4,), K=3, seed=12)
    cert = Certifier(enc, head).certify(X[:40])
    r = cert.extra["routes"]
    assert "local" in r, cert.extra["skipped"]
    assert float((r["local"] > r["lipschitz"]).double().mean()) > 0.5
