"""Sound linear relaxations of elementwise functions on intervals (the local route's smooth
activations and the transformer primitives).

For a function ``f`` and float64 tensors ``l ≤ u``, :meth:`Relaxation.lines` returns
slopes and offsets with ``al·z + bl ≤ f(z) ≤ au·z + bu`` for **every real** ``z ∈ [l, u]``, in
exact arithmetic, for the exact mathematical ``f``; :meth:`Relaxation.range` an enclosure
``lo ≤ f(z) ≤ hi``. :func:`get` builds one from an activation's ``(name, params)``
(:mod:`gmfast.lipschitz.activations`) or a primitive name (``exp``, ``reciprocal``, ``rsqrt``,
``square``, ``sqrt``).

Why the lines hold
------------------
The slope is a free choice: for *any* slope ``a``, the line ``a z + b`` lies below ``f`` on
``[l, u]`` iff ``b ≤ min_{[l, u]} (f(z) − a z)``, and above iff ``b ≥ max (f − a z)``. So the
slopes are picked by a heuristic (the chord, the tangents at ``l``, the midpoint and ``u``;
the candidate whose line is best at the midpoint, i.e. encloses the least area, wins; a
degenerate interval takes slope 0) and only the *offsets* carry the proof: a rigorous lower
bound on ``min (f − a z)`` (upper bound on ``max``). Each function is described by *pieces*
``[p_lo, p_hi]`` covering the real line (they may overlap: the min over a superset is
smaller, still a bound), each with a formula valid on the whole piece and one of four
shapes; on ``[p, q] = [l, u] ∩ piece``, with ``g = f − a z``:

* **linear**: ``g`` is linear, its min and max are at ``p`` or ``q``;
* **convex** (``f'' ≥ 0`` on the piece): the max of ``g`` is at ``p`` or ``q`` (a convex function
  lies below its chords); for the min, ``g`` lies above its tangent at any ``r ∈ [p, q]``:
  ``g(z) ≥ g(r) + g'(r)(z − r)``, so ``min g ≥ g(r) + min(g'(r), 0)(q − r) − max(g'(r), 0)(r − p)``,
  exact at the minimiser ``r`` (where ``f'(r) = a``, found from ``f'``'s inverse or by
  bisection: its accuracy affects tightness only). ``r = p`` when ``f'(p) ≥ a`` (then ``g`` is
  increasing and the bound is ``g(p)``), ``r = q`` when ``f'(q) ≤ a``;
* **concave**: the mirror image (min at the ends, max by the tangent);
* **generic** (no shape, ``|f''| ≤ K`` on the piece, ``K`` proven): ``g`` lies within
  ``K (z − p)(q − z)/2 ≤ K w²/8`` of its chord, so ``min g ≥ min(g(p), g(q)) − K w²/8``
  (``w = q − p``) and ``max g ≤ max(g(p), g(q)) + K w²/8``. Used only on float brackets of
  irrational inflection points (a few ulps wide).

A convex function on an interval is thus bounded by tangent + chord (CROWN; Shi et al. 2020
for sigmoid/tanh/GELU shapes); on an interval that straddles an inflection point the best
candidate line is shifted by exactly what the piecewise min/max needs — no case analysis of
where a tangent from an endpoint touches is needed for soundness. The range is the same
computation with ``a = 0``.

Floating point
--------------
Every operation in the offsets is rounded *outward*: ``nextafter(fl(x ∘ y), ∓∞)`` is a lower
(upper) bound of the exact ``x ∘ y`` of two floats under round-to-nearest (also on underflow,
where the error is at most half the ``nextafter`` step, and on overflow to ``±∞``), and each
step combines bounds monotonically (signs are fixed by ``min(·, 0)``/``max(·, 0)``). Values of
``f`` and ``f'`` at a float point ``z`` are enclosed by ``v ± (REL·m + ABS)``, where ``v`` is the
computed formula, ``m`` the computed sum of the magnitudes of its terms, ``REL = 2⁻³⁶`` and
``ABS = 2⁻¹⁰⁰⁰``. Each formula is written as a sum of a few terms, each a product or quotient of
torch float64 ``exp``, ``expm1``, ``log1p``, ``erfc``, ``sqrt`` values, exact or once-rounded
constants and the argument, so its error is at most ``(k·E + j·u)·m`` plus underflow, with ``k
≤ 4`` library calls of relative error ``E``, ``j ≤ 10`` roundings (``u = 2⁻⁵³``), and the
propagation of a relative error ``δ ≤ 2u`` of a computed *argument*: at most ``|t|·δ·
|d log F/d t|`` — for ``exp(−x²/2)`` and ``erfc(y)`` (``|d log erfc/dy| ≤ 2|y| + 2``) and
``σ(t)`` this is ``≤ 4u·745 < 2⁻⁴¹`` because beyond ``|t| ≈ 745`` (``y ≈ 27.3``) the values
underflow and ``ABS`` covers them (every underflowed term is below ``2⁻¹⁰⁷⁴·|x|`` or ``e⁻⁷⁴⁵``).
We assume ``E ≤ 2⁻⁴⁴`` (256 ulps). glibc documents at most 1–5 ulps for these functions on
x86-64 (``erfc`` 5) and SLEEF's ``u10``/``u15`` variants that torch vectorises with at most
1.0/1.5 ulps; ``sqrt`` is correctly rounded. The total, ``≤ 4·2⁻⁴⁴ + 2⁻⁴¹ + 10·2⁻⁵³ < 2⁻³⁹``,
leaves a factor 8 to ``REL`` (which also absorbs the single rounding of forming ``REL·m +
ABS``), and ``tests/test_relax.py`` checks every formula against mpmath at many points,
tails included, with a margin far below ``REL``. The cost of ``REL`` is a relative ``1.5e−11``
per value: invisible in a certificate.

The function certified is the exact-arithmetic one (as for the whole local route): e.g. GELU
``x Φ(x)``, Softplus with its switch to the identity where ``βx > threshold`` (the smooth branch
there differs from the identity by at most ``log(1 + e^{−threshold})/β``, and the pieces
overlap at the switch; ``β < 0`` is reflected: ``softplus_β(x) = −softplus_{−β}(−x)``).
Bounds of a function whose value exceeds the float64 range on ``[l, u]`` may be infinite
(``exp`` of a huge number), and so are they (with zero slopes) where ``[l, u]`` leaves the
function's domain (``reciprocal`` across 0, ``rsqrt`` at ``l ≤ 0``: no finite line exists) or
is infinite; they are never NaN.
"""

