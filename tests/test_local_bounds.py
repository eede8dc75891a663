"""Margin-aware and local (CROWN) input certificates: soundness against exact evaluation
(mpmath, dense grids) and PGD attacks, the route ordering, and refusals."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch import nn

from gmfast import Certifier, GaussianMixtureHead
from gmfast.attack import class_scores, pgd_min_margin
from gmfast.lipschitz import UnsupportedOpError
from gmfast.lipschitz.local import LocalBounds
from gmfast.lipschitz.margin import margin_lipschitz_table

F64 = torch.float64


class Residual(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.a = nn.Linear(w, w)
        self.b = nn.Linear(w, w)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def make_encoder(arch: str, seed: int, d_in: int = 2, latent: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "mlp":
        net = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, latent))
    elif arch == "residual":
        net = nn.Sequential(nn.Linear(d_in, 12), nn.ReLU(), Residual(12), nn.ReLU(), nn.Linear(12, latent))
    elif arch == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, latent))
        with torch.no_grad():
            bn = net[1]
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    else:
        raise ValueError(arch)
    return net.double().eval()


def input_shape(arch):
    return (1, 8, 8) if arch == "cnn" else (2,)


def fitted_head(encoder, shape, K, seed, kind="tied"):
    """A head fitted on the encoder's latents of random inputs, labelled by K equal bins of a
    random projection of the latents (separable, balanced classes: positive radii)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand((400,) + shape, generator=g, dtype=F64)
    with torch.no_grad():
        Z = encoder(X).reshape(400, -1)
    P = torch.randn(Z.shape[1], generator=g, dtype=F64)
    y = torch.empty(400, dtype=torch.int64)
    y[torch.argsort(Z @ P)] = torch.arange(400) * K // 400  # K equal bins along a random direction
    return GaussianMixtureHead(kind, shrinkage=0.1, num_classes=K).fit(Z, y), X


# ------------------------------------------------------------------ bounds vs exact values


