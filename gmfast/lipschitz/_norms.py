"""Certified float64 norms of the linear pieces of a network: spectral norms (SVD with a
backward-error allowance), convolutions (per-frequency matrices on a periodic grid, or Gram
iteration, or the dense operator), pooling overlap counts, the Schur test, and copy counts.

Every function returns an *upper* bound that includes its own float64 rounding; the proofs
are in the docstrings. They depend on nothing else in the package but the error type.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from gmfast.lipschitz.errors import UnsupportedOpError

#: Unit roundoff of float64: every computed factor is inflated by multiples of it.
U = 2.0**-53
#: Largest dense convolution operator (inputs × (inputs + outputs) entries) for "dense".
_DENSE_LIMIT = 2**23
#: Bytes of per-frequency matrices held at once by the FFT/Gram convolution bound.
_CHUNK_BYTES = 2**26

# ----------------------------------------------------------------------------- rounding


def up(x: float, n_ops: int = 1) -> float:
    """``x`` computed by ``n_ops`` correctly rounded float64 operations from exact data,
    raised to an upper bound on the exact result: each rounding is a factor in
    ``[1 − u, 1 + u]``, so ``x (1 + 2.02 n u)`` covers them and ``nextafter`` the final
    multiplication's own rounding."""
    if x == 0.0 or math.isinf(x):
        return x
    return math.nextafter(x * (1.0 + 2.02 * n_ops * U), math.inf)


def svd_up(s: float, m: int, n: int) -> float:
    """Upper bound on ``‖W‖₂`` from the largest computed singular value ``s`` of an ``m × n``
    float64 matrix. LAPACK's SVD is backward stable: ``s`` is exactly a singular value of
    ``W + E`` with ``‖E‖₂ ≤ ρ‖W‖₂``; worst-case analyses of Householder bidiagonalisation
    (Higham, *Accuracy and Stability*, 2nd ed., Thm 19.4, then Frobenius to spectral) give
    ``ρ = c·m·n·√min(m, n)·u`` for a small constant ``c``; we take ``c = 16`` (it costs < 1e-8
    relative up to 512 × 512; observed errors are far smaller). Weyl's inequality then gives
    ``‖W‖₂ ≤ s + ρ‖W‖₂``, i.e. ``‖W‖₂ ≤ s / (1 − ρ)``."""
    rho = 16.0 * m * n * math.sqrt(min(m, n)) * U
    if rho >= 0.5:
        raise ValueError(f"matrix of {m} x {n} is too large for a certified float64 SVD bound")
    return up(s / (1.0 - rho), 2)


def spectral_norm_up(W: torch.Tensor) -> float:
    """Upper bound on ``max_b ‖W_b‖₂`` over a batch of matrices ``W`` (..., m, n), real or
    complex, computed with float64 SVDs on the CPU (LAPACK: GPU solvers may be iterative
    with a tolerance)."""
    W = W.detach().cpu()
    W = W.to(torch.complex128 if W.is_complex() else torch.float64)
    if W.numel() == 0:
        return 0.0
    s = torch.linalg.svdvals(W).amax().item()
    return svd_up(s, W.shape[-2], W.shape[-1])


def ntuple(v, n: int) -> tuple:
    if isinstance(v, (tuple, list)):
        return tuple(v) * n if len(v) == 1 else tuple(v)
    return (v,) * n


# ----------------------------------------------------------------------------- convolutions


def conv_grid(n: int, pad: tuple, k_eff: int) -> int:
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