from __future__ import annotations

import math

import torch

from gmfast.lipschitz.errors import UnsupportedOpError

_F64 = torch.float64
REL = 2.0**-36
ABS = 2.0**-1000
_INF = math.inf
_BISECT = 20
_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: SiLU's inflection points are ±c with c tanh(c/2) = 2 (c = 2.39935728...); a float bracket
#: (checked with mpmath in the tests: c tanh(c/2) − 2 changes sign inside, increasing in c)
_SILU_C = (2.3993572805, 2.3993572806)


def _dn(t):
    return torch.nextafter(t, torch.full_like(t, -_INF))


def _up(t):
    return torch.nextafter(t, torch.full_like(t, _INF))


def _enc(vm):
    """Enclosure of the exact value from a computed value and term magnitude."""
    v, m = vm
    w = m * REL + ABS
    return _dn(v - w), _up(v + w)


# ----------------------------------------------------------------------------- formulas
# Each returns (value, magnitude), see the module docstring. ``x`` is a float64 tensor.


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _absval(v):
    return v, v.abs()


def _exp(x):
    return _absval(torch.exp(x))


def _sigmoid(x):
    return _absval(_sig(x))


def _dsigmoid(x):
    return _absval(_sig(x) * _sig(-x))


def _tanh(x):
    return _absval(torch.tanh(x))


def _dtanh(x):
    return _absval(4.0 * _sig(2.0 * x) * _sig(-2.0 * x))


def _phi(x):
    return torch.exp(-(x * x) * 0.5) * _INV_SQRT2PI


def _Phi(x):
    return 0.5 * torch.special.erfc(-x / _SQRT2)


def _gelu(x):
    return _absval(x * _Phi(x))


