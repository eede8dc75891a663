"""The local (CROWN) route on 1-Lipschitz networks: MaxMin (as ``b + relu(a − b)``,
``a − relu(a − b)``) and the AOL layers (a constant effective weight under ``F.linear`` /
``F.conv2d``): bounds against dense grids and 50-digit arithmetic, certificates against PGD,
and the route against the global one on a trained network."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch import nn

from gmfast import Certifier
from gmfast.attack import pgd_min_margin
from gmfast.lipschitz import UnsupportedOpError
from gmfast.lipschitz.local import LocalBounds
from gmfast.train.layers import AOLConv2d, AOLLinear, GroupSort, MaxMin, build_encoder, conv_architecture, \
    mlp_architecture

from test_local_bounds import _attack_check, fitted_head

F64 = torch.float64


def tiny_lipnet(seed: int, d_in: int = 2, latent: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(AOLLinear(d_in, 8), MaxMin(), AOLLinear(8, 8), MaxMin(), AOLLinear(8, latent))
    with torch.no_grad():  # off the orthogonal initialisation: MaxMin pairs of every kind
        for m in net:
            if isinstance(m, AOLLinear):
                m.weight.add_(0.5 * torch.randn_like(m.weight))
                m.bias.uniform_(-0.3, 0.3)
    return net.double().eval()


def lipconv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_encoder(conv_architecture(1, 8, [4], 4, 16))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (AOLLinear, AOLConv2d)):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.uniform_(-0.2, 0.2)
    return net.double().eval()


def maxmin_reference(t: torch.Tensor) -> torch.Tensor:
    """MaxMin of adjacent pairs of dim 1, by comparisons (independent of the sort)."""
    a, b = t[:, 0::2], t[:, 1::2]
    return torch.stack([torch.maximum(a, b), torch.minimum(a, b)], 2).reshape(t.shape)


def test_maxmin_steps_compute_maxmin():
    """The linearised steps (swap, diff, relu, spread, sum), run forward, are MaxMin (up to
    the rounding of ``b + (a − b)``: the identity is exact in real arithmetic)."""
    net = nn.Sequential(MaxMin()).double().eval()
    lb = LocalBounds(net, (6, 3))
    x = torch.randn(5, 6, 3, dtype=F64)
    vals = {lb.order[0]: x}
    for n in lb.order[1:]:
        op = lb.ops[n]
        if op.kind == "affine":
            vals[n] = op.fwd(vals[op.src]) + (0 if op.bias is None else op.bias)
        elif op.kind == "act":
            vals[n] = vals[op.src].clamp_min(0)
        else:
            vals[n] = vals[op.a] + op.alpha * vals[op.b]
    ref = maxmin_reference(x)
    assert torch.equal(net(x), ref)
    assert float((vals[lb.out_node] - ref).abs().max()) <= 4 * 2.0**-53 * float(x.abs().max())


@pytest.mark.parametrize("norm", [2, math.inf])
def test_lipnet_bound_below_dense_grid_minimum(norm):
    """2-D inputs: the minimum of random linear functions of the output over a dense grid of
    the ball (an upper bound on the true minimum) is never below the bound, which is close to
    it on small balls."""
    net = tiny_lipnet(1)
    lb = LocalBounds(net, (2,))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(6, 3, 3, generator=g, dtype=F64)
    t = torch.linspace(-1, 1, 201, dtype=F64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    if norm == 2:
        grid = grid[grid.norm(dim=1) <= 1]
    for eps in (0.02, 0.3, 1.0):
        low = lb.lower(lam, lb.prepare(x, eps, norm))
        with torch.no_grad():
            for b in range(6):
                vals = net(x[b] + eps * grid) @ lam[b].T
                assert bool((low[b] <= vals.min(0).values).all()), (norm, eps, b)
                if eps == 0.02:
                    assert float((vals.min(0).values - low[b]).max()) < 0.2


def test_stable_maxmin_bound_matches_mpmath():
    """On a ball where every MaxMin pair keeps its order (checked in exact arithmetic) the
    network is affine there and the relaxation exact: the bound is below the 50-digit minimum
    and within 1e-12 of it (the rounding allowance)."""
    torch.manual_seed(3)
    net = nn.Sequential(AOLLinear(5, 6), MaxMin(), AOLLinear(6, 3)).double().eval()
    lb = LocalBounds(net, (5,))
    mpmath.mp.dps = 50
    mp = mpmath.mpf
    W1 = [[mp(v) for v in row] for row in net[0].effective_weight().tolist()]
    b1 = [mp(v) for v in net[0].bias.tolist()]
    W2 = [[mp(v) for v in row] for row in net[2].effective_weight().tolist()]
    b2 = [mp(v) for v in net[2].bias.tolist()]
    x = torch.randn(4, 5, dtype=F64)
    lam = torch.randn(4, 2, 3, dtype=F64)
    eps = 1e-3
    for norm in (2, math.inf):
        low = lb.lower(lam, lb.prepare(x, eps, norm))
        for b in range(4):
            xs = [mp(v) for v in x[b].tolist()]
            z = [sum(W1[i][j] * xs[j] for j in range(5)) + b1[i] for i in range(6)]
            perm = []
            for p in range(3):
                dvec = [W1[2 * p][j] - W1[2 * p + 1][j] for j in range(5)]
                dual = mpmath.sqrt(sum(v * v for v in dvec)) if norm == 2 else sum(abs(v) for v in dvec)
                gap = z[2 * p] - z[2 * p + 1]
                assert abs(gap) > eps * dual  # the pair keeps its order on the whole ball
                perm += [2 * p, 2 * p + 1] if gap > 0 else [2 * p + 1, 2 * p]
            for r in range(2):
                la = [mp(v) for v in lam[b, r].tolist()]
                v2 = [sum(la[i] * W2[i][k] for i in range(3)) for k in range(6)]  # on MaxMin's output
                v1 = [mp(0)] * 6  # on z: output k is z[perm[k]]
                for k in range(6):
                    v1[perm[k]] += v2[k]
                gvec = [sum(v1[i] * W1[i][j] for i in range(6)) for j in range(5)]
                const = sum(v1[i] * b1[i] for i in range(6)) + sum(la[i] * b2[i] for i in range(3))
                center = sum(gvec[j] * xs[j] for j in range(5)) + const
                dual = mpmath.sqrt(sum(v * v for v in gvec)) if norm == 2 else sum(abs(v) for v in gvec)
                exact = center - mp(eps) * dual
                got = mp(low[b, r].item())
                assert got <= exact, (norm, b, r)
                assert exact - got < 1e-12 * (1 + abs(exact))


def test_aol_conv_is_linearised_with_its_effective_weight():
    """No MaxMin: the AOL convolution + linear net is affine, so the bound over a tiny ball is
    the exact minimum up to rounding; here checked against the float64 forward at the
    minimiser of the linear bound's own direction (the ball's boundary point)."""
    torch.manual_seed(4)
    net = nn.Sequential(AOLConv2d(2, 3, 3), nn.Flatten(), AOLLinear(3 * 5 * 5, 4)).double().eval()
    lb = LocalBounds(net, (2, 5, 5))
    x = torch.rand(3, 2, 5, 5, dtype=F64)
    lam = torch.randn(3, 2, 4, dtype=F64)
    xg = x.clone().requires_grad_(True)
    out = (net(xg).unsqueeze(1) * lam).sum(-1)  # (3, 2)
    for r in range(2):
        (g,) = torch.autograd.grad(out[:, r].sum(), xg, retain_graph=True)
        gf = g.reshape(3, -1)
        for norm, eps in ((2, 0.1), (math.inf, 0.01)):
            low = lb.lower(lam, lb.prepare(x, eps, norm))[:, r]
            step = gf / gf.norm(dim=1, keepdim=True) * eps if norm == 2 else gf.sign() * eps
            with torch.no_grad():
                worst = (net(x - step.reshape(x.shape)) * lam[:, r]).sum(-1)
            assert bool((low <= worst).all())
            assert float((worst - low).max()) < 1e-10


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("norm", [2, math.inf])
def test_lipnet_local_route_survives_pgd(arch, norm):
    pairs, flips = 0, 0
    for seed in range(2):
        if arch == "mlp":
            enc, shape = build_encoder(mlp_architecture(64, [32, 32], 8)).double().eval(), (1, 8, 8)
        else:
            enc, shape = lipconv(seed), (1, 8, 8)
        head, X = fitted_head(enc, shape, K=3, seed=seed)
        cert, n = _attack_check(enc, head, X[:24], norm, "local", domain=(0.0, 1.0), n_restarts=3)
        pairs += n
        ok = cert.radius > 0
        m, _ = pgd_min_margin(enc, head, X[:24][ok], cert.prediction[ok], 20 * cert.radius[ok], norm,
                              domain=(0.0, 1.0) if norm == math.inf else None, steps=20, restarts=1)
        flips += int((m < 0).sum())
    assert pairs >= 16
    assert flips > 0  # the attack is strong enough to matter


def test_groupsort_beyond_pairs_refused_with_a_clear_error():
    enc = nn.Sequential(nn.Linear(2, 6), GroupSort(3), nn.Linear(6, 3)).double().eval()
    with pytest.raises(UnsupportedOpError, match=r"GroupSort\(3\).*only MaxMin"):
        LocalBounds(enc, (2,))

    class Odd(MaxMin):
        def forward(self, x):
            return x

    enc = nn.Sequential(nn.Linear(2, 6), Odd(), nn.Linear(6, 3)).double().eval()
    with pytest.raises(UnsupportedOpError, match="overrides"):
        LocalBounds(enc, (2,))


@pytest.mark.slow
def test_trained_lipnet_local_against_global_and_pgd():
    """The trained recipe encoder (AOL + MaxMin, digits, a few epochs): the local route is
    sound under PGD, above the global route on most inputs in ℓ∞ (where the global route pays
    √n), within 10% of it at the median in ℓ2 (a 1-Lipschitz net's global bound is nearly
    tight; CROWN's MaxMin relaxation loses a little), and auto is never below global."""
    import importlib

    from gmfast.train.data import load_split

    R = importlib.import_module("gmfast.train.recipe")
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = load_split("digits")
    r = R.recipe("digits", architecture=mlp_architecture(64, [64], 16), latent=16, epochs=4)
    enc, _, _ = R.train(r, Xtr, ytr, progress=False)
    head = R.fit_tied_head(enc, Xtr, ytr, r.shrinkage)
    X = Xte[:60]
    # the certified function: the float32 effective weights the forward computes (what the
    # trace records), in exact arithmetic; enc.double() would recompute them in float64, a
    # function ~1e-7 away (PGD then "flips" at 1 - 4e-7 of a radius)
    frozen = nn.Sequential(*[nn.Linear(m.in_features, m.out_features).double() if isinstance(m, AOLLinear)
                             else m for m in enc]).double()
    with torch.no_grad():
        for f, m in zip(frozen, enc):
            if isinstance(m, AOLLinear):
                f.weight.copy_(m.effective_weight().double())
                f.bias.copy_(m.bias.double())
    for norm in (2, math.inf):
        auto = Certifier(enc, head).certify(X, norm=norm)
        loc, glob = auto.extra["routes"]["local"], auto.extra["routes"]["lipschitz"]
        assert bool((auto.radius >= glob).all())
        if norm == math.inf:
            assert float((loc > glob).double().mean()) > 0.5
        else:
            assert float((loc / glob.clamp_min(1e-300))[glob > 0].median()) > 0.9
        ok = loc > 0
        m, _ = pgd_min_margin(frozen, head, X[ok].double(), auto.prediction[ok], loc[ok] * (1 - 1e-9), norm,
                              steps=30, restarts=3)
        assert bool((m > -1e-9).all())
