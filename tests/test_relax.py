"""The elementwise relaxations (gmfast.lipschitz.relax) against mpmath: lines and ranges hold at
many points of many intervals (wide, narrow, negative, degenerate, huge), the formulas'
errors are far inside the allowance the proofs assume, the shapes the pieces claim hold,
and the lines are tight where they should be."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from gmfast.lipschitz import relax
from gmfast.lipschitz.errors import UnsupportedOpError

mp = mpmath.mp
mp.prec = 160
F64 = torch.float64
SELU = (mpmath.mpf(1.0507009873554804934193349852946), mpmath.mpf(1.6732632423543772848170429916717))


def _softplus(beta, thr):
    def f(x):
        if x * beta > thr:
            return x
        return mpmath.log1p(mpmath.exp(beta * x)) / beta
    return f


def _elu(alpha, inner=1.0):
    return lambda x: x if x > 0 else alpha * mpmath.expm1(x * inner)


def _hardtanh(lo, hi):
    return lambda x: min(max(x, mpmath.mpf(lo)), mpmath.mpf(hi))


# (name, params, exact f, where the intervals live: (centre scale, domain))
CASES = [
    ("exp", {}, mpmath.exp, "any"),
    ("sigmoid", {}, lambda x: 1 / (1 + mpmath.exp(-x)), "any"),
    ("tanh", {}, mpmath.tanh, "any"),
    ("gelu", {"approximate": "none"}, lambda x: x * mpmath.ncdf(x), "any"),
    ("silu", {}, lambda x: x / (1 + mpmath.exp(-x)), "any"),
    ("softplus", {"beta": 1.0, "threshold": 20.0}, _softplus(1.0, 20.0), "any"),
    ("softplus", {"beta": 2.0, "threshold": 1.0}, _softplus(2.0, 1.0), "any"),
    ("softplus", {"beta": -1.5, "threshold": 3.0}, _softplus(-1.5, 3.0), "any"),
    ("softplus", {"beta": 1.0, "threshold": math.inf}, _softplus(1.0, math.inf), "any"),
    ("elu", {"alpha": 1.0}, _elu(1), "any"),
    ("elu", {"alpha": 2.5}, _elu(2.5), "any"),
    ("elu", {"alpha": -0.5}, _elu(-0.5), "any"),
    ("celu", {"alpha": 0.7}, _elu(0.7, 1 / mpmath.mpf(0.7)), "any"),
    ("selu", {}, lambda x: SELU[0] * x if x > 0 else SELU[0] * SELU[1] * mpmath.expm1(x), "any"),
    ("hardtanh", {"min_val": -1.0, "max_val": 2.0}, _hardtanh(-1.0, 2.0), "any"),
    ("relu6", {}, _hardtanh(0.0, 6.0), "any"),
    ("hardsigmoid", {}, lambda x: min(max(x / 6 + mpmath.mpf(0.5), 0), 1), "any"),
    ("hardswish", {}, lambda x: x * min(max(x + 3, 0), 6) / 6, "any"),
    ("square", {}, lambda x: x * x, "any"),
    ("sqrt", {}, mpmath.sqrt, "nonneg"),
    ("rsqrt", {}, lambda x: 1 / mpmath.sqrt(x), "pos"),
    ("reciprocal", {}, lambda x: 1 / x, "nozero"),
]
IDS = [f"{n}-{'-'.join(f'{v}' for v in p.values())}" for n, p, _, _ in CASES]


def _intervals(domain, seed):
    """Random intervals of every kind: wide, narrow, tiny, degenerate, negative, far out."""
    g = torch.Generator().manual_seed(seed)
    c = torch.cat([torch.randn(30, generator=g, dtype=F64) * 3, torch.randn(10, generator=g, dtype=F64) * 30,
                   torch.tensor([0.0, -1.41421356, 1.41421356, -2.39935728, 2.3993573, 3.0, -3.0, 20.0, 1e-300, -0.5],
                                dtype=F64)])
    n = c.numel()
    kind = torch.arange(n) % 5
    w = torch.where(kind == 0, torch.rand(n, generator=g, dtype=F64) * 8,
                    torch.where(kind == 1, torch.rand(n, generator=g, dtype=F64) * 1e-3,
                                torch.where(kind == 2, torch.rand(n, generator=g, dtype=F64) * 1e-9,
                                            torch.where(kind == 3, torch.zeros(n, dtype=F64),
                                                        torch.rand(n, generator=g, dtype=F64)))))
    l, u = c - w, c + w
    if domain == "nonneg":
        l = l.abs()
        u = l + 2 * w
        l[:3] = 0.0
    elif domain == "pos":
        l = l.abs() + 1e-6
        u = l + 2 * w
    elif domain == "nozero":
        neg = c < 0
        l = torch.where(neg, -(c.abs() + 1e-4) - 2 * w, c.abs() + 1e-4)
        u = l + 2 * w
    return l, u


def _points(l, u, k, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand((k,) + l.shape, generator=g, dtype=F64)
    z = l + t * (u - l)
    z = torch.minimum(torch.maximum(z, l), u)
    return torch.cat([l.unsqueeze(0), u.unsqueeze(0), (0.5 * l + 0.5 * u).unsqueeze(0), z])


def _check_lines(R, f, l, u, k=10, seed=0):
    al, bl, au, bu = R.lines(l, u)
    lo, hi = R.range(l, u)
    for t in (al, bl, au, bu, lo, hi):
        assert t.dtype == F64 and t.shape == l.shape and not bool(torch.isnan(t).any())
    Z = _points(l, u, k, seed)
    bad = []
    for i in range(l.numel()):
        for z in Z[:, i].tolist():
            zm = mpmath.mpf(z)
            fz = f(zm)
            low = mpmath.mpf(al[i].item()) * zm + mpmath.mpf(bl[i].item())
            upp = mpmath.mpf(au[i].item()) * zm + mpmath.mpf(bu[i].item())
            if not (low <= fz <= upp and mpmath.mpf(lo[i].item()) <= fz <= mpmath.mpf(hi[i].item())):
                bad.append((l[i].item(), u[i].item(), z, float(fz), float(low), float(upp)))
    assert not bad, f"{len(bad)} violations, first: (l, u, z, f, lower, upper) = {bad[:3]}"
    return al, bl, au, bu, lo, hi


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lines_and_range_hold(case):
    name, params, f, domain = case
    R = relax.get(name, params)
    l, u = _intervals(domain, seed=len(name))
    _check_lines(R, f, l, u)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tight_on_narrow_intervals(case):
    """On an interval of width 2e-3 the gap between the lines is O(w²·f''): far below 1e-4
    (a sound but loose relaxation, e.g. the range as constant lines, fails this)."""
    name, params, f, domain = case
    R = relax.get(name, params)
    c = torch.tensor([0.3, 0.7, 1.1, 2.0, 2.9], dtype=F64)
    if domain == "any":
        c = torch.cat([c, -c])
    if name == "softplus":  # the switch to the identity is a real jump: not where it lies
        b, t = params["beta"], params["threshold"]
        c = c[((c - 1e-3) * b > t) == ((c + 1e-3) * b > t)]
    if name == "hardtanh":  # a kink: O(w), like ReLU's triangle
        c = c[c != 2.0]
    l, u = c - 1e-3, c + 1e-3
    al, bl, au, bu = R.lines(l, u)
    for z in (l, u, 0.5 * (l + u)):
        gap = (au * z + bu) - (al * z + bl)
        assert bool((gap >= 0).all()) and float(gap.max()) < 1e-4, (name, gap)
    lo, hi = R.range(l, u)
    fl = torch.tensor([float(f(mpmath.mpf(v))) for v in l.tolist()], dtype=F64)
    fu = torch.tensor([float(f(mpmath.mpf(v))) for v in u.tolist()], dtype=F64)
    assert float((hi - lo - (fu - fl).abs()).max()) < 1e-6  # the range is near the true one


def test_extreme_intervals_sound_and_never_nan():
    """Huge arguments: values may overflow to ±inf (never NaN) and the bounds still hold."""
    l = torch.tensor([-1000.0, -1e300, 700.0, -800.0, -40.0], dtype=F64)
    u = torch.tensor([1000.0, 1e300, 720.0, -700.0, 40.0], dtype=F64)
    for name, params in [("exp", {}), ("sigmoid", {}), ("tanh", {}), ("gelu", {}), ("silu", {}),
                         ("softplus", {"beta": 1.0, "threshold": 20.0}), ("elu", {"alpha": 1.0}), ("selu", {}),
                         ("hardswish", {}), ("square", {})]:
        R = relax.get(name, params)
        out = R.lines(l, u) + R.range(l, u)
        assert not any(bool(torch.isnan(t).any()) for t in out), name
    R = relax.get("exp")
    al, bl, au, bu = R.lines(l, u)
    lo, hi = R.range(l, u)
    assert bool(torch.isinf(hi[0])) and -1e-290 <= float(lo[0]) <= 1e-290
    R = relax.get("sigmoid")
    _check_lines(R, CASES[1][2], l, u, k=20)


def test_formula_errors_far_inside_the_allowance():
    """Every piece's formula and derivative at many points (tails included) is within
    ``2⁻³⁹·m + ABS`` of the exact value: 8 times inside the ``REL = 2⁻³⁶`` the proofs use (the
    largest errors are the argument amplification of erfc and exp in the far tails)."""
    pts = torch.cat([torch.linspace(-40, 40, 801, dtype=F64), torch.tensor([-745.0, -700.0, -300.0, -37.5, 1e-8,
                                                                           -1e-8, 300.0, 700.0], dtype=F64)])
    d = mpmath.diff
    for name, params, f, domain in CASES:
        R = relax.get(name, params)
        rels = [R] if not isinstance(R, relax._Reflected) else [R.g]
        fx = f if not isinstance(R, relax._Reflected) else (lambda x, f=f: -f(-x))
        for Rr in rels:
            for piece in Rr.pieces:
                z = pts.clamp(min=max(piece.lo, -1e300), max=min(piece.hi, 1e300))
                if domain == "pos" or domain == "nozero":
                    z = z[z != 0]
                z = z[(z > piece.lo) & (z < piece.hi)] if piece.hi > piece.lo else z[:0]
                # where pieces overlap (Softplus's switch) only one formula is the function
                z = z[sum(((z > q.lo) & (z < q.hi)).int() for q in Rr.pieces) == 1]
                v, m = piece.f(z)
                dv, dm = piece.df(z)
                for i, x in enumerate(z.tolist()):
                    ex = fx(mpmath.mpf(x))
                    assert abs(mpmath.mpf(v[i].item()) - ex) <= mpmath.mpf(2) ** -39 * m[i].item() + relax.ABS, \
                        (name, x, v[i].item(), ex)
                    if i % 7 == 0:  # derivatives: fewer points (numerical differentiation is slow)
                        dex = d(fx, mpmath.mpf(x))
                        assert abs(mpmath.mpf(dv[i].item()) - dex) <= mpmath.mpf(2) ** -39 * dm[i].item() \
                            + relax.ABS + abs(dex) * mpmath.mpf(2) ** -100, (name, "d", x)


def test_piece_shapes_and_constants():
    """The shapes the pieces claim (f'' ≥ 0 on convex pieces, ≤ 0 on concave ones; |f''| ≤ K on
    generic ones) at many points with mpmath, and SiLU's inflection bracket."""
    c0, c1 = relax._SILU_C
    h = lambda x: x * mpmath.tanh(x / 2) - 2  # noqa: E731 - increasing for x > 0
    assert h(mpmath.mpf(c0)) < 0 < h(mpmath.mpf(c1))
    for name, params, f, _ in CASES:
        R = relax.get(name, params)
        if isinstance(R, relax._Reflected):
            continue
        for piece in R.pieces:
            lo, hi = max(piece.lo, -30.0), min(piece.hi, 30.0)
            if piece.kind == "linear" or not hi > lo:
                continue
            lo = lo if lo > 0 or name not in ("sqrt", "rsqrt") else 1e-3
            for x in torch.linspace(lo, hi, 41, dtype=F64).tolist()[1:-1]:
                f2 = mpmath.diff(f, mpmath.mpf(x), 2)
                if piece.kind == "convex":
                    assert f2 >= -1e-30, (name, x)
                elif piece.kind == "concave":
                    assert f2 <= 1e-30, (name, x)
                else:
                    assert abs(f2) <= piece.K, (name, x)
    for name, K in (("gelu", 0.8), ("silu", 0.5)):  # the global |f''| bounds on a fine grid
        f = dict((n, g) for n, _, g, _ in CASES)[name]
        worst = max(abs(mpmath.diff(f, mpmath.mpf(x), 2)) for x in torch.linspace(-12, 12, 481).tolist())
        assert worst <= K, (name, worst)


