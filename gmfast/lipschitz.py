"""Sound upper bounds on the ℓ2→ℓ2 Lipschitz constant of a torch module (DESIGN 1.6).

:func:`lipschitz_bound` traces the module with ``torch.fx`` and runs a dynamic program over
the graph in topological order. Every node carries ``L(node)``, an upper bound on the
Lipschitz constant of the map *input → value of that node* (the input has 1; parameters,
buffers and other constants have 0). Rules:

* an op of one input-dependent tensor with constant parameters: ``L = factor · L(input)``,
  sound because composition is submultiplicative, ``Lip(f∘g) ≤ Lip(f)·Lip(g)``;
* ``a ± b`` of two input-dependent tensors (residual connections): ``L(a) + L(b)``, by the
  triangle inequality; adding a constant changes no difference, so ``L`` is unchanged;
* ``cat``/``stack`` (any dim) and several outputs: ``√(Σ L_i²)``, because
  ``‖(Δa, Δb)‖² = ‖Δa‖² + ‖Δb‖² ≤ (L_a² + L_b²)‖Δx‖²``;
* broadcasting an input-dependent tensor to ``r`` times its size repeats each entry ``r``
  times: a further factor ``√r``.

Per-op factors (each an upper bound that includes its own float64 rounding):

* Linear, ``F.linear``, ``x @ W`` with a constant matrix: the spectral norm ``‖W‖₂`` (SVD).
* Conv1d/2d/3d, any stride, dilation, groups: zero padding is a restriction of a circular
  convolution on a periodic grid (:func:`_conv_grid`), whose norm is the maximum over the
  grid's frequencies of the spectral norm of the kernel's ``c_out × c_in`` DFT matrix
  (Sedghi, Gupta & Long, ICLR 2019); stride subsamples (norm ≤ 1); groups are blocks.
  Circular padding is that circular convolution itself; reflect/replicate padding copies
  each entry at most ``m`` times (factor ``√m``, counted exactly). ``conv_method="gram"``
  replaces the per-frequency SVDs by Gram iteration (Delattre, Barthélemy, Araujo &
  Allauzen, ICML 2023); ``"dense"`` takes the SVD of the dense operator (exact, small inputs).
* BatchNorm in eval: ``max |γ/√(running_var + ε)|``.
* Activations: ReLU, ReLU6, Tanh, Hardtanh, Softplus, Softsign, Softshrink, Tanhshrink,
  LogSigmoid, CELU: 1; LeakyReLU: ``max(1, |slope|)``; ELU: ``max(1, |α|)``; PReLU:
  ``max(1, max|a|)``; Sigmoid: ¼; Hardsigmoid: ⅙; GELU: 1.13; SiLU: 1.1; Mish: 1.09;
  Hardswish: 1.5; SELU: ``λ·α`` (1.7581). Each is ``sup |σ'|``; derivations beside the table.
* Max pooling: ``√m`` with ``m`` the largest number of windows holding one element.
  Average/adaptive-average pooling and nearest/linear interpolation are linear maps with
  nonnegative weights: the Schur test ``‖P‖₂ ≤ √(‖P‖₁‖P‖∞)``, with the row and column sums
  evaluated from the op itself. ``mean``/``sum`` over non-batch dims: ``1/√n``/``√n``.
* Shape and data-movement ops: view/reshape/flatten/permute/transpose/squeeze/contiguous
  and casts to floating types: 1; slicing, indexing, padding, expand/repeat, split: ``√m``
  with ``m`` the largest number of copies of one entry, counted by running the op on an
  index tensor (so a plain slice is 1 and ``x[:, [0, 0]]`` is √2).
* Multiplication/division by a python number or a constant tensor ``c``: ``max|c|`` or
  ``max 1/|c|``. So input normalisation inside the encoder, ``(x − mean)/std`` with
  constant tensors, has the factor ``max 1/|std|``: **radii are in the scale of the
  encoder's own input** (normalisation done before calling the encoder is not included).
* A submodule with a float attribute ``lipschitz_constant`` is a leaf with that factor (the
  caller vouches for it): the way to wrap a part that has no rule.

Anything else (softmax, layer/group norm, attention, products of two input-dependent
tensors, transposed convolutions, bicubic interpolation, ops on integer or boolean tensors
...) raises :class:`UnsupportedOpError` naming the node and the op: a bound is never guessed.

What the bound does not cover: it is the constant of the exact-arithmetic function
``x ↦ module(x[None])[0]`` with the parameters as stored; the module's own floating-point
error is not bounded, and samples must be processed independently (batch statistics,
reductions over the batch dimension and in-train-mode modules are rejected). In-place ops
are followed only where no other node can observe the change.
"""

from __future__ import annotations

import builtins
import math
import operator
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.utils import parametrize

__all__ = ["LipschitzBound", "UnsupportedOpError", "clear_cache", "lipschitz_bound"]

#: Unit roundoff of float64: every computed factor is inflated by multiples of it.
_U = 2.0**-53
_CONV_METHODS = ("fft", "gram", "dense")
#: Largest dense convolution operator (inputs × (inputs + outputs) entries) for "dense".
_DENSE_LIMIT = 2**23
#: Bytes of per-frequency matrices held at once by the FFT/Gram convolution bound.
_CHUNK_BYTES = 2**26


class UnsupportedOpError(ValueError):
    """A graph node has no sound Lipschitz rule."""