def twiddles(N: int, k: int, dil: int, half: bool) -> torch.Tensor:
    """``T[j, ω] = exp(−2πi·(ω·j·dil mod N)/N)`` (k, N or N//2 + 1), complex128. The phase is
    reduced exactly in integers first, so each entry is within ``τ = 64u`` of the exact one
    (angle rounding ≤ 20u, sin/cos ≤ 2 ulp)."""
    omegas = torch.arange(N // 2 + 1 if half else N, dtype=torch.int64)
    taps = torch.arange(k, dtype=torch.int64) * dil
    r = (taps[:, None] * omegas[None, :]) % N
    theta = (2.0 * math.pi / N) * r.to(torch.float64)
    return torch.complex(torch.cos(theta), -torch.sin(theta))


def gram_norm_up(M: torch.Tensor, n_iter: int = 12) -> torch.Tensor:
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
        delta = 2.0 * (rows * cols + 8) * U
        kappa = 2.0 * (rows + 4) * U * 1.01
        levels.append((f, delta, kappa))
        if t < n_iter:
            H = A / torch.where(f > 0, f, torch.ones_like(f))[:, None, None]
            A = H.mH @ H
    f, delta, _ = levels[-1]
    b = f * (1.0 + delta)
    for f, delta, kappa in reversed(levels[:-1]):
        b = f * (torch.sqrt(b + kappa * (1.0 + U) ** 2 * (1.0 + delta) ** 2) + U * (1.0 + delta))
        b = b * (1.0 + 16 * U)  # this level's own float64 evaluation
    return b


def conv_periodic_bound(W: torch.Tensor, grid: tuple, dilation: tuple, groups: int, method: str) -> float:
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
    x = max(64.0 * U + 2.0 * (kd + 4) * U for kd in k)
    coef = nd * x * (1.0 + nd * x) * (1.0 + U) * 1.01  # ≥ (1 + x)^D − 1, without cancellation
    taps_abs = Wg.abs().sum(dim=tuple(range(3, 3 + nd)))  # (g, per, c_in_g)
    eps = coef * torch.linalg.vector_norm(taps_abs, dim=(1, 2)).amax().item()
    T = [twiddles(grid[d], k[d], dilation[d], half=(d == nd - 1)) for d in range(nd)]
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
            s = gram_norm_up(Y).amax().item()
        else:
            s = svd_up(torch.linalg.svdvals(Y).amax().item(), per, c_in_g)
        best = max(best, s)
    return up(best + eps)


def pad_multiplicity(n: int, pad: tuple, mode: str) -> int:
    """Largest number of copies of one entry that ``F.pad(mode)`` makes along one axis,
    counted by padding an index signal (so it is PyTorch's own semantics)."""
    probe = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, 1, n)
    out = F.pad(probe, tuple(pad), mode=mode)
    return int(torch.bincount(out.reshape(-1).long(), minlength=n + 1)[1:].max())


def conv_bound(W, spatial, pads, mode, stride, dilation, groups, method, apply):
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
        err = 2.0 * (math.prod(k) + 2) * U * W.detach().double().abs().sum().item()
        return up(spectral_norm_up(A) + err), "dense SVD"
    if method == "dense":
        method = "fft"
    if mode == "zeros":
        grid = tuple(conv_grid(spatial[d], pads[d], k_eff[d]) for d in range(nd))
        factor = conv_periodic_bound(W, grid, dilation, groups, method)
    elif mode == "circular":
        # exactly the circular convolution on Z_n; outputs beyond n repeat earlier ones
        grid = tuple(spatial)
        reps = math.prod(math.ceil((spatial[d] + sum(pads[d]) - k_eff[d] + 1) / spatial[d]) for d in range(nd))
        factor = up(math.sqrt(reps) * conv_periodic_bound(W, grid, dilation, groups, method), 2)
    elif mode in ("reflect", "replicate"):
        # pad (a copy map: ‖P‖₂ = √(largest multiplicity)), then an unpadded convolution
        mult = math.prod(pad_multiplicity(spatial[d], pads[d], mode) for d in range(nd))
        grid = tuple(spatial[d] + sum(pads[d]) for d in range(nd))
        factor = up(math.sqrt(mult) * conv_periodic_bound(W, grid, dilation, groups, method), 2)
    else:
        raise UnsupportedOpError(f"padding_mode={mode!r}")
    return factor, f"{method}, grid {grid}"


# ----------------------------------------------------------------------------- pooling


def maxpool_factor(kernel, stride, dilation, nd: int) -> float:
    """``|max a − max b| ≤ max |a − b| ≤ ‖(a − b)|window‖₂``; summing squares over all
    windows counts an element once per window holding it, so the factor is ``√m``. Per axis,
    the windows holding index ``p`` are those ``t`` with ``p + pad − j·d = t·s`` for some tap
    ``j < k``: at most one per ``j``, and only taps with ``j·d ≡ p + pad (mod s)``, i.e. one
    residue class mod ``s/gcd(d, s)``: ``m ≤ ⌈k·gcd(d, s)/s⌉`` (``⌈k/s⌉`` without dilation).
    Padding (with −∞) and ceil_mode add windows of the same lattice."""
    k = ntuple(kernel, nd)
    s = ntuple(stride if stride not in (None, (), []) else kernel, nd)
    d = ntuple(dilation, nd)
    m = math.prod(math.ceil(k[i] * math.gcd(d[i], s[i]) / s[i]) for i in range(nd))
    return up(math.sqrt(m))


def schur_factor(apply, shape) -> float:
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
    return up(math.sqrt(up(rows, n + 2) * up(cols.abs().amax().item(), n + 2)), 2)


def copy_factor(apply, shape) -> float:
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