def test_line_through_exact_pieces():
    """Where the function is linear on the interval, the lines are that line (up to rounding)."""
    R = relax.get("hardtanh", {"min_val": -1.0, "max_val": 1.0})
    l, u = torch.tensor([-0.5, 2.0, -9.0], dtype=F64), torch.tensor([0.5, 3.0, -2.0], dtype=F64)
    al, bl, au, bu = R.lines(l, u)
    assert torch.allclose(al, torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    assert float((bu - bl).abs().max()) < 1e-12


def test_refusals_and_bad_input():
    with pytest.raises(UnsupportedOpError, match="approximate"):
        relax.get("gelu", {"approximate": "tanh"})
    with pytest.raises(UnsupportedOpError, match="mish"):
        relax.get("mish", {})
    with pytest.raises(UnsupportedOpError, match="alpha"):
        relax.get("celu", {"alpha": -1.0})
    # outside the domain: no finite line exists, the trivial bounds come back (never NaN)
    for name, l0 in (("reciprocal", -1.0), ("rsqrt", 0.0), ("sqrt", -1e-3)):
        R = relax.get(name)
        l, u = torch.tensor([l0, 0.5], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
        al, bl, au, bu = R.lines(l, u)
        lo, hi = R.range(l, u)
        assert al[0] == 0 and au[0] == 0 and bl[0] == -math.inf and bu[0] == math.inf
        assert lo[0] == -math.inf and hi[0] == math.inf
        assert bool(torch.isfinite(torch.stack([bl, bu, lo, hi])[:, 1]).all())
        assert R.offset(torch.ones_like(l), l, u, True)[0] == -math.inf
    inf = torch.tensor([math.inf], dtype=F64)
    al, bl, au, bu = relax.get("sigmoid").lines(-inf, inf)  # infinite intervals: trivial bounds
    assert (al.item(), bl.item(), au.item(), bu.item()) == (0.0, -math.inf, 0.0, math.inf)
    with pytest.raises(ValueError, match="l <= u"):
        relax.get("exp").lines(torch.tensor([math.nan], dtype=F64), torch.tensor([0.0], dtype=F64))
    with pytest.raises(ValueError, match="l <= u"):
        relax.get("exp").lines(torch.tensor([1.0], dtype=F64), torch.tensor([0.0], dtype=F64))
    with pytest.raises(ValueError, match="same shape"):
        relax.get("exp").range(torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64))
    # the reflected Softplus (beta < 0): offset agrees with lines
    R = relax.get("softplus", {"beta": -1.5, "threshold": 3.0})
    l, u = torch.tensor([-1.0, 0.5], dtype=F64), torch.tensor([0.5, 4.0], dtype=F64)
    al, bl, au, bu = R.lines(l, u)
    assert bool((R.offset(al, l, u, True) >= bl - 1e-12).all())
    assert bool((R.offset(au, l, u, False) <= bu + 1e-12).all())


def test_floor_intersects_the_domain():
    """With ``floor`` the relaxation holds on ``[max(l, floor), max(u, floor)]``: for inputs the
    caller knows are ``≥ floor`` (a var + eps, a softmax denominator), any ``l`` is accepted."""
    R = relax.get("rsqrt", {"floor": 1e-5})
    l, u = torch.tensor([-0.3, 0.5, -1.0], dtype=F64), torch.tensor([2.0, 0.7, 1e-6], dtype=F64)
    al, bl, au, bu = R.lines(l, u)
    lo, hi = R.range(l, u)
    for i in range(3):
        a, b = max(l[i].item(), 1e-5), max(u[i].item(), 1e-5)
        for z in torch.linspace(a, b, 50, dtype=F64).tolist():
            fz = 1 / mpmath.sqrt(mpmath.mpf(z))
            assert mpmath.mpf(al[i].item()) * z + mpmath.mpf(bl[i].item()) <= fz <= \
                mpmath.mpf(au[i].item()) * z + mpmath.mpf(bu[i].item())
            assert lo[i].item() <= fz <= hi[i].item()
    Rr = relax.get("reciprocal", {"floor": 1.0})
    lo, hi = Rr.range(torch.tensor([-5.0], dtype=F64), torch.tensor([4.0], dtype=F64))
    assert 0.25 * (1 - 1e-9) <= lo.item() <= 0.25 and 1.0 <= hi.item() <= 1.0 + 1e-9
    with pytest.raises(UnsupportedOpError, match="floor"):
        relax.get("exp", {"floor": 1.0})