@dataclass(frozen=True)
class LipschitzBound:
    """Result of :func:`lipschitz_bound`.

    Attributes
    ----------
    bound : float
        Sound upper bound on ``sup ‖f(x) − f(y)‖₂ / ‖x − y‖₂``.
    estimate : float or None
        Lower bound: the largest ``‖J(x) v‖₂`` (``‖v‖₂ = 1``) found by power iteration on
        ``JᵀJ`` at a few points, evaluated in float64. The true constant lies in
        ``[estimate, bound]`` (up to rounding where forward derives weights in the module's
        own precision, e.g. ``spectral_norm``: ~1e-7 relative for float32).
    layers : list of (str, str, float)
        ``(node name, op description, factor)`` for every node that is not a pure reshape.
        For an op of one input the factor multiplies ``L``; for ``add``/``cat`` it is
        ``L(node) / max L(inputs)``.
    """

    bound: float
    estimate: float | None = None
    layers: list = field(default_factory=list, compare=False)

    @property
    def gap(self) -> float | None:
        """``bound / estimate`` (≥ 1 up to that rounding): how loose the bound can at most be;
        None without an estimate or when the estimate is 0."""
        if not self.estimate:
            return None
        return self.bound / self.estimate

    def __float__(self) -> float:
        return float(self.bound)

    def report(self) -> str:
        """The per-node factors as a table, then the bound, the estimate and the gap."""
        width = max([len(n) for n, _, _ in self.layers] + [4])
        lines = [f"{n:<{width}}  {f:>12.6g}  {d}" for n, d, f in self.layers]
        est = "n/a" if self.estimate is None else f"{self.estimate:.6g}"
        gap = "n/a" if self.gap is None else f"{self.gap:.4g}"
        lines.append(f"bound {self.bound:.6g}, estimate {est}, gap {gap}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- rounding


def _up(x: float, n_ops: int = 1) -> float:
    """``x`` computed by ``n_ops`` correctly rounded float64 operations from exact data,
    raised to an upper bound on the exact result: each rounding is a factor in
    ``[1 − u, 1 + u]``, so ``x (1 + 2.02 n u)`` covers them and ``nextafter`` the final
    multiplication's own rounding."""
    if x == 0.0 or math.isinf(x):
        return x
    return math.nextafter(x * (1.0 + 2.02 * n_ops * _U), math.inf)


def _svd_up(s: float, m: int, n: int) -> float:
    """Upper bound on ``‖W‖₂`` from the largest computed singular value ``s`` of an ``m × n``
    float64 matrix. LAPACK's SVD is backward stable: ``s`` is exactly a singular value of
    ``W + E`` with ``‖E‖₂ ≤ ρ‖W‖₂``; worst-case analyses of Householder bidiagonalisation
    (Higham, *Accuracy and Stability*, 2nd ed., Thm 19.4, then Frobenius to spectral) give
    ``ρ = c·m·n·√min(m, n)·u`` for a small constant ``c``; we take ``c = 16`` (it costs < 1e-8
    relative up to 512 × 512; observed errors are far smaller). Weyl's inequality then gives
    ``‖W‖₂ ≤ s + ρ‖W‖₂``, i.e. ``‖W‖₂ ≤ s / (1 − ρ)``."""
    rho = 16.0 * m * n * math.sqrt(min(m, n)) * _U
    if rho >= 0.5:
        raise ValueError(f"matrix of {m} x {n} is too large for a certified float64 SVD bound")
    return _up(s / (1.0 - rho), 2)


def _spectral_norm_up(W: torch.Tensor) -> float:
    """Upper bound on ``max_b ‖W_b‖₂`` over a batch of matrices ``W`` (..., m, n), real or
    complex, computed with float64 SVDs on the CPU (LAPACK: GPU solvers may be iterative
    with a tolerance)."""
    W = W.detach().cpu()
    W = W.to(torch.complex128 if W.is_complex() else torch.float64)
    if W.numel() == 0:
        return 0.0
    s = torch.linalg.svdvals(W).amax().item()
    return _svd_up(s, W.shape[-2], W.shape[-1])


def _ntuple(v, n: int) -> tuple:
    if isinstance(v, (tuple, list)):
        return tuple(v) * n if len(v) == 1 else tuple(v)
    return (v,) * n


# ----------------------------------------------------------------------------- convolutions


def _conv_grid(n: int, pad: tuple, k_eff: int) -> int:
    """Length ``N`` of a periodic grid on which the zero-padded, stride-1 convolution of a
    length-``n`` signal (padding ``pad = (left, right)``, effective kernel ``k_eff``) is a
    restriction of a circular one.

    Embed ``x`` as ``x̃`` = (x, 0, ..., 0) on ``Z_N``. Output ``o`` reads input indices
    ``i = o + j·d − left ∈ [−left, n + right − 1]``. Indices in ``[0, n)`` map to themselves;
    negative ones wrap to ``N + i ≥ N − left``, which is in the zero part when
    ``N ≥ n + left``; indices ``≥ n`` stay below ``N`` (zero part) when ``N ≥ n + right``.
    The ``n + left + right − k_eff + 1`` outputs are distinct grid points when ``N`` is at
    least their number. So ``conv = R ∘ C ∘ E`` with ``E`` an isometry, ``C`` circular and
    ``R`` a coordinate restriction: ``‖conv‖₂ ≤ ‖C‖₂``. (With ``left, right ≤ k_eff − 1``
    this is at most the familiar ``n + k_eff − 1``; the smallest valid ``N`` is usually the
    tightest.)
    """
    left, right = pad
    return max(n + left, n + right, n + left + right - k_eff + 1, 1)


def _twiddles(N: int, k: int, dil: int, half: bool) -> torch.Tensor:
    """``T[j, ω] = exp(−2πi·(ω·j·dil mod N)/N)`` (k, N or N//2 + 1), complex128. The phase is
    reduced exactly in integers first, so each entry is within ``τ = 64u`` of the exact one
    (angle rounding ≤ 20u, sin/cos ≤ 2 ulp)."""
    omegas = torch.arange(N // 2 + 1 if half else N, dtype=torch.int64)
    taps = torch.arange(k, dtype=torch.int64) * dil
    r = (taps[:, None] * omegas[None, :]) % N
    theta = (2.0 * math.pi / N) * r.to(torch.float64)
    return torch.complex(torch.cos(theta), -torch.sin(theta))


def _gram_norm_up(M: torch.Tensor, n_iter: int = 12) -> torch.Tensor:
    """Upper bounds on ``‖M_b‖₂`` for a batch ``M`` (B, m, n) of complex128 matrices, by Gram
    iteration (Delattre et al., ICML 2023): ``‖A‖₂² = ‖AᴴA‖₂`` and, at the end,
    ``‖A_T‖₂ ≤ ‖A_T‖_F``, so ``‖M‖₂ ≤ ‖A_T‖_F^{1/2^T}`` up to the rescaling kept below.

    Rounding is accounted for level by level (the bound holds for ``M`` as given). With ``f``
    the computed Frobenius norm of ``A`` (true one ≤ ``f(1 + δ)``), ``H = fl(A/f)`` and
    ``A' = fl(HᴴH)``: ``‖A − fH‖₂ ≤ u f(1 + δ)``, and ``‖HᴴH − A'‖₂ ≤ κ‖H‖_F²`` with ``κ`` the
    complex inner-product constant (Higham §3.6), so
    ``‖A‖₂ ≤ f(√(‖A'‖₂ + κ(1 + u)²(1 + δ)²) + u(1 + δ))``, applied from the last level up.
    """
    if M.shape[-2] < M.shape[-1]:
        M = M.mH
    A = M
    levels = []
    for t in range(n_iter + 1):
        rows, cols = A.shape[-2:]
        scale = A.abs().amax(dim=(-2, -1))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        f = scale * torch.linalg.matrix_norm(A / safe[:, None, None])  # no under/overflow
        delta = 2.0 * (rows * cols + 8) * _U
        kappa = 2.0 * (rows + 4) * _U * 1.01
        levels.append((f, delta, kappa))
        if t < n_iter:
            H = A / torch.where(f > 0, f, torch.ones_like(f))[:, None, None]
            A = H.mH @ H
    f, delta, _ = levels[-1]
    b = f * (1.0 + delta)
    for f, delta, kappa in reversed(levels[:-1]):
        b = f * (torch.sqrt(b + kappa * (1.0 + _U) ** 2 * (1.0 + delta) ** 2) + _U * (1.0 + delta))
        b = b * (1.0 + 16 * _U)  # this level's own float64 evaluation
    return b


def _conv_periodic_bound(W: torch.Tensor, grid: tuple, dilation: tuple, groups: int, method: str) -> float:
    """Upper bound on the norm of the circular convolution of kernel ``W`` (c_out, c_in/g,
    *k) on the periodic grid ``grid``: ``max over ω, groups of ‖K̂_g(ω)‖₂`` (Sedghi et al.
    2019: a block-circulant operator is block-diagonalised by the DFT), plus the DFT's
    rounding.

    ``K̂(ω) = Σ_j W_j exp(−2πi Σ_d ω_d j_d dil_d / N_d)`` is evaluated directly as one small
    contraction per spatial axis (the kernel has few taps), not by an FFT, so its error has
    a simple bound: per axis, a length-``k_d`` inner product with twiddles within ``τ`` of
    exact: ``|error| ≤ ((1 + τ + κ_k)^D − 1)(1 + u)·Σ_taps |w|`` per entry, with
    ``κ_k = 2(k + 4)u`` for a complex inner product (Higham §3.6), hence in Frobenius norm
    per group ``≤ ε_g``; Weyl: ``‖K(ω)‖₂ ≤ ‖K̂(ω)‖₂ + ε_g``. Only half the frequencies are
    needed: for a real kernel ``K(−ω) = conj K(ω)`` has the same singular values.
    """
    W = W.detach().cpu().to(torch.float64)
    c_out, c_in_g = W.shape[:2]
    k = tuple(W.shape[2:])
    nd = len(k)
    per = c_out // groups
    Wg = W.reshape((groups, per, c_in_g) + k)
    x = max(64.0 * _U + 2.0 * (kd + 4) * _U for kd in k)
    coef = nd * x * (1.0 + nd * x) * (1.0 + _U) * 1.01  # ≥ (1 + x)^D − 1, without cancellation
    taps_abs = Wg.abs().sum(dim=tuple(range(3, 3 + nd)))  # (g, per, c_in_g)
    eps = coef * torch.linalg.vector_norm(taps_abs, dim=(1, 2)).amax().item()
    T = [_twiddles(grid[d], k[d], dilation[d], half=(d == nd - 1)) for d in range(nd)]
    # first axis for all frequencies, then the rest in chunks of first-axis frequencies
    Z = torch.tensordot(Wg.to(torch.complex128), T[0], dims=([3], [0])).movedim(-1, 0)  # (N1, g, per, c_in_g, k2..)
    rest = math.prod(t.shape[1] for t in T[1:])
    rows = max(1, _CHUNK_BYTES // max(1, 16 * groups * per * c_in_g * rest))
    best = 0.0
    for chunk in Z.split(rows):
        Y = chunk
        for d in range(1, nd):
            Y = torch.tensordot(Y, T[d], dims=([4], [0]))  # consumes k_d, appends N_d
        Y = Y.movedim((2, 3), (-2, -1)).reshape(-1, per, c_in_g)
        if method == "gram":
            s = _gram_norm_up(Y).amax().item()
        else:
            s = _svd_up(torch.linalg.svdvals(Y).amax().item(), per, c_in_g)
        best = max(best, s)
    return _up(best + eps)


def _pad_multiplicity(n: int, pad: tuple, mode: str) -> int:
    """Largest number of copies of one entry that ``F.pad(mode)`` makes along one axis,
    counted by padding an index signal (so it is PyTorch's own semantics)."""
    probe = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, 1, n)
    out = F.pad(probe, tuple(pad), mode=mode)
    return int(torch.bincount(out.reshape(-1).long(), minlength=n + 1)[1:].max())


def _conv_bound(W, spatial, pads, mode, stride, dilation, groups, method, apply):
    """Bound on the (linear part of the) convolution of kernel ``W`` on inputs of spatial size
    ``spatial``, with per-axis padding ``pads`` ((left, right), ...) of ``mode``.

    ``apply(x)`` runs the convolution without bias on a float64 CPU batch (for "dense").
    Returns ``(factor, description)``.
    """
    nd = W.dim() - 2
    k = tuple(W.shape[2:])
    k_eff = tuple(dilation[d] * (k[d] - 1) + 1 for d in range(nd))
    c_in = W.shape[1] * groups
    n_in = c_in * math.prod(spatial)
    if method == "dense" and n_in * (n_in + W.shape[0] * math.prod(spatial)) <= _DENSE_LIMIT:
        eye = torch.eye(n_in, dtype=torch.float64).reshape((n_in, c_in) + tuple(spatial))
        A = apply(eye).reshape(n_in, -1)
        # an entry can add several taps (circular/reflect padding of tiny inputs): γ_k Σ|w|
        err = 2.0 * (math.prod(k) + 2) * _U * W.detach().double().abs().sum().item()
        return _up(_spectral_norm_up(A) + err), "dense SVD"
    if method == "dense":
        method = "fft"
    if mode == "zeros":
        grid = tuple(_conv_grid(spatial[d], pads[d], k_eff[d]) for d in range(nd))
        factor = _conv_periodic_bound(W, grid, dilation, groups, method)
    elif mode == "circular":
        # exactly the circular convolution on Z_n; outputs beyond n repeat earlier ones
        grid = tuple(spatial)
        reps = math.prod(math.ceil((spatial[d] + sum(pads[d]) - k_eff[d] + 1) / spatial[d]) for d in range(nd))
        factor = _up(math.sqrt(reps) * _conv_periodic_bound(W, grid, dilation, groups, method), 2)
    elif mode in ("reflect", "replicate"):
        # pad (a copy map: ‖P‖₂ = √(largest multiplicity)), then an unpadded convolution
        mult = math.prod(_pad_multiplicity(spatial[d], pads[d], mode) for d in range(nd))
        grid = tuple(spatial[d] + sum(pads[d]) for d in range(nd))
        factor = _up(math.sqrt(mult) * _conv_periodic_bound(W, grid, dilation, groups, method), 2)
    else:
        raise UnsupportedOpError(f"padding_mode={mode!r}")
    return factor, f"{method}, grid {grid}"


# ----------------------------------------------------------------------------- pooling


def _maxpool_factor(kernel, stride, dilation, nd: int) -> float:
    """``|max a − max b| ≤ max |a − b| ≤ ‖(a − b)|window‖₂``; summing squares over all
    windows counts an element once per window holding it, so the factor is ``√m``. Per axis,
    the windows holding index ``p`` are those ``t`` with ``p + pad − j·d = t·s`` for some tap
    ``j < k``: at most one per ``j``, and only taps with ``j·d ≡ p + pad (mod s)``, i.e. one
    residue class mod ``s/gcd(d, s)``: ``m ≤ ⌈k·gcd(d, s)/s⌉`` (``⌈k/s⌉`` without dilation).
    Padding (with −∞) and ceil_mode add windows of the same lattice."""
    k = _ntuple(kernel, nd)
    s = _ntuple(stride if stride not in (None, (), []) else kernel, nd)
    d = _ntuple(dilation, nd)
    m = math.prod(math.ceil(k[i] * math.gcd(d[i], s[i]) / s[i]) for i in range(nd))
    return _up(math.sqrt(m))


def _schur_factor(apply, shape) -> float:
    """``‖P‖₂ ≤ √(‖P‖₁‖P‖∞)`` (Schur test) for a linear op ``P`` whose rows and columns are
    each of one sign (pooling, averaging, linear interpolation). The row sums are ``P·1`` and
    the column sums ``Pᵀ·1``, evaluated by running the op (and its backward) on ones of
    ``shape``, in float64; each is a sum of at most ``n`` rounded terms."""
    x = torch.ones(shape, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = apply(x)
        (cols,) = torch.autograd.grad(y.sum(), x)
    rows = y.detach().abs().amax().item()
    n = x.numel() + y.numel()
    return _up(math.sqrt(_up(rows, n + 2) * _up(cols.abs().amax().item(), n + 2)), 2)


def _copy_factor(apply, shape) -> float:
    """``√(largest number of copies of one entry)`` for an op that only moves, copies or
    drops entries (and may add constants): run it on the index tensor ``1..n`` of ``shape``
    and count. Such an op maps ``Δx`` to a vector whose squared norm is
    ``Σ_i copies(i)·Δx_i²``."""
    n = math.prod(shape)
    probe = torch.arange(1, n + 1, dtype=torch.float64).reshape(shape)
    out = apply(probe)
    parts = out if isinstance(out, (tuple, list)) else (out,)
    vals = torch.cat([p.reshape(-1) for p in parts]) if parts else probe.new_zeros(0)
    if vals.numel() == 0:
        return 0.0
    if not bool(((vals == vals.round()) & (vals >= 0) & (vals <= n)).all()):
        raise UnsupportedOpError("the op does not only move entries")
    return math.sqrt(int(torch.bincount(vals.long(), minlength=n + 1)[1:].max()))


# ----------------------------------------------------------------------------- activations

# sup |σ'| of each activation, rounded up:
# * GELU x·Φ(x): (xΦ)' = Φ + xφ, (xΦ)'' = φ(2 − x²), so the max is at x = √2:
#   Φ(√2) + √2·φ(√2) = 0.92135 + 0.20755 = 1.12890 (min −0.1700 at −√2) → 1.13; the tanh
#   approximation peaks at 1.1289 too (checked numerically in the tests).
# * SiLU x·σ(x): σ(1 + x(1 − σ)), max at the root of 2 + x − x·tanh(x/2)... x ≈ 2.3994,
#   value 1.0998 (min −0.0998) → 1.1.
# * Mish x·tanh(softplus x): max 1.0886 at x ≈ 1.19 (min −0.2196) → 1.09.
# * Sigmoid σ(1 − σ) ≤ ¼; Hardsigmoid slope ⅙; Hardswish (2x + 3)/6 ∈ (−½, 3/2) on (−3, 3).
# * SELU: λ for x > 0, λα·eˣ < λα for x < 0: λα = 1.0507009873554805 · 1.6732632423543772.
# * Softplus σ(βx) ≤ 1; LogSigmoid σ(−x) ≤ 1; Tanhshrink tanh²x < 1; Softsign 1/(1+|x|)²;
#   Softshrink/Hardtanh/ReLU6/CELU (α > 0: e^{x/α} ≤ 1 for x < 0) ≤ 1.
_SELU = 1.7581
_ACTIVATIONS = {
    "relu": 1.0, "relu6": 1.0, "tanh": 1.0, "softsign": 1.0, "tanhshrink": 1.0, "logsigmoid": 1.0,
    "softshrink": 1.0, "softplus": 1.0, "abs": 1.0, "neg": 1.0, "negative": 1.0, "pos": 1.0,
    "positive": 1.0, "sigmoid": 0.25, "hardsigmoid": 1.0 / 6.0, "gelu": 1.13, "silu": 1.1, "mish": 1.09,
    "hardswish": 1.5, "selu": _SELU,
}
_ACTIVATION_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Tanh: "tanh", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink",
    nn.LogSigmoid: "logsigmoid", nn.Softshrink: "softshrink", nn.Softplus: "softplus", nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "hardsigmoid", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Hardswish: "hardswish",
    nn.SELU: "selu",
}
#: Modules that compute the identity in eval mode (or only reshape).
_IDENTITY_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_CONSTANT_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_COPY_PADS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
              nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)
_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_LINEAR_INTERPOLATION = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")

# ----------------------------------------------------------------------------- graph ops

#: call_function targets, by the name of their rule (in-place forms end in "_").
_FUNCTION_NAMES = {
    operator.add: "add", operator.iadd: "add_", operator.sub: "sub", operator.isub: "sub_", operator.mul: "mul",
    operator.imul: "mul_", operator.truediv: "div", operator.itruediv: "div_", operator.neg: "neg",
    operator.pos: "pos", operator.getitem: "getitem", operator.matmul: "matmul", builtins.getattr: "getattr",
    torch.add: "add", torch.sub: "sub", torch.subtract: "sub", torch.mul: "mul", torch.multiply: "mul",
    torch.div: "div", torch.divide: "div", torch.true_divide: "div", torch.neg: "neg", torch.negative: "neg",
    torch.positive: "pos", torch.abs: "abs", torch.matmul: "matmul", torch.mm: "matmul",
    torch.relu: "relu", torch.relu_: "relu_", F.relu: "relu", F.relu_: "relu_", F.relu6: "relu6",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardtanh: "hardtanh",
    F.softsign: "softsign", F.tanhshrink: "tanhshrink", F.logsigmoid: "logsigmoid", F.softshrink: "softshrink",
    F.softplus: "softplus", F.hardsigmoid: "hardsigmoid", F.gelu: "gelu", F.silu: "silu", F.mish: "mish",
    F.hardswish: "hardswish", F.selu: "selu", torch.selu: "selu", F.leaky_relu: "leaky_relu", F.elu: "elu",
    F.celu: "celu", torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp", torch.clamp_max: "clamp",
    F.dropout: "dropout", F.dropout1d: "dropout", F.dropout2d: "dropout", F.dropout3d: "dropout",
    F.alpha_dropout: "dropout", F.feature_alpha_dropout: "dropout",
    F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.batch_norm: "batch_norm",
    F.pad: "pad", F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool", F.adaptive_avg_pool3d: "avg_pool",
    F.adaptive_max_pool1d: "adaptive_max_pool", F.adaptive_max_pool2d: "adaptive_max_pool",
    F.adaptive_max_pool3d: "adaptive_max_pool", F.interpolate: "interpolate",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat", torch.stack: "cat",
    torch.mean: "mean", torch.sum: "sum", torch.amax: "amax",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.permute: "reshape", torch.transpose: "reshape",
    torch.swapaxes: "reshape", torch.swapdims: "reshape", torch.movedim: "reshape", torch.moveaxis: "reshape",
    torch.squeeze: "reshape", torch.unsqueeze: "reshape", torch.t: "reshape", torch.clone: "reshape",
    torch.detach: "reshape", torch.flip: "reshape", torch.roll: "reshape", F.pixel_shuffle: "reshape",
    F.pixel_unshuffle: "reshape", torch.narrow: "copy", torch.select: "copy", torch.split: "copy",
    torch.chunk: "copy", torch.unbind: "copy", torch.tensor_split: "copy", torch.broadcast_to: "copy",
    torch.tile: "copy",
}
#: Tensor methods that only reshape/permute (factor 1); the value is a bijection of entries.
_RESHAPE_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
                    "swapaxes", "swapdims", "movedim", "moveaxis", "t", "squeeze", "unsqueeze", "contiguous",
                    "clone", "detach", "flip", "roll", "to", "float", "double", "half", "bfloat16", "type",
                    "type_as", "cpu", "cuda"}
