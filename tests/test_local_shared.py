"""The shared-rows refinement of the local route (``LocalBounds._refine_shared``): a second
layer's CROWN rows ``±e_i``, shared by the batch down to the first layer's activation, taken
for all inputs at once in their support (a convolution's receptive field) instead of per
input. Checked against the dense per-input pass (the reference path: the same bounds up to
the order of the sums), an independent float64 CROWN written here from the layers' matrices,
points of the ball, and PGD on the certificates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmfast.lipschitz.local import LocalBounds

from test_local_bounds import _attack_check, fitted_head

F64 = torch.float64
SHAPE = (1, 8, 8)


def conv_encoder(seed: int, c1: int = 8, c2: int = 8, latent: int = 6) -> nn.Module:
    """The demo CNN's shape (conv + BN + ReLU twice, the second with stride 2, then linear),
    smaller: the second conv's rows meet 72 of the 512 first-layer activations."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
                        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(c2 * 16, latent))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.double().eval()


def pair(net):
    """The route with the shared-rows step, and one that never takes it (the reference)."""
    fast, dense = LocalBounds(net, SHAPE), LocalBounds(net, SHAPE)
    dense.sparse_ratio = 0
    return fast, dense


def second_pre(lb):
    return lb.pre[-1]  # the second BatchNorm's output (the input of the second ReLU)


def rel_diff(a, b, where):
    """Largest ``|a − b| / (1 + |b|)`` over the entries ``where`` (0 when none)."""
    d = ((a - b).abs() / (1 + b.abs()))[where]
    return float(d.max()) if d.numel() else 0.0