@pytest.mark.parametrize("arch", ["mlp", "residual"])
@pytest.mark.parametrize("norm", [2, math.inf])
def test_crown_lower_bound_below_dense_grid_minimum(arch, norm):
    """On 2-D inputs the minimum of a linear function of the output over the ball, evaluated
    on a dense grid (an upper bound on the true minimum), is never below the CROWN bound."""
    net = make_encoder(arch, seed=1)
    lb = LocalBounds(net, (2,))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(6, 3, 4, generator=g, dtype=F64)
    t = torch.linspace(-1, 1, 201, dtype=F64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    if norm == 2:
        grid = grid[grid.norm(dim=1) <= 1]
    for eps in (0.02, 0.2, 0.6):
        low = lb.lower(lam, lb.prepare(x, eps, norm))
        with torch.no_grad():
            for b in range(6):
                vals = net(x[b] + eps * grid) @ lam[b].T
                assert bool((low[b] <= vals.min(0).values).all()), (arch, norm, eps, b)
                # and not vacuous: within a reasonable gap of the grid minimum at small eps
                if eps == 0.02:
                    assert float((vals.min(0).values - low[b]).max()) < 0.5


def test_linear_network_bound_matches_mpmath():
    """With no activation the relaxation is exact: the bound must be below the exact minimum
    (computed in 50-digit arithmetic) and within 1e-12 of it (the rounding allowance)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).double().eval()
    lb = LocalBounds(net, (5,))
    x = torch.randn(4, 5, dtype=F64)
    lam = torch.randn(4, 2, 3, dtype=F64)
    eps = 0.3
    mpmath.mp.dps = 50
    W1, b1 = net[0].weight.tolist(), net[0].bias.tolist()
    W2, b2 = net[1].weight.tolist(), net[1].bias.tolist()
    for norm in (2, math.inf):
        low = lb.lower(lam, lb.prepare(x, eps, norm))
        for b in range(4):
            for r in range(2):
                la = [mpmath.mpf(v) for v in lam[b, r].tolist()]
                # g = laᵀ W2 W1, const = laᵀ(W2 b1 + b2)
                v2 = [sum(la[i] * mpmath.mpf(W2[i][k]) for i in range(3)) for k in range(7)]
                gvec = [sum(v2[k] * mpmath.mpf(W1[k][j]) for k in range(7)) for j in range(5)]
                const = sum(v2[k] * mpmath.mpf(b1[k]) for k in range(7)) + sum(la[i] * mpmath.mpf(b2[i])
                                                                            for i in range(3))
                center = sum(gvec[j] * mpmath.mpf(x[b, j].item()) for j in range(5)) + const
                dual = mpmath.sqrt(sum(v * v for v in gvec)) if norm == 2 else sum(abs(v) for v in gvec)
                exact = center - mpmath.mpf(eps) * dual
                got = mpmath.mpf(low[b, r].item())
                assert got <= exact, (norm, b, r)
                assert exact - got < 1e-12 * (1 + abs(exact))


@pytest.mark.parametrize("arch", ["mlp", "residual", "cnn"])
def test_jacobian_shortcut_matches_the_full_pass(arch):
    """Passes that end at a first-layer node through its kept Jacobian (and the fused
    activation + Jacobian step) give the bounds of the full pass through every op, up to
    the rounding charges, and never above them by more than those charges."""
    net = make_encoder(arch, seed=21)
    shape = input_shape(arch)
    g = torch.Generator().manual_seed(22)
    x = torch.rand((5,) + shape, generator=g, dtype=F64)
    lam = torch.randn(5, 3, 4, generator=g, dtype=F64)
    short, full = LocalBounds(net, shape), LocalBounds(net, shape)
    full.jacobian_limit = 0
    for norm in (2, math.inf):
        ctx_s, ctx_f = short.prepare(x, 0.05, norm), full.prepare(x, 0.05, norm)
        assert ctx_s["J"] and not ctx_f["J"]
        a, b = short.lower(lam, ctx_s), full.lower(lam, ctx_f)
        assert float((a - b).abs().max()) < 1e-9 * (1 + float(b.abs().max()))


def test_one_input_at_a_time_matches_the_batch():
    """Per-input rows of a batch of one input also have a batch dim of 1: they must never be
    cached as rows shared by the batch (a later chunk would reuse another chunk's rows).
    Three ReLU layers and small refinement chunks: every input alone gives its bounds in the
    batch, and all are below a dense grid."""
    torch.manual_seed(23)
    net = nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                        nn.Linear(10, 3)).double().eval()
    lb = LocalBounds(net, (2,))
    lb.row_chunk = 4  # many chunks per refinement
    g = torch.Generator().manual_seed(24)
    x = torch.rand(4, 2, generator=g, dtype=F64) * 2 - 1
    lam = torch.randn(4, 2, 3, generator=g, dtype=F64)
    t = torch.linspace(-1, 1, 101, dtype=F64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    for norm in (2, math.inf):
        both = lb.lower(lam, lb.prepare(x, 0.4, norm))
        for b in range(4):
            alone = lb.lower(lam[b:b + 1], lb.prepare(x[b:b + 1], 0.4, norm))
            assert torch.allclose(alone[0], both[b], rtol=1e-9, atol=1e-12), (norm, b)
            pts = grid[grid.norm(dim=1) <= 1] if norm == 2 else grid
            with torch.no_grad():
                vals = net(x[b] + 0.4 * pts) @ lam[b].T
            assert bool((alone[0] <= vals.min(0).values).all())


def test_domain_box_tightens_linf_and_stays_sound():
    net = make_encoder("mlp", seed=4)
    lb = LocalBounds(net, (2,))
    x = torch.tensor([[0.05, 0.9], [0.5, 0.5]], dtype=F64)
    lam = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    eps = 0.3
    free = lb.lower(lam, lb.prepare(x, eps, math.inf))
    boxed = lb.lower(lam, lb.prepare(x, eps, math.inf, (0.0, 1.0)))
    assert bool((boxed >= free - 1e-12).all()) and bool((boxed > free + 1e-6).any())
    t = torch.linspace(-1, 1, 201, dtype=F64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        for b in range(2):
            pts = (x[b] + eps * grid).clamp(0, 1)
            assert bool((boxed[b] <= (net(pts) @ lam[b].T).min(0).values).all())


# ------------------------------------------------------------------ certificates vs attacks


def _attack_check(enc, head, X, norm, method, domain=None, n_restarts=4):
    cert = Certifier(enc, head, method=method, domain=domain).certify(X, norm=norm)
    ok = (cert.prediction >= 0) & (cert.radius > 0)
    idx = ok.nonzero().reshape(-1)
    if idx.numel() == 0:
        return cert, 0
    m, _ = pgd_min_margin(enc, head, X[idx], cert.prediction[idx], cert.radius[idx] * (1 - 1e-9), norm,
                          domain=domain if norm == math.inf else None, steps=30, restarts=n_restarts)
    # the certified margins are > 0 over the closed ball; float64 evaluation of the
    # attacked point is accurate to far below 1e-9
    assert bool((m > -1e-9).all()), f"{method} {norm}: flip inside a certified radius ({int((m <= -1e-9).sum())})"
    return cert, int(idx.numel())


@pytest.mark.parametrize("arch", ["mlp", "residual", "cnn"])
@pytest.mark.parametrize("norm", [2, math.inf])
def test_local_route_survives_pgd(arch, norm):
    pairs, flips = 0, 0
    for seed in range(2):
        enc = make_encoder(arch, seed)
        shape = input_shape(arch)
        head, X = fitted_head(enc, shape, K=3, seed=seed)
        X = X[:16] if arch == "cnn" else X[:30]  # the CNN's relaxation is the costly one
        cert, n = _attack_check(enc, head, X, norm, "local", domain=(0.0, 1.0), n_restarts=3)
        pairs += n
        # the attack is strong enough to matter: at 20x the certified radius it flips some
        ok = cert.radius > 0
        m, _ = pgd_min_margin(enc, head, X[ok], cert.prediction[ok], 20 * cert.radius[ok], norm,
                              domain=(0.0, 1.0) if norm == math.inf else None, steps=20, restarts=1)
        flips += int((m < 0).sum())
    assert pairs >= 16  # the certificates are not vacuous
    assert flips > 0


def test_margin_route_survives_pgd_and_beats_global():
    for arch in ("mlp", "cnn"):
        enc = make_encoder(arch, 7)
        head, X = fitted_head(enc, input_shape(arch), K=4, seed=7)
        cm, n = _attack_check(enc, head, X[:60], 2, "margin")
        cg = Certifier(enc, head, method="lipschitz").certify(X[:60])
        assert n > 0
        assert bool((cm.radius >= cg.radius * (1 - 1e-12)).all())
        assert float(cm.radius.sum()) > float(cg.radius.sum())


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_perclass_local_route_survives_pgd(kind):
    enc = make_encoder("mlp", 11)
    head, X = fitted_head(enc, (2,), K=3, seed=11, kind=kind)
    _, n = _attack_check(enc, head, X[:40], 2, "local")
    assert n > 0


def test_auto_is_the_maximum_of_the_routes():
    enc = make_encoder("cnn", 12)
    head, X = fitted_head(enc, (1, 8, 8), K=4, seed=12)
    X = X[:30]
    auto = Certifier(enc, head).certify(X)
    for m in ("lipschitz", "margin", "local"):
        r = Certifier(enc, head, method=m).certify(X).radius
        # auto's local search stops once a ball within 5% above the other routes fails
        assert bool((auto.radius >= (r if m != "local" else r / 1.05 * (1 - 1e-12))).all()), m
    assert set(auto.extra["routes"]) == {"lipschitz", "margin", "local"}
    assert bool((auto.extra["routes"]["local"] > auto.extra["routes"]["lipschitz"]).sum() > 15)


def test_linf_global_route_is_l2_over_sqrt_n():
    enc = make_encoder("mlp", 13)
    head, X = fitted_head(enc, (2,), K=3, seed=13)
    c = Certifier(enc, head, method="lipschitz")
    r2, ri = c.certify(X[:20]).radius, c.certify(X[:20], norm=math.inf).radius
    assert bool((ri <= r2 / math.sqrt(2)).all()) and bool((ri >= r2 / math.sqrt(2) * (1 - 1e-12)).all())


def test_float32_encoder_local_route():
    enc = make_encoder("cnn", 14).float()
    head, X = fitted_head(enc.double(), (1, 8, 8), K=3, seed=14)
    enc = enc.float()
    cert = Certifier(enc, head, method="local").certify(X[:20].float())
    assert bool((cert.radius > 0).sum() > 5)
    m, _ = pgd_min_margin(enc.double(), head, X[:20], cert.prediction, cert.radius * (1 - 1e-9), 2, steps=30)
    assert bool((m[cert.radius > 0] > -1e-9).all())


def test_margin_table_is_an_upper_bound_on_margin_gradients():
    """Λ[c, j] ≥ ‖∇ₓ (a_c − a_j)ᵀh(x)‖ at random points (the gradient norm is a lower bound
    on the margin's Lipschitz constant)."""
    enc = make_encoder("cnn", 15)
    head, X = fitted_head(enc, (1, 8, 8), K=3, seed=15)
    A = head.classifier_params.A
    table, info = margin_lipschitz_table(enc, (1, 8, 8), A)
    x = X[:16].clone().requires_grad_(True)
    z = enc(x)
    for c in range(3):
        for j in range(3):
            if c == j:
                continue
            (g,) = torch.autograd.grad(((A[c] - A[j]) * z).sum(), x, retain_graph=True)
            assert float(g.reshape(16, -1).norm(dim=1).max()) <= float(table[c, j])
    assert info["folded"]


# ------------------------------------------------------------------ refusals and bad input


def test_unsupported_activation_refused_by_local_and_skipped_by_auto():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(2, 8), nn.Softsign(), nn.Linear(8, 3)).double().eval()
    head, X = fitted_head(enc, (2,), K=3, seed=0)
    with pytest.raises(UnsupportedOpError, match="no linear relaxation"):
        Certifier(enc, head, method="local").certify(X[:4])
    cert = Certifier(enc, head).certify(X[:4])
    assert "local" in cert.extra["skipped"] and "local" not in cert.extra["routes"]


def test_bad_arguments():
    enc = make_encoder("mlp", 0)
    head, X = fitted_head(enc, (2,), K=3, seed=0)
    with pytest.raises(ValueError, match="method must be one of"):
        Certifier(enc, head, method="crown")
    with pytest.raises(ValueError, match="domain must be a pair"):
        Certifier(enc, head, domain=(1.0, 0.0))
    with pytest.raises(ValueError, match="norm must be 2 or"):
        Certifier(enc, head).certify(X[:2], norm=1)
    full, _ = fitted_head(enc, (2,), K=3, seed=0, kind="full")
    with pytest.raises(ValueError, match="needs a tied head"):
        Certifier(enc, full, method="margin")


# ------------------------------------------------------------------ the big sweep


@pytest.mark.slow
def test_pgd_sweep_ten_thousand_pairs():
    """≥ 10⁴ (input, encoder) pairs across architectures, both norms, all routes of auto:
    PGD with restarts never flips a prediction inside a certified radius."""
    total = 0
    for arch in ("mlp", "residual", "cnn"):
        for seed in range(20, 38):
            enc = make_encoder(arch, seed)
            head, X = fitted_head(enc, input_shape(arch), K=4, seed=seed)
            for norm in (2, math.inf):
                _, n = _attack_check(enc, head, X[:120], norm, "auto", domain=(0.0, 1.0), n_restarts=6)
                total += n
    assert total >= 10_000, total


def test_scores_helper_matches_head_prediction():
    enc = make_encoder("mlp", 16)
    head, X = fitted_head(enc, (2,), K=3, seed=16)
    with torch.no_grad():
        s = class_scores(enc, head, X[:50])
        assert torch.equal(s.argmax(1), head.predict(enc(X[:50])))


def test_local_bounds_refuse_train_mode_and_hooks():
    enc = make_encoder("cnn", 17)
    enc.train()
    with pytest.raises(ValueError, match="train mode"):
        LocalBounds(enc, (1, 8, 8))
    enc.eval()
    handle = enc[2].register_forward_hook(lambda m, i, o: o * 2)
    try:
        with pytest.raises(UnsupportedOpError):
            LocalBounds(enc, (1, 8, 8))
    finally:
        handle.remove()