#: Tensor methods that copy or drop entries: factor √(largest multiplicity), counted.
_COPY_METHODS = {"narrow", "select", "split", "chunk", "unbind", "tensor_split", "expand", "expand_as", "repeat",
                 "tile", "broadcast_to"}
_ARITH_METHODS = {"add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "matmul", "mm",
                  "mean", "sum", "amax", "clamp", "clip", "clamp_min", "clamp_max", "abs", "neg", "negative",
                  "relu", "sigmoid", "tanh"}
#: Results that depend on the input's shape/dtype/device only, not on its values.
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
                 "is_contiguous", "is_complex", "element_size", "stride", "new_zeros", "new_ones", "new_full"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
#: Results that may share memory with their first argument.
_ALIASING = _RESHAPE_METHODS | _COPY_METHODS | {"getitem", "reshape", "copy", "getattr", "dropout"}


def _is_meta(node) -> bool:
    if node.op == "call_method":
        return node.target in _META_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return node.args[1] in _META_ATTRS
        return node.target in (builtins.len, torch.numel, torch.is_floating_point, torch.zeros_like,
                               torch.ones_like, torch.full_like)
    return False


def _shape(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node, i: int, key: str, default=None):
    if key in node.kwargs:
        return node.kwargs[key]
    return node.args[i] if len(node.args) > i else default