def inputs(n, seed):
    return torch.rand((n,) + SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("norm", [2, math.inf])
def test_shared_rows_match_the_dense_pass(norm):
    """Same intervals and final bounds as the per-input pass, to 1e-12 relative, on balls
    that leave few, many and most second-layer neurons unstable; the step did run."""
    net = conv_encoder(0)
    fast, dense = pair(net)
    x = inputs(6, 1)
    lam = torch.randn(6, 4, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    domain = (0.0, 1.0) if norm == math.inf else None
    for eps in (0.01, 0.1, 0.5):
        if norm == math.inf:
            eps = eps / 8
        cf, cd = fast.prepare(x, eps, norm, domain), dense.prepare(x, eps, norm, domain)
        assert fast._support[second_pre(fast)] is not None
        assert dense._support.get(second_pre(dense)) is None
        for nf, nd in zip(fast.order, dense.order):
            for a, b in zip(cf["I"][nf], cd["I"][nd]):
                assert torch.equal(torch.isfinite(a), torch.isfinite(b))
                assert rel_diff(a, b, torch.isfinite(b)) < 1e-12, (eps, nf)
        lf, ld = fast.lower(lam, cf), dense.lower(lam, cd)
        assert rel_diff(lf, ld, torch.ones_like(ld, dtype=torch.bool)) < 1e-12
        # an input alone (a batch of one) gets its bounds in the batch
        alone = fast.lower(lam[3:4], fast.prepare(x[3:4], eps, norm, domain))
        assert rel_diff(alone[0], lf[3], torch.ones_like(lf[3], dtype=torch.bool)) < 1e-12


def test_shared_rows_in_small_chunks_without_the_kept_jacobian_rows():
    """Bounded memory: neurons in chunks of a few, the Jacobian rows gathered per chunk
    instead of kept (as for large inputs) give the same bounds as the defaults, across
    passes whose Jacobian rows are reused."""
    net = conv_encoder(2)
    small, default = LocalBounds(net, SHAPE), LocalBounds(net, SHAPE)
    small.sparse_chunk, small.sparse_keep = 40_000, 0  # 8 neurons per chunk
    x = inputs(5, 3)
    for eps in (0.3, 0.1):
        cs, cd = small.prepare(x, eps, 2), default.prepare(x, eps, 2)
        assert small._support[second_pre(small)][1]._jac is None
        assert default._support[second_pre(default)][1]._jac is not None
        for ns, nd in zip(small.order, default.order):
            for a, b in zip(cs["I"][ns], cd["I"][nd]):
                assert rel_diff(a, b, torch.isfinite(b)) < 1e-12


@pytest.mark.parametrize("norm", [2, math.inf])
def test_shared_rows_bounds_hold_on_points_of_the_ball(norm):
    """The refined second-layer bounds contain the pre-activations at random points of the
    ball and at its extreme points in random directions (ℓ2 sphere, ℓ∞ box corners clipped
    to the domain), and are tighter than interval arithmetic on some neurons."""
    net = conv_encoder(3)
    fast, _ = pair(net)
    x = inputs(6, 4)
    eps = 0.3 if norm == 2 else 0.04
    domain = (0.0, 1.0) if norm == math.inf else None
    ctx = fast.prepare(x, eps, norm, domain)
    lo, hi = ctx["I"][second_pre(fast)]
    g = torch.Generator().manual_seed(5)
    d = torch.randn((400,) + SHAPE, generator=g, dtype=F64)
    if norm == 2:
        d = d / d.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        d = torch.cat([d, d * torch.rand(400, 1, 1, 1, generator=g, dtype=F64)])
    else:
        d = torch.cat([d.sign(), torch.rand((400,) + SHAPE, generator=g, dtype=F64) * 2 - 1])
    with torch.no_grad():
        for b in range(x.shape[0]):
            pts = x[b] + eps * d
            if domain is not None:
                pts = pts.clamp(*domain)
            z = net[:5](pts)
            assert bool((z >= lo[b]).all()) and bool((z <= hi[b]).all()), b
    # not vacuous: CROWN beat the interval bounds somewhere
    box = LocalBounds(net, SHAPE)
    second = second_pre(box)
    box.pre = box.pre[:1]  # intervals only on the second layer
    blo, _ = box.prepare(x, eps, norm, domain)["I"][second]
    assert bool((lo > blo + 1e-6).any())


def test_shared_rows_against_an_independent_crown():
    """An ℓ2 CROWN written here from the explicit matrices of the two affine layers (float64,
    no rounding charges): the engine's refined bounds are at least as tight as it up to the
    charges (1e-9 relative) on the neurons it refines (unstable by interval arithmetic), and
    equal to it where CROWN beats the intervals."""
    net = conv_encoder(6)
    fast, _ = pair(net)
    x = inputs(4, 7)
    eps = 0.2
    ctx = fast.prepare(x, eps, 2)
    lo, hi = (t.flatten(1) for t in ctx["I"][second_pre(fast)])
    box = LocalBounds(net, SHAPE)
    second = second_pre(box)
    box.pre = box.pre[:1]
    blo, bhi = (t.flatten(1) for t in box.prepare(x, eps, 2)["I"][second])
    refined = (blo < 0) & (bhi > 0)  # the neurons the engine bounds by CROWN
    eye_in = torch.eye(64, dtype=F64).reshape(64, *SHAPE)
    with torch.no_grad():
        first, second = net[:2], net[3:5]
        b1 = first(torch.zeros((1,) + SHAPE, dtype=F64)).flatten()
        A1 = (first(eye_in).flatten(1) - b1).T  # (512, 64)
        b2 = second(torch.zeros((1, 8, 8, 8), dtype=F64)).flatten()
        A2 = (second(torch.eye(512, dtype=F64).reshape(512, 8, 8, 8)).flatten(1) - b2).T  # (128, 512)
    for b in range(x.shape[0]):
        xf = x[b].flatten()
        c1 = A1 @ xf + b1
        r1 = eps * A1.norm(dim=1)
        l1, u1 = c1 - r1, c1 + r1
        unst = (l1 < 0) & (u1 > 0)
        s = torch.where(unst, u1 / (u1 - l1).clamp_min(1e-300), (l1 >= 0).to(F64))
        t = torch.where(unst, -s * l1, torch.zeros_like(s))
        a = torch.where(unst, (u1 >= -l1).to(F64), (l1 >= 0).to(F64))
        for sign, eng in ((1.0, lo[b]), (-1.0, -hi[b])):
            lam = sign * A2
            coef = torch.where(lam >= 0, lam * a, lam * s)
            const = (lam.clamp(max=0) * t).sum(1) + coef @ b1 + sign * b2
            g = coef @ A1
            ref = g @ xf + const - eps * g.norm(dim=1)
            tol = 1e-9 * (1 + ref.abs())
            assert bool((eng >= ref - tol)[refined[b]].all())
            assert int(((eng - ref).abs() < tol)[refined[b]].sum()) >= 10  # CROWN won there: the same bound


@pytest.mark.parametrize("norm", [2, math.inf])
def test_shared_rows_certificates_survive_pgd(norm):
    """PGD (restarts) never flips a prediction inside a local radius computed with the step."""
    pairs = 0
    for seed in range(2):
        enc = conv_encoder(10 + seed)
        head, X = fitted_head(enc, SHAPE, K=3, seed=seed)
        _, n = _attack_check(enc, head, X[:16], norm, "local", domain=(0.0, 1.0), n_restarts=3)
        pairs += n
    assert pairs >= 16  # the certificates are not vacuous


def test_shared_rows_extreme_balls_agree_and_stay_finite_or_trivial():
    """Balls so large that intervals overflow: the step gives the dense pass's bounds (equal
    where infinite), and no NaN."""
    net = conv_encoder(8)
    fast, dense = pair(net)
    x = inputs(3, 9)
    for eps in (1e150, 1e300):
        cf, cd = fast.prepare(x, eps, 2), dense.prepare(x, eps, 2)
        for nf, nd in zip(fast.order, dense.order):
            for a, b in zip(cf["I"][nf], cd["I"][nd]):
                assert not bool(torch.isnan(a).any())
                inf = ~torch.isfinite(b)
                assert torch.equal(a[inf], b[inf])
                assert rel_diff(a, b, ~inf) < 1e-12


@pytest.mark.slow
def test_shared_rows_pgd_sweep():
    """Thousands of (input, encoder) pairs on conv encoders whose second layer takes the step,
    both norms, PGD with 6 restarts: no flip inside a local radius."""
    total = 0
    for seed in range(20, 26):
        enc = conv_encoder(seed, c1=4 + seed % 3 * 4, c2=6 + seed % 2 * 4)
        head, X = fitted_head(enc, SHAPE, K=4, seed=seed)
        for norm in (2, math.inf):
            _, n = _attack_check(enc, head, X[:120], norm, "local", domain=(0.0, 1.0), n_restarts=6)
            total += n
    assert total >= 1000, total