def _dgelu(x):
    a, b = _Phi(x), x * _phi(x)
    return a + b, a + b.abs()


def _silu(x):
    return _absval(x * _sig(x))


def _dsilu(x):
    s = _sig(x)
    b = x * s * _sig(-x)
    return s + b, s + b.abs()


def _square(x):
    return _absval(x * x)


def _dsquare(x):
    return _absval(2.0 * x)


def _sqrt(x):
    return _absval(torch.sqrt(x))


def _dsqrt(x):
    return _absval(0.5 / torch.sqrt(x))


def _recip(x):
    return _absval(1.0 / x)


def _drecip(x):
    r = 1.0 / x
    return _absval(-(r * r))


def _rsqrt(x):
    return _absval(1.0 / torch.sqrt(x))


def _drsqrt(x):
    return _absval(-0.5 / (torch.sqrt(x) * x))


def _ident(x):
    return x, torch.zeros_like(x)


def _one(x):
    return torch.ones_like(x), torch.zeros_like(x)


def _const(c, exact=True):
    """The constant ``c``; ``exact=False`` when the float stands for a rounded value (1/6, λ)."""
    return lambda x: (torch.full_like(x, c), torch.full_like(x, 0.0 if exact else abs(c)))


def _lin(k, c):
    """``k x + c`` (k, c floats; ``k x`` is one rounding)."""
    return lambda x: (k * x + c, (k * x).abs() + abs(c))


# ----------------------------------------------------------------------------- pieces


class _Piece:
    """``f`` on ``[lo, hi]``: formula ``f``, derivative ``df`` (``(value, magnitude)``), shape
    ``kind`` ("linear", "convex", "concave", "generic"), ``K ≥ sup|f''|`` for "generic",
    ``inv``: an approximate inverse of ``f'`` (speed only)."""

    def __init__(self, lo, hi, kind, f, df, inv=None, K=None):
        self.lo, self.hi, self.kind, self.f, self.df, self.inv, self.K = lo, hi, kind, f, df, inv, K


def _g_enc(piece, a, z):
    """Enclosure of ``f(z) − a z`` at float points ``z``."""
    flo, fhi = _enc(piece.f(z))
    az = a * z
    return _dn(flo - _up(az)), _up(fhi - _dn(az))


def _mul_dn(x, y):
    """A lower bound of ``x·y`` (0 where either is 0, whatever the other)."""
    return torch.where((x == 0) | (y == 0), torch.zeros_like(x), _dn(x * y))


def _mul_up(x, y):
    return torch.where((x == 0) | (y == 0), torch.zeros_like(x), _up(x * y))


def _touch(piece, a, p, q, increasing):
    """The point of ``[p, q]`` where ``f' = a`` (``f'`` monotone on the piece), approximately."""
    if piece.inv is not None:
        with torch.no_grad():
            r = piece.inv(a)
        r = torch.where(torch.isnan(r), 0.5 * p + 0.5 * q, r)
    else:
        lo, hi = p.clone(), q.clone()
        for _ in range(_BISECT):
            mid = 0.5 * lo + 0.5 * hi
            d = piece.df(mid)[0]
            go_right = (d < a) if increasing else (d > a)
            lo, hi = torch.where(go_right, mid, lo), torch.where(go_right, hi, mid)
        r = 0.5 * lo + 0.5 * hi
    r = torch.minimum(torch.maximum(r, p), q)
    dp, dq = piece.df(p)[0], piece.df(q)[0]
    if increasing:
        return torch.where(dp >= a, p, torch.where(dq <= a, q, r))
    return torch.where(dp <= a, p, torch.where(dq >= a, q, r))