class _Tracer(torch.fx.Tracer):
    """Also treats a module with a ``lipschitz_constant`` attribute as a leaf."""

    def is_leaf_module(self, m, qualname):
        return hasattr(m, "lipschitz_constant") or super().is_leaf_module(m, qualname)


class _Root(nn.Module):
    """Wrapper so that the traced module itself is a ``call_module`` node (a bare Linear,
    Conv or BatchNorm then gets its module rule)."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


class _Recorder(ShapeProp):
    """ShapeProp that also keeps the values of the given nodes (constants, shape queries)."""

    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep = keep
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            self.values[n] = out
        return out


class _GraphBound:
    """The dynamic program over one traced graph (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, conv_method: str):
        self.gm = gm
        self.conv_method = conv_method
        self.kind = {}  # node -> "dep" (depends on the input's values), "const" or "meta"
        self.L = {}
        self.values = {}
        self.layers = []
        self.node = None

    # -- helpers ---------------------------------------------------------------------

    def classify(self):
        """Which nodes depend on the input's values (from the graph's structure alone)."""
        first = True
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if first:
                    self.kind[node], first = "dep", False
                elif node.args:  # an argument with a default value
                    self.kind[node] = "const"
                else:
                    raise ValueError(f"forward takes a second required input {node.name!r}; only one is supported")
            elif node.op == "get_attr":
                self.kind[node] = "const"
            elif node.op != "output":
                kinds = {self.kind[a] for a in node.all_input_nodes}
                if "dep" in kinds:
                    self.kind[node] = "meta" if _is_meta(node) else "dep"
                else:
                    self.kind[node] = "meta" if "meta" in kinds else "const"
        return {n for n, k in self.kind.items() if k != "dep"}

    def fail(self, what: str, why: str = ""):
        name = self.display_name(self.node)
        detail = f": {why}" if why else ""
        raise UnsupportedOpError(f"node {name!r} ({what}{detail}): no Lipschitz rule; pass lipschitz=<float> "
                                 "explicitly or wrap it in a module with a float attribute lipschitz_constant")

    def display_name(self, node) -> str:
        if node.op == "call_module":
            return node.target[2:] if node.target != "m" else type(self.gm.m).__name__
        return node.name

    def lip(self, a) -> float:
        """L of a node (0 for constants), or √(Σ L²) of a nested collection."""
        if isinstance(a, torch.fx.Node):
            return self.L.get(a, 0.0) if self.kind.get(a) == "dep" else 0.0
        if isinstance(a, (tuple, list)):
            return math.sqrt(sum(self.lip(x) ** 2 for x in a))
        if isinstance(a, dict):
            return self.lip(list(a.values()))
        return 0.0

    def is_dep(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and self.kind.get(a) == "dep"

    def const_value(self, a, what: str):
        """A python number or the value of a constant node, as a float64 tensor."""
        if isinstance(a, bool) or a is None:
            self.fail(what, f"unsupported operand {a!r}")
        if isinstance(a, (int, float)):
            return torch.tensor(float(a), dtype=torch.float64)
        if isinstance(a, torch.fx.Node) and self.kind.get(a) == "const":
            v = self.values.get(a)
            if isinstance(v, torch.Tensor) and not (v.is_complex() or v.dtype == torch.bool):
                return v.detach().cpu().to(torch.float64)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return torch.tensor(float(v), dtype=torch.float64)
        if isinstance(a, torch.fx.Node) and self.kind.get(a) == "meta":
            self.fail(what, "the operand depends on the input's shape")
        if self.is_dep(a):
            self.fail(what, "the operand depends on the input")
        self.fail(what, f"unsupported operand {a!r}")

    def resolve(self, args, x_node, x_value):
        """``args`` with ``x_node`` replaced by ``x_value`` and every other node by its recorded
        value (constants and shape queries); another input-dependent node is an error."""

        def value(n):
            if n is x_node:
                return x_value
            if self.kind.get(n) in ("const", "meta"):
                v = self.values[n]
                return v.detach().cpu() if isinstance(v, torch.Tensor) else v  # the probes run on the CPU
            self.fail(self.op_name(), "a second input-dependent operand")

        return map_arg(args, value)

    def op_name(self) -> str:
        t = self.node.target
        return t if isinstance(t, str) else getattr(t, "__name__", repr(t))

    def broadcast_ratio(self, a) -> float:
        """√(output size / size of ``a``): broadcasting repeats each entry that many times."""
        out, inp = _shape(self.node), _shape(a)
        if out is None or inp is None:
            self.fail(self.op_name(), "shapes unknown")
        r = math.prod(out) / max(1, math.prod(inp))
        return math.sqrt(max(r, 1.0))

    def note(self, desc: str, factor: float):
        self.layers.append((self.display_name(self.node), desc, float(factor)))

    def unary(self, factor: float, desc: str, note: bool = True) -> float:
        """L of the node from the op's factor and its single input-dependent input."""
        x = self.node.args[0] if self.node.args else None
        deps = [a for a in self.node.all_input_nodes if self.kind[a] == "dep"]
        if not self.is_dep(x) or len(deps) != 1:
            self.fail(desc, "the input-dependent tensor must be the first and only such operand")
        if note:
            self.note(desc, factor)
        return _up(factor * self.L[x])

    # -- the pass --------------------------------------------------------------------

    def run(self) -> float:
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op == "output":
                return _up(self.lip(node.args[0]), 2 * len(node.all_input_nodes) + 2)
            if self.kind[node] != "dep":
                continue
            if node.op == "placeholder":
                self.L[node] = 1.0
                continue
            meta = node.meta.get("tensor_meta")
            if hasattr(meta, "dtype") and not meta.dtype.is_floating_point:
                self.fail(self.op_name(), f"its result is {meta.dtype}, not a real-valued function")
            if node.op == "call_module":
                L = self.module_rule(node)
                inplace = bool(getattr(self.gm.get_submodule(node.target), "inplace", False))
            else:
                name, inplace = self.rule_name(node)
                L = getattr(self, "rule_" + name)(node)
            if inplace:
                self.check_inplace(node, L)
            self.L[node] = L
        raise UnsupportedOpError("the traced graph has no output")

    def rule_name(self, node):
        if node.op == "call_method":
            name = node.target
            inplace = name.endswith("_") and not name.startswith("_")
            base = name[:-1] if inplace else name
            if base in _RESHAPE_METHODS:
                base = "reshape"
            elif base in _COPY_METHODS:
                base = "copy"
            elif base not in _ARITH_METHODS:
                self.fail(f"method .{name}()")
        else:
            base = _FUNCTION_NAMES.get(node.target)
            if base is None:
                self.fail(f"function {self.op_name()}")
            inplace = base.endswith("_") or bool(node.kwargs.get("inplace", False))
            base = base.rstrip("_")
        base = {"subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div", "negative": "neg",
                "clip": "clamp", "clamp_min": "clamp", "clamp_max": "clamp", "mm": "matmul"}.get(base, base)
        if base in _ACTIVATIONS:
            base = "activation"
        return base, inplace

    def check_inplace(self, node, L):
        """An in-place op changes its first argument and every tensor that aliases it. If the
        new L does not exceed the old one, every such tensor keeps a valid bound; otherwise
        no other node may observe the change: each tensor on the alias chain back to the
        freshly computed one must have no user but the next one in the chain."""
        a = node.args[0]
        if L <= self.L[a]:
            return
        chain, nxt = a, node
        while True:
            if set(chain.users) != {nxt}:
                self.fail(f"in-place {self.op_name()}", f"{chain.name!r} is also used elsewhere")
            if not (self.may_alias(chain) and chain.args and isinstance(chain.args[0], torch.fx.Node)):
                return
            chain, nxt = chain.args[0], chain

    def may_alias(self, n) -> bool:
        """Whether the value of node ``n`` may share memory with its first argument."""
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            return isinstance(mod, _IDENTITY_MODULES) or bool(getattr(mod, "inplace", False))
        if n.op == "call_method":
            return n.target in _ALIASING or (n.target.endswith("_") and not n.target.startswith("_"))
        if n.op == "call_function":
            name = _FUNCTION_NAMES.get(n.target, "")
            return name in _ALIASING or name.endswith("_") or bool(n.kwargs.get("inplace", False))
        return False

    # -- modules ---------------------------------------------------------------------

    def module_rule(self, node) -> float:
        mod = self.gm.get_submodule(node.target)
        kind = type(mod).__name__
        if hasattr(mod, "lipschitz_constant"):
            c = float(mod.lipschitz_constant)
            if not (math.isfinite(c) and c >= 0):
                self.fail(kind, f"lipschitz_constant must be a finite number >= 0; got {c!r}")
            deps = [a for a in node.all_input_nodes if self.kind[a] == "dep"]
            self.note(f"{kind} (lipschitz_constant)", c)
            return _up(c * self.lip(deps), 2 * len(deps) + 2)
        x = node.args[0] if node.args else None
        shape = _shape(x)
        t = type(mod)
        if parametrize.is_parametrized(mod):
            # e.g. spectral_norm: a generated subclass whose parametrised tensors (read below
            # through the same attributes) are what forward uses; the rule is the base class's
            t = t.__bases__[0]
        if t in _ACTIVATION_MODULES:
            return self.unary(_ACTIVATIONS[_ACTIVATION_MODULES[t]], kind)
        if t is nn.LeakyReLU:
            return self.unary(max(1.0, abs(mod.negative_slope)), f"LeakyReLU({mod.negative_slope})")
        if t is nn.ELU:
            return self.unary(max(1.0, abs(mod.alpha)), f"ELU({mod.alpha})")
        if t is nn.CELU:
            if not mod.alpha > 0:
                self.fail(f"CELU({mod.alpha})", "alpha must be > 0")
            return self.unary(1.0, kind)
        if t is nn.Hardtanh:
            return self.unary(1.0, kind)
        if t is nn.PReLU:
            a = mod.weight.detach().double().abs().max().item()
            return self.unary(max(1.0, a), kind)
        if t in _IDENTITY_MODULES or isinstance(mod, _CONSTANT_PADS):
            return self.unary(1.0, kind, note=False)
        if t is nn.Linear:
            W = mod.weight
            return self.unary(_spectral_norm_up(W), f"Linear({W.shape[1]}->{W.shape[0]}) spectral norm")
        if t in _CONVS:
            return self.unary(*self.conv_module(mod, shape, _CONVS[t]))
        if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            if mod.running_var is None:
                self.fail(kind, "track_running_stats=False: in eval it normalises with batch statistics")
            return self.unary(self.bn_factor(mod.running_var, mod.weight, mod.eps), f"{kind} (eval)")
        if t in _MAX_POOLS:
            if mod.return_indices:
                self.fail(kind, "return_indices=True")
            f = _maxpool_factor(mod.kernel_size, mod.stride, mod.dilation, _MAX_POOLS[t])
            return self.unary(f, f"{kind}(k={mod.kernel_size}, s={mod.stride}, d={mod.dilation})")
        if isinstance(mod, _AVG_POOLS):
            return self.unary(_schur_factor(mod, shape), f"{kind} (Schur test)")
        if isinstance(mod, _ADAPTIVE_MAX_POOLS):
            return self.unary(self.adaptive_max_factor(mod.output_size, kind), kind)
        if isinstance(mod, nn.Upsample):
            if mod.mode not in _LINEAR_INTERPOLATION:
                self.fail(f"Upsample(mode={mod.mode!r})", "its weights can be negative")
            return self.unary(_schur_factor(mod, shape), f"Upsample({mod.mode}) (Schur test)")
        if isinstance(mod, _COPY_PADS):
            return self.unary(_copy_factor(mod, shape), kind)
        self.fail(f"module {kind}")

    def conv_module(self, mod, shape, nd):
        if shape is None:
            self.fail(type(mod).__name__, "input shape unknown")
        rp = mod._reversed_padding_repeated_twice  # the padding forward applies (per axis, last first)
        pads = tuple((rp[2 * (nd - 1 - d)], rp[2 * (nd - 1 - d) + 1]) for d in range(nd))
        W = mod.weight.detach().cpu().double()
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]

        def apply(x):
            return conv(F.pad(x, rp, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode), W, None,
                        mod.stride, 0, mod.dilation, mod.groups)

        f, how = self.conv_bound(W, shape[-nd:], pads, mod.padding_mode, mod.stride, mod.dilation, mod.groups, apply)
        desc = (f"{type(mod).__name__}({mod.in_channels}->{mod.out_channels}, k={mod.kernel_size}, s={mod.stride}, "
                f"p={mod.padding}, d={mod.dilation}, g={mod.groups}, {mod.padding_mode}) {how}")
        return f, desc

    def conv_bound(self, W, spatial, pads, mode, stride, dilation, groups, apply):
        nd = W.dim() - 2
        try:
            return _conv_bound(W, tuple(spatial), pads, mode, _ntuple(stride, nd), _ntuple(dilation, nd), groups,
                               self.conv_method, apply)
        except UnsupportedOpError as e:
            self.fail(self.op_name(), str(e))

    @staticmethod
    def bn_factor(var, weight, eps) -> float:
        # |γ|/√(var + ε): three roundings (add, sqrt, divide), one more for |γ|·
        scale = 1.0 / torch.sqrt(var.detach().cpu().double() + float(eps))
        if weight is not None:
            scale = scale * weight.detach().cpu().double().abs()
        return _up(scale.abs().max().item(), 4)

    def adaptive_max_factor(self, output_size, what):
        # only global max pooling: one window holding every element, |max a − max b| ≤ ‖a − b‖
        sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
        if any(s != 1 for s in sizes):
            self.fail(what, "only global (output size 1) adaptive max pooling is bounded")
        return 1.0

    # -- functions and methods ---------------------------------------------------------

    def rule_activation(self, node):
        name = (node.target if isinstance(node.target, str) else _FUNCTION_NAMES[node.target]).rstrip("_")
        return self.unary(_ACTIVATIONS[name], name, note=name not in ("neg", "negative", "pos", "positive"))

    def rule_leaky_relu(self, node):
        slope = _arg(node, 1, "negative_slope", 0.01)
        return self.unary(max(1.0, abs(float(slope))), f"leaky_relu({slope})")

    def rule_elu(self, node):
        alpha = _arg(node, 1, "alpha", 1.0)
        return self.unary(max(1.0, abs(float(alpha))), f"elu({alpha})")

    def rule_celu(self, node):
        alpha = float(_arg(node, 1, "alpha", 1.0))
        if not alpha > 0:
            self.fail(f"celu({alpha})", "alpha must be > 0")
        return self.unary(1.0, "celu")

    def rule_hardtanh(self, node):
        return self.unary(1.0, "hardtanh")

    def rule_clamp(self, node):
        # |clamp(a) − clamp(b)| ≤ |a − b| for fixed bounds; bound tensors may broadcast
        return self.unary(self.broadcast_ratio(node.args[0]), "clamp")

    def rule_dropout(self, node):
        training = _arg(node, 2, "training", True)
        if training is not False:
            self.fail(self.op_name(), "training=True: it is random even in eval")
        return self.unary(1.0, "dropout", note=False)

    def rule_reshape(self, node):
        # a bijection of the entries (or a cast between floating types); `view(dtype)`
        # reinterprets bits instead
        out, inp = _shape(node), _shape(node.args[0])
        if node.target == "view" and any(isinstance(a, torch.dtype) for a in node.args[1:]):
            self.fail("view(dtype)", "reinterprets bits")
        if out is not None and inp is not None and math.prod(out) != math.prod(inp):
            self.fail(self.op_name(), "changes the number of entries")
        return self.unary(1.0, self.op_name(), note=False)

    def rule_getattr(self, node):
        if node.args[1] not in ("T", "mT", "mH", "H"):
            self.fail(f"attribute .{node.args[1]}")
        return self.unary(1.0, f".{node.args[1]}", note=False)

    def rule_copy(self, node):
        x = node.args[0]
        if _shape(x) is None:
            self.fail(self.op_name(), "input shape unknown")
        args, kwargs = self.resolve((tuple(node.args[1:]), dict(node.kwargs)), x, None)
        if node.op == "call_method":
            def run(t):
                return getattr(t, node.target)(*args, **kwargs)
        else:
            def run(t):
                return node.target(t, *args, **kwargs)
        try:
            f = _copy_factor(run, _shape(x))
        except UnsupportedOpError as e:
            self.fail(self.op_name(), str(e))
        return self.unary(f, self.op_name(), note=f != 1.0)

    def rule_getitem(self, node):
        x = node.args[0]
        if self.is_dep(x) and not hasattr(x.meta.get("tensor_meta"), "shape"):
            # an element of a tuple (split, chunk, unbind): a projection of its parts
            return self.unary(1.0, "getitem", note=False)
        return self.rule_copy(node)

    def rule_pad(self, node):
        mode = _arg(node, 2, "mode", "constant")
        if mode == "constant":
            return self.unary(1.0, "pad", note=False)  # constant entries: differences unchanged
        x = node.args[0]
        pad = self.resolve(_arg(node, 1, "pad"), x, None)
        f = _copy_factor(lambda t: F.pad(t, pad, mode=mode), _shape(x))
        return self.unary(f, f"pad({mode})")

    def rule_add(self, node):
        return self.add_sub(node)

    def rule_sub(self, node):
        return self.add_sub(node)

    def add_sub(self, node):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        alpha = _arg(node, 2, "alpha", 1)
        if isinstance(alpha, torch.fx.Node):
            self.fail(self.op_name(), "alpha is not a python number")
        ra = self.broadcast_ratio(a) if self.is_dep(a) else 1.0
        rb = self.broadcast_ratio(b) if self.is_dep(b) else 1.0
        la, lb = ra * self.lip(a), abs(float(alpha)) * rb * self.lip(b)
        L = _up(la + lb, 5)
        if self.is_dep(a) and self.is_dep(b):
            self.note(f"{self.op_name()} ({la:.4g} + {lb:.4g})", L / max(self.lip(a), self.lip(b), 1e-300))
        elif max(ra, rb) > 1 or alpha != 1:
            self.note(f"{self.op_name()} (broadcast x{max(ra, rb) ** 2:g}, alpha {alpha})",
                      L / max(self.lip(a), self.lip(b), 1e-300))
        return L

    def rule_mul(self, node):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if self.is_dep(a) and self.is_dep(b):
            self.fail(self.op_name(), "product of two input-dependent tensors")
        x, c = (a, b) if self.is_dep(a) else (b, a)
        cmax = self.const_value(c, self.op_name()).abs().max().item()
        f = cmax * self.broadcast_ratio(x)
        self.note(f"{self.op_name()} by a constant (max |c| = {cmax:.4g})", f)
        return _up(f * self.L[x], 2)

    def rule_div(self, node):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if _arg(node, 2, "rounding_mode") is not None:
            self.fail(self.op_name(), "rounding division is discontinuous")
        if not self.is_dep(a) or self.is_dep(b):
            self.fail(self.op_name(), "division by an input-dependent tensor")
        c = self.const_value(b, self.op_name()).abs()
        if c.numel() == 0 or not bool((c > 0).all()):
            self.fail(self.op_name(), "division by a constant with a zero entry")
        inv = _up((1.0 / c).max().item())
        f = inv * self.broadcast_ratio(a)
        self.note(f"{self.op_name()} by a constant (max 1/|c| = {inv:.4g})", f)
        return _up(f * self.L[a], 2)

    def rule_matmul(self, node):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if self.is_dep(a) and self.is_dep(b):
            self.fail(self.op_name(), "product of two input-dependent tensors")
        x, c = (a, b) if self.is_dep(a) else (b, a)
        W = self.const_value(c, self.op_name())
        if W.dim() > 2 or len(_shape(x) or ()) < 2:
            self.fail(self.op_name(), "only a constant vector or matrix times a batched tensor is bounded")
        f = _spectral_norm_up(W.reshape(-1, 1) if W.dim() == 1 else W)
        self.note(f"matmul by a constant {tuple(W.shape)}", f)
        return _up(f * self.L[x])

    def rule_linear(self, node):
        W = self.const_value(_arg(node, 1, "weight"), "linear")
        if W.dim() != 2:
            self.fail("linear", "weight must be a matrix")
        return self.unary(_spectral_norm_up(W), f"linear({W.shape[1]}->{W.shape[0]}) spectral norm")

    def rule_conv(self, node):
        nd = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[node.target]
        W = self.const_value(_arg(node, 1, "weight"), "conv")
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
        dilation, groups = _ntuple(_arg(node, 5, "dilation", 1), nd), _arg(node, 6, "groups", 1)
        k = W.shape[2:]
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            tot = [dilation[d] * (k[d] - 1) for d in range(nd)]
            pads = tuple((t // 2, t - t // 2) for t in tot)
        else:
            pads = tuple((p, p) for p in _ntuple(padding, nd))
        rp = [p for lr in reversed(pads) for p in lr]
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]

        def apply(x):
            return conv(F.pad(x, rp), W, None, stride, 0, dilation, groups)

        f, how = self.conv_bound(W, _shape(node.args[0])[-nd:], pads, "zeros", stride, dilation, groups, apply)
        return self.unary(f, f"conv{nd}d({W.shape[1] * groups}->{W.shape[0]}) {how}")

    def rule_batch_norm(self, node):
        if _arg(node, 5, "training", False):
            self.fail("batch_norm", "training=True normalises with batch statistics")
        var = self.const_value(_arg(node, 2, "running_var"), "batch_norm running_var")
        w = _arg(node, 3, "weight")
        w = None if w is None else self.const_value(w, "batch_norm weight")
        return self.unary(self.bn_factor(var, w, _arg(node, 7, "eps", 1e-5)), "batch_norm (eval)")

    def rule_max_pool(self, node):
        if _arg(node, 6, "return_indices", False):
            self.fail(self.op_name(), "return_indices=True")
        nd = len(_shape(node.args[0])) - 2
        k = _arg(node, 1, "kernel_size")
        f = _maxpool_factor(k, _arg(node, 2, "stride"), _arg(node, 4, "dilation", 1), nd)
        return self.unary(f, f"{self.op_name()}(k={k})")

    def rule_avg_pool(self, node):
        x = node.args[0]
        args, kwargs = self.resolve((node.args[1:], dict(node.kwargs)), x, None)
        fn = node.target
        f = _schur_factor(lambda t: fn(t, *args, **kwargs), _shape(x))
        return self.unary(f, f"{self.op_name()} (Schur test)")

    def rule_adaptive_max_pool(self, node):
        if _arg(node, 2, "return_indices", False):
            self.fail(self.op_name(), "return_indices=True")
        return self.unary(self.adaptive_max_factor(_arg(node, 1, "output_size"), self.op_name()), self.op_name())

    def rule_interpolate(self, node):
        mode = _arg(node, 3, "mode", "nearest")
        if mode not in _LINEAR_INTERPOLATION:
            self.fail(f"interpolate(mode={mode!r})", "its weights can be negative")
        return self.rule_avg_pool(node)

    def reduced_dims(self, node, default_all: bool):
        shape = _shape(node.args[0])
        dims = _arg(node, 1, "dim", None)
        if dims is None or dims == () or dims == []:
            if not default_all:
                return None
            dims = range(len(shape))
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list, range)) else (dims,))}
        if 0 in dims:
            self.fail(self.op_name(), "a reduction over the batch dimension mixes samples")
        return math.prod(shape[d] for d in dims)

    def rule_mean(self, node):
        # (Σ x_i)/n over disjoint groups: Cauchy–Schwarz, ‖P‖₂ = 1/√n exactly
        n = self.reduced_dims(node, True)
        return self.unary(_up(1.0 / math.sqrt(n), 2), f"mean over {n}")

    def rule_sum(self, node):
        n = self.reduced_dims(node, True)
        return self.unary(_up(math.sqrt(n)), f"sum over {n}")

    def rule_amax(self, node):
        self.reduced_dims(node, True)
        return self.unary(1.0, "amax")  # one window per output: |max a − max b| ≤ ‖a − b‖

    def rule_cat(self, node):
        parts = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        deps = [p for p in parts if self.is_dep(p)]
        if _shape(node) is None or dim % len(_shape(node)) == 0:
            self.fail(self.op_name(), "concatenation along the batch dimension mixes samples")
        L = _up(self.lip(list(parts)), 2 * len(parts) + 2)
        if len(deps) > 1:
            self.note(f"{self.op_name()} of {len(deps)} (quadrature)", L / max(self.lip(p) for p in deps))
        return L