def _piece_bound(piece, a, p, q, lower):
    """Bound of ``min`` (lower) / ``max`` of ``f − a z`` over ``[p, q]`` inside the piece."""
    kind = piece.kind
    ends = kind == "linear" or (kind == "concave" and lower) or (kind == "convex" and not lower)
    if ends or kind == "generic":
        gp, gq = _g_enc(piece, a, p), _g_enc(piece, a, q)
        if lower:
            v = torch.minimum(gp[0], gq[0])
        else:
            v = torch.maximum(gp[1], gq[1])
        if kind == "generic":
            w = _up(q - p)
            s = _up(_up(piece.K * _up(w * w)) * 0.125)
            v = _dn(v - s) if lower else _up(v + s)
        return v
    r = _touch(piece, a, p, q, increasing=kind == "convex")
    glo, ghi = _g_enc(piece, a, r)
    dlo, dhi = _enc(piece.df(r))
    Dlo, Dhi = _dn(dlo - a), _up(dhi - a)
    wq, wp = _up(q - r), _up(r - p)
    zero = torch.zeros_like(r)
    if lower:  # g(z) ≥ g(r) + g'(r)(z − r)
        return _dn(_dn(glo + _mul_dn(torch.minimum(Dlo, zero), wq)) - _mul_up(torch.maximum(Dhi, zero), wp))
    return _up(_up(ghi + _mul_up(torch.maximum(Dhi, zero), wq)) + _mul_up(torch.maximum(-Dlo, zero), wp))


class Relaxation:
    """Sound lines and ranges of one elementwise function (see the module docstring)."""

    def __init__(self, name, pieces, domain=None, floor=None):
        self.name, self.pieces, self.domain, self.floor = name, pieces, domain, floor

    def _check(self, l, u):
        if not (isinstance(l, torch.Tensor) and isinstance(u, torch.Tensor)) or l.shape != u.shape:
            raise ValueError(f"{self.name}: expected two tensors of the same shape, got {type(l).__name__} "
                             f"{getattr(l, 'shape', None)} and {type(u).__name__} {getattr(u, 'shape', None)}")
        l, u = l.to(_F64), u.to(_F64)
        if not bool((l <= u).all()):
            raise ValueError(f"{self.name}: expected bounds with l <= u (and no NaN)")
        return self._sanitize(l, u)

    def _sanitize(self, l, u):
        """``(l, u, bad)``: infinite intervals and intervals leaving the domain (``bad``) are
        replaced by ``[1, 1]``; their results become the trivial bounds ``∓∞``
        (:meth:`_unbounded`)."""
        if self.floor is not None:  # the caller knows z >= floor: [l, u] ∩ [floor, ∞) ⊂ [l', u']
            l, u = torch.clamp(l, min=self.floor), torch.clamp(u, min=self.floor)
        bad = ~(torch.isfinite(l) & torch.isfinite(u))
        if self.domain is not None:
            bad = bad | ~self.domain(l, u)
        if not bool(bad.any()):
            return l, u, None
        return torch.where(bad, 1.0, l), torch.where(bad, 1.0, u), bad

    @staticmethod
    def _unbounded(bad, *pairs):
        """Lower/upper pairs with ``−∞``/``+∞`` (and zero slopes) where ``bad``."""
        if bad is None:
            return [t for p in pairs for t in p]
        out = []
        for lo, hi in pairs:
            out += [torch.where(bad, -_INF, lo), torch.where(bad, _INF, hi)]
        return out

    def offset(self, a, l, u, lower: bool):
        """A bound on ``min`` (lower) or ``max`` of ``f(z) − a z`` over ``[l, u]`` (``a`` float64
        tensor like ``l``): the proof of every line and range here. Never NaN; ``∓∞`` where the
        interval leaves the function's domain (e.g. ``reciprocal`` on ``[−1, 1]``)."""
        l, u, bad = self._sanitize(l, u)
        v = self._offset(a, l, u, lower)
        return v if bad is None else torch.where(bad, -_INF if lower else _INF, v)

    def _offset(self, a, l, u, lower):
        best = torch.full_like(l, _INF if lower else -_INF)
        for piece in self.pieces:
            p = torch.clamp(l, min=piece.lo, max=piece.hi)
            q = torch.clamp(u, min=piece.lo, max=piece.hi)
            valid = (u >= piece.lo) & (l <= piece.hi)
            if not bool(valid.any()):
                continue
            v = _piece_bound(piece, a, p, q, lower)
            if lower:
                best = torch.minimum(best, torch.where(valid, v, _INF))
            else:
                best = torch.maximum(best, torch.where(valid, v, -_INF))
        return torch.where(torch.isnan(best), torch.full_like(best, -_INF if lower else _INF), best)

    def _approx(self, z, deriv):
        out = torch.zeros_like(z)
        for piece in reversed(self.pieces):
            inside = (z >= piece.lo) & (z <= piece.hi)
            with torch.no_grad():
                v = (piece.df if deriv else piece.f)(torch.clamp(z, min=piece.lo, max=piece.hi))[0]
            out = torch.where(inside, v, out)
        return out

    def lines(self, l, u):
        """``(al, bl, au, bu)`` with ``al z + bl ≤ f(z) ≤ au z + bu`` on ``[l, u]``."""
        l, u, bad = self._check(l, u)
        w = u - l
        m = 0.5 * l + 0.5 * u
        fl, fu = self._approx(l, False), self._approx(u, False)
        cands = [(fu - fl) / torch.where(w > 0, w, 1.0)] + [self._approx(z, True) for z in (m, l, u)]
        best = None
        for a in cands:
            a = torch.where(torch.isfinite(a) & (w > 0), a, 0.0)
            bl, bu = self._offset(a, l, u, True), self._offset(a, l, u, False)
            sl, su = a * m + bl, a * m + bu
            if best is None:
                best = [a, bl, sl, a.clone(), bu, su]
                continue
            tl, tu = sl > best[2], su < best[5]
            best = [torch.where(tl, a, best[0]), torch.where(tl, bl, best[1]), torch.where(tl, sl, best[2]),
                    torch.where(tu, a, best[3]), torch.where(tu, bu, best[4]), torch.where(tu, su, best[5])]
        if bad is None:
            return best[0], best[1], best[3], best[4]
        zero = torch.zeros_like(l)
        return (torch.where(bad, zero, best[0]), torch.where(bad, -_INF, best[1]), torch.where(bad, zero, best[3]),
                torch.where(bad, _INF, best[4]))

    def range(self, l, u):
        """``(lo, hi)`` with ``lo ≤ f(z) ≤ hi`` on ``[l, u]``."""
        l, u, bad = self._check(l, u)
        zero = torch.zeros_like(l)
        return tuple(self._unbounded(bad, (self._offset(zero, l, u, True), self._offset(zero, l, u, False))))