# ----------------------------------------------------------------------------- estimate


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


def _estimate(module, input_shape, device, n_iter, n_points, seed, points) -> float:
    if points is None:
        g = torch.Generator().manual_seed(seed)
        points = torch.randn((n_points,) + input_shape, generator=g, dtype=torch.float64)
    points = torch.as_tensor(points).detach().reshape((-1,) + input_shape).to(device)
    # forward hooks may store derived tensors on the module (hook-based spectral_norm sets
    # .weight): put them back so that the float64 pass leaves no trace
    saved = [(m, k, v) for m in module.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    try:
        # float64 so that the estimate of a linear map cannot exceed the (exact) bound
        return _power_iteration(module, points, torch.float64, n_iter, seed)
    except RuntimeError:  # a forward that hard-codes float32 tensors: use its own dtype
        return _power_iteration(module, points, _dtype_device(module)[0], n_iter, seed)
    finally:
        for m, k, v in saved:
            object.__setattr__(m, k, v)


# ----------------------------------------------------------------------------- cache, API

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget every cached :func:`lipschitz_bound` result."""
    _CACHE.clear()


def _state(module: nn.Module):
    """What the cache compares: every parameter and buffer (weak reference, version counter,
    storage pointer: replacement, in-place change or ``.data =`` all show) and the public
    scalar attributes of every submodule (stride, eps, slopes, training flags)."""
    tensors = list(module.parameters()) + list(module.buffers())
    refs = [weakref.ref(t) for t in tensors]
    versions = tuple((t._version, t.data_ptr()) for t in tensors)
    config = tuple((name, type(m), tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_")
                                                and isinstance(v, (bool, int, float, str, tuple, type(None))))))
                   for name, m in module.named_modules())
    return refs, versions, config


def _same_state(a, b) -> bool:
    return (len(a[0]) == len(b[0]) and all(r1() is not None and r1() is r2() for r1, r2 in zip(a[0], b[0]))
            and a[1] == b[1] and a[2] == b[2])


def _dtype_device(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def lipschitz_bound(module: nn.Module, input_shape, *, estimate: bool = True, n_iter: int = 50, seed: int = 0,
                    cache: bool = True, conv_method: str = "fft", n_points: int = 4, points=None) -> LipschitzBound:
    """Sound upper bound on the ℓ2→ℓ2 Lipschitz constant of ``module`` on inputs of one shape.

    The bound holds for ``f(x) = module(x[None])[0]``, ``x`` of shape ``input_shape``:
    ``‖f(x) − f(y)‖₂ ≤ bound·‖x − y‖₂`` for all ``x, y``. It comes from a dynamic program over
    the ``torch.fx`` graph: composition multiplies factors (submultiplicativity), residual
    ``add`` sums them (triangle inequality), ``cat`` combines them in quadrature, and every
    per-op factor is an upper bound including its float64 rounding (rules and proofs in the
    module docstring). An op without a rule raises :class:`UnsupportedOpError`; nothing is
    guessed. Radii derived from the bound are in the scale of the encoder's **own input**:
    a normalisation ``(x − mean)/std`` inside the module is part of the bound.

    Not covered: the module's own floating-point error (the bound is for exact arithmetic
    with the stored parameters); modules that mix samples across the batch; ops without a
    rule (softmax, layer norm, attention, products of input-dependent tensors).

    Parameters
    ----------
    module : nn.Module in eval mode
        Maps a batch (N, *input_shape) to (N, ...) (or a tuple of such, bounded as their
        concatenation), processing samples independently.
    input_shape : tuple of int
        One input's shape without the batch dimension, e.g. ``(3, 32, 32)`` or ``(d,)``;
        convolution bounds depend on the spatial size.
    estimate : bool
        Also compute a lower bound: power iteration on ``JᵀJ`` (autograd, float64) at a few
        points, the largest ``‖J v‖`` found. For a piecewise-linear or smooth network this is
        at most the true constant, so the truth lies in ``[estimate, bound]``.
    n_iter : int
        Power iterations per point.
    seed : int
        Seed of the random points and start vectors.
    cache : bool
        Reuse the result of an identical earlier call on the same module object, keyed by
        (input_shape, conv_method, estimate, n_iter, n_points, seed), as long as no parameter
        or buffer was replaced or changed (weak reference, version counter and storage
        pointer of each are compared) and no public scalar attribute of a submodule
        changed. Changes that bypass version counters (writes through ``.data``) or to the
        forward code are not seen: pass ``cache=False`` or call :func:`clear_cache`.
    conv_method : {"fft", "gram", "dense"}
        Convolution bound: per-frequency SVDs on the periodic grid (default), Gram
        iteration on the same matrices, or the exact norm of the dense operator when it has
        at most 2**23 entries (the "fft" bound beyond).
    n_points : int
        Random standard-normal points for the estimate.
    points : tensor (P, *input_shape), optional
        Points for the estimate instead of random ones (real inputs give a more telling
        estimate). Results with ``points`` are not cached.

    Returns
    -------
    LipschitzBound
        ``bound``, ``estimate``, ``gap = bound/estimate`` and the per-node ``layers``.

    Raises
    ------
    ValueError
        A submodule is in train mode, or the module fails on an input of this shape.
    UnsupportedOpError
        An op has no rule, or the module cannot be traced by ``torch.fx``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module; got {type(module).__name__}")
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints; got {input_shape!r}")
    if conv_method not in _CONV_METHODS:
        raise ValueError(f"conv_method must be one of {_CONV_METHODS}; got {conv_method!r}")
    for name, v in (("n_iter", n_iter), ("n_points", n_points)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    for name, m in module.named_modules():
        shown = name or f"{type(m).__name__} (the root)"
        if m.training:
            raise ValueError(f"module {shown!r} is in train mode; call .eval() first (dropout and batch norm compute "
                             "a different, batch-dependent function in training, so no bound would hold)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None:
            raise UnsupportedOpError(f"module {shown!r} ({type(m).__name__} with track_running_stats=False): no "
                                     "Lipschitz rule (in eval it normalises with batch statistics); pass "
                                     "lipschitz=<float> explicitly or wrap it")
    key = (input_shape, conv_method, bool(estimate), n_iter, n_points, seed)
    use_cache = cache and points is None
    state = _state(module) if use_cache else None
    if use_cache:
        hit = _CACHE.get(module, {}).get(key)
        if hit is not None and _same_state(hit[0], state):
            return hit[1]

    bound, layers = _graph_bound(module, input_shape, conv_method)
    device = _dtype_device(module)[1]
    est = _estimate(module, input_shape, device, n_iter, n_points, seed, points) if estimate else None
    result = LipschitzBound(bound=bound, estimate=est, layers=layers)
    if use_cache:
        _CACHE.setdefault(module, {})[key] = (state, result)
    return result


def _graph_bound(module: nn.Module, input_shape: tuple, conv_method: str):
    """Trace, propagate shapes (and constant values) on a zeros input, run the DP."""
    tracer = _Tracer()
    root = _Root(module)
    try:
        graph = tracer.trace(root)
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as e:
        raise UnsupportedOpError(f"torch.fx cannot trace {type(module).__name__} ({e}): no Lipschitz rule; pass "
                                 "lipschitz=<float> explicitly or wrap it in a module with a float attribute "
                                 "lipschitz_constant") from e
    gm = torch.fx.GraphModule(tracer.root, graph)
    dp = _GraphBound(gm, conv_method)
    keep = dp.classify()
    dtype, device = _dtype_device(module)
    rec = _Recorder(gm, keep)
    try:
        with torch.no_grad():
            rec.propagate(torch.zeros((1,) + input_shape, dtype=dtype, device=device))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{type(module).__name__} failed on an input of shape {(1,) + input_shape}: {e}") from e
    dp.values = rec.values
    bound = dp.run()
    # the graph must compute what the module computes: tracing turns `a += b` into an
    # out-of-place add and bakes in python control flow; random ops differ run to run
    x = torch.randn((1,) + input_shape, generator=torch.Generator().manual_seed(12345)).to(device, dtype)
    with torch.no_grad():
        same = _outputs_match(gm(x), module(x))
    if not same:
        raise UnsupportedOpError(f"the torch.fx trace of {type(module).__name__} computes a different function than "
                                 "the module (random ops, in-place updates of aliased tensors or python control "
                                 "flow): no Lipschitz rule; pass lipschitz=<float> explicitly")
    return bound, dp.layers


def _outputs_match(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        scale = b.detach().abs().max().item() if b.numel() else 0.0
        return bool((a - b).abs().max().item() <= 1e-5 * scale + 1e-30) if b.numel() else True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_outputs_match(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_outputs_match(a[k], b[k]) for k in a)
    return a == b