class _Reflected(Relaxation):
    """``f(z) = −g(−z)`` (Softplus with ``β < 0``): lines and ranges of ``g`` on ``[−u, −l]``,
    negated (exact)."""

    def __init__(self, name, g):
        super().__init__(name, [])
        self.g = g

    def offset(self, a, l, u, lower: bool):
        # f(z) − a z = −(g(y) − a y) with y = −z ∈ [−u, −l]
        return -self.g.offset(a, -u, -l, not lower)

    def lines(self, l, u):
        l, u, _ = self._check(l, u)
        al, bl, au, bu = self.g.lines(-u, -l)
        return au, -bu, al, -bl

    def range(self, l, u):
        l, u, _ = self._check(l, u)
        lo, hi = self.g.range(-u, -l)
        return -hi, -lo


# ----------------------------------------------------------------------------- the functions


def _sig_inv(a, right):
    """``x`` with ``σ'(x) = a`` (``σ(1 − σ) = a``), on the right (x ≥ 0) or left branch."""
    d = torch.sqrt(torch.clamp(1.0 - 4.0 * a, min=0.0))
    s = 0.5 * (1.0 + d) if right else 0.5 * (1.0 - d)
    return torch.log(s) - torch.log1p(-s)


def _tanh_inv(a, right):
    t = torch.sqrt(torch.clamp(1.0 - a, min=0.0))
    return torch.atanh(t) if right else -torch.atanh(t)


def _softplus(beta, thr):
    """Softplus(β > 0, threshold): ``log(1 + e^{βx})/β`` where ``βx ≤ threshold``, else ``x``."""
    b = float(beta)

    def f(x):
        t = x * b
        p1, p2 = torch.clamp(t, min=0.0) / b, torch.log1p(torch.exp(-t.abs())) / b
        return p1 + p2, p1 + p2

    def df(x):
        return _absval(_sig(x * b))

    def inv(a):
        return (torch.log(a) - torch.log1p(-a)) / b

    if math.isinf(thr) and thr > 0:
        return [_Piece(-_INF, _INF, "convex", f, df, inv)]
    c = thr / b
    return [_Piece(-_INF, math.nextafter(c, _INF), "convex", f, df, inv),
            _Piece(math.nextafter(c, -_INF), _INF, "linear", _ident, _one)]


def _exp_piece(lo, hi, scale, inner, sign):
    """``scale·expm1(x·inner)`` on [lo, hi] (ELU, CELU, SELU below 0)."""

    def f(x):
        return _absval(scale * torch.expm1(x * inner))

    def df(x):
        return _absval((scale * inner) * torch.exp(x * inner))

    def inv(a):
        return torch.log(a / (scale * inner)) / inner

    kind = "linear" if scale == 0 else ("convex" if sign > 0 else "concave")
    return _Piece(lo, hi, kind, f, df, inv)


def _real(params, key):
    v = params[key]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise UnsupportedOpError(f"{key}={v!r} is not a real number")
    return float(v)


def _positive(l, u):
    """l > 0"""
    return l > 0


def _nonneg(l, u):
    """l >= 0"""
    return l >= 0


def _no_zero(l, u):
    """l > 0 or u < 0"""
    return (l > 0) | (u < 0)


def get(name: str, params: dict | None = None) -> Relaxation:
    """The relaxation of ``name`` with ``params`` (an activation's as
    :mod:`gmfast.lipschitz.activations` describes them, or none for a primitive);
    :class:`UnsupportedOpError` when there is none. ``params["floor"] > 0`` (sqrt, rsqrt,
    reciprocal): the caller knows every input is ``≥ floor`` (LayerNorm's ``var + eps ≥ eps``,
    softmax's ``Σ_j e^{x_j − x_i} ≥ 1``), so intervals are first intersected with
    ``[floor, ∞)`` — sound for those inputs, and it keeps the domain."""
    params = dict(params or {})
    floor = params.pop("floor", None)
    if floor is not None:
        floor = _real({"floor": floor}, "floor")
        if name not in ("sqrt", "rsqrt", "reciprocal") or not floor > 0:
            raise UnsupportedOpError(f"{name}: floor={floor!r} (a floor > 0 is for sqrt, rsqrt, reciprocal)")
        R = get(name, params)
        R.floor = floor
        return R
    z = _ident
    if name == "exp":
        return Relaxation(name, [_Piece(-_INF, _INF, "convex", _exp, _exp, torch.log)])
    if name == "square":
        return Relaxation(name, [_Piece(-_INF, _INF, "convex", _square, _dsquare, lambda a: 0.5 * a)])
    if name == "sqrt":
        return Relaxation(name, [_Piece(0.0, _INF, "concave", _sqrt, _dsqrt, lambda a: 0.25 / (a * a))], _nonneg)
    if name == "rsqrt":
        return Relaxation(name, [_Piece(0.0, _INF, "convex", _rsqrt, _drsqrt,
                                        lambda a: torch.pow(-2.0 * a, -2.0 / 3.0))], _positive)
    if name == "reciprocal":
        return Relaxation(name, [_Piece(-_INF, 0.0, "concave", _recip, _drecip, lambda a: -torch.rsqrt(-a)),
                                 _Piece(0.0, _INF, "convex", _recip, _drecip, lambda a: torch.rsqrt(-a))], _no_zero)
    if name == "sigmoid":
        return Relaxation(name, [_Piece(-_INF, 0.0, "convex", _sigmoid, _dsigmoid, lambda a: _sig_inv(a, False)),
                                 _Piece(0.0, _INF, "concave", _sigmoid, _dsigmoid, lambda a: _sig_inv(a, True))])
    if name == "tanh":
        return Relaxation(name, [_Piece(-_INF, 0.0, "convex", _tanh, _dtanh, lambda a: _tanh_inv(a, False)),
                                 _Piece(0.0, _INF, "concave", _tanh, _dtanh, lambda a: _tanh_inv(a, True))])
    if name == "gelu":
        if params.get("approximate", "none") != "none":
            raise UnsupportedOpError(f"gelu(approximate={params['approximate']!r}): no sound relaxation "
                                     "implemented (use approximate='none')")
        s_lo, s_hi = math.nextafter(_SQRT2, -_INF), math.nextafter(_SQRT2, _INF)
        # φ(x)(2 − x²): concave | convex on [−√2, √2] | concave; |f''| ≤ 2φ(0) < 0.8
        return Relaxation(name, [_Piece(-_INF, -s_hi, "concave", _gelu, _dgelu),
                                 _Piece(-s_hi, -s_lo, "generic", _gelu, _dgelu, K=0.8),
                                 _Piece(-s_lo, s_lo, "convex", _gelu, _dgelu),
                                 _Piece(s_lo, s_hi, "generic", _gelu, _dgelu, K=0.8),
                                 _Piece(s_hi, _INF, "concave", _gelu, _dgelu)])
    if name == "silu":
        c0, c1 = _SILU_C
        # σ(1 − σ)(2 − x tanh(x/2)): |f''| ≤ ½ (see the tests)
        return Relaxation(name, [_Piece(-_INF, -c1, "concave", _silu, _dsilu),
                                 _Piece(-c1, -c0, "generic", _silu, _dsilu, K=0.5),
                                 _Piece(-c0, c0, "convex", _silu, _dsilu),
                                 _Piece(c0, c1, "generic", _silu, _dsilu, K=0.5),
                                 _Piece(c1, _INF, "concave", _silu, _dsilu)])
    if name == "softplus":
        beta, thr = _real(params, "beta"), _real(params, "threshold")
        if beta == 0 or math.isinf(beta) or (math.isinf(thr) and thr < 0):
            raise UnsupportedOpError(f"softplus(beta={beta!r}, threshold={thr!r})")
        if beta < 0:
            return _Reflected(name, Relaxation(name, _softplus(-beta, thr)))
        return Relaxation(name, _softplus(beta, thr))
    if name in ("elu", "celu", "selu"):
        if name == "selu":
            lam, alpha = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
            neg, pos = _exp_piece(-_INF, 0.0, lam * alpha, 1.0, 1), _Piece(0.0, _INF, "linear", _lin(lam, 0.0),
                                                                           _const(lam, False))
        else:
            alpha = _real(params, "alpha")
            if name == "celu" and not alpha > 0:
                raise UnsupportedOpError(f"celu(alpha={alpha!r}): alpha must be > 0")
            inner = 1.0 / alpha if name == "celu" else 1.0
            neg = _exp_piece(-_INF, 0.0, alpha, inner, 1 if alpha > 0 else -1)
            pos = _Piece(0.0, _INF, "linear", z, _one)
        return Relaxation(name, [neg, pos])
    if name in ("hardtanh", "relu6"):
        lo, hi = (0.0, 6.0) if name == "relu6" else (_real(params, "min_val"), _real(params, "max_val"))
        if lo > hi:
            raise UnsupportedOpError(f"hardtanh(min_val={lo!r}, max_val={hi!r})")
        return Relaxation(name, [_Piece(-_INF, lo, "linear", _const(lo), _const(0.0)),
                                 _Piece(lo, hi, "linear", z, _one),
                                 _Piece(hi, _INF, "linear", _const(hi), _const(0.0))])
    if name == "hardsigmoid":
        return Relaxation(name, [_Piece(-_INF, -3.0, "linear", _const(0.0), _const(0.0)),
                                 _Piece(-3.0, 3.0, "linear", _lin(1.0 / 6.0, 0.5), _const(1.0 / 6.0, False)),
                                 _Piece(3.0, _INF, "linear", _const(1.0), _const(0.0))])
    if name == "hardswish":
        def f(x):
            v = x * (x + 3.0) / 6.0
            return v, x.abs() * (x.abs() + 3.0) / 6.0

        def df(x):
            return (2.0 * x + 3.0) / 6.0, (2.0 * x.abs() + 3.0) / 6.0

        return Relaxation(name, [_Piece(-_INF, -3.0, "linear", _const(0.0), _const(0.0)),
                                 _Piece(-3.0, 3.0, "convex", f, df, lambda a: 3.0 * a - 1.5),
                                 _Piece(3.0, _INF, "linear", z, _one)])
    raise UnsupportedOpError(f"{name}: no sound linear relaxation implemented")
