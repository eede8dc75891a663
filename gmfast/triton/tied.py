"""Triton kernels for the tied (linear) certificate, and the NT GEMM the other ops share.

Contract (:mod:`gmfast.ops.certify`): ``Z (B, d)``, ``A (K, d)``, ``beta (K,)`` in the
working dtype ``T`` (float32 or float64); ``inv (K, K)`` float64 lower bounds on
``1/‖a_c − a_j‖_q`` or ``None`` (predictions only); ``alpha, eps (K,)`` float64 with
``|ℓ̂_k − ℓ_k| ≤ α_k‖z‖ + ε_k``, both ``None`` for ``fp_sound=False``. Returns
``pred (B,)`` int64 (``-1``: a non-finite logit) and ``radius (B,)`` float64 or ``None``.

How the epilogue gets ``c`` before the min over ``j``
------------------------------------------------------
The radius ``min_{j≠c} (m̂_cj − E_cj)·inv[c, j]`` needs the row's argmax ``c`` before any
term of the min can be formed. Two paths, chosen by ``K``:

* ``K ≤ FUSED_MAX_K`` (one kernel, :func:`_tied_fused_kernel`): a row tile's whole row of
  logits fits in registers (``BM × next_pow2(K)``), so the GEMM, the argmax and the min
  all run on it; nothing but ``pred``/``radius`` reaches global memory.
* larger ``K`` (two kernels): :func:`_gemm_nt_bias_kernel` writes the logits of a bounded
  chunk of rows (at most ``_CHUNK_ELEMS`` elements, so extra memory is ``O(chunk·K)`` for
  any ``B``) together with ``fl(‖z‖²)``; :func:`_tied_epilogue_kernel` then scans each row
  twice, once for the argmax and once for the min. Re-reading ``K`` logits per row costs
  ``O(B·K)`` memory traffic, against ``O(B·K·d)`` flops for recomputing them tile by tile
  (the other way to get ``c`` first), so for the large-``K`` shapes this is the cheaper
  second pass by a factor of about ``d``.

Soundness of the returned radius
--------------------------------
The arithmetic is exactly that of :func:`gmfast.ops._reference.tied_epilogue`:

* logits ``ℓ̂ = fl(Z Aᵀ) + β`` in ``T`` with ``tl.dot(..., input_precision="ieee")`` (no
  TF32): an inner product of length ``d + 1`` in some order, within
  ``γ_{d+2}(‖a_k‖‖z‖ + |β_k|)`` of the exact logit for any order, with or without FMA
  (that is what ``alpha``/``eps`` encode);
* ``‖z‖`` is bounded above from ``s = fl(Σ z_i²)`` accumulated in ``T`` (fused into the
  GEMM's loads): ``√((s + 2dη_T)(1 + γ_{d+2}(u_T)))·(1 + 4u₆₄)``, the formula of
  ``csrc/common.h: norm_up_from_ss<T>``;
* margins, error terms, products and the min are float64: ``E_cj = (e_c + e_j)(1 + 8u₆₄)
  + 2u₆₄|m̂_cj|``, ``num ≤ 0 → 0``, the min over **all** ``j ≠ c``, times ``1 − 8u₆₄``.

Every float64 constant reaches the kernels through a float64 tensor: Triton types Python
float arguments and literals as float32, which would round ``1 + 8u₆₄`` to 1. The kernels
rely on IEEE float64 ``+ − × /`` and a correctly rounded float64 square root (what Triton
emits for float64 on NVIDIA: ``div.rn.f64``/``sqrt.rn.f64``), and on subnormals not being
flushed (Triton does not set FTZ for plain arithmetic). FMA contraction (``FP_FUSION``)
is allowed: a fused ``a·b + c`` is one rounding where the bounds count two, Higham's
inner-product bound holds with or without FMA, and no bound relies on an intermediate
product being rounded (where a rounded ``û`` is reused, a fused exact product is within
the same ``Δ`` of the exact ``u``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from gmfast._fp import NORM_FIELDS, TIED_FIELDS, TiedErrorModel, tied_constants

#: Largest K handled by the single fused kernel (whole row of logits in registers).
FUSED_MAX_K = 64
#: Scratch elements (logits or per-class gradients) one chunk of rows may use: 32 MiB f32.
_CHUNK_ELEMS = 1 << 23
#: FMA contraction, passed explicitly at every launch (Triton 3.9 warns when it is left to
#: its default). On: the GEMMs need FMAs for speed, and contraction is sound here (see the
#: module docstring).
FP_FUSION = True


# --------------------------------------------------------------------------------------
# Launch helpers shared by the gmfast.triton ops
# --------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors) -> None:
    """All tensors on one device, a CUDA one unless the interpreter runs (it takes CPU)."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"gmfast.triton: all operands must be on one device; got {sorted(map(str, devs))}")
    dev = next(iter(devs))
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"gmfast.triton kernels run on CUDA tensors; got a tensor on {dev} "
            "(set TRITON_INTERPRET=1 to run them on the CPU interpreter)"
        )


def check_dtype(Z: torch.Tensor, *same) -> None:
    if Z.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gmfast.triton kernels take float32 or float64; got {Z.dtype}")
    for t in same:
        if t.dtype != Z.dtype:
            raise TypeError(f"operands must share Z's dtype {Z.dtype}; got {t.dtype}")


def check_f64(*tensors) -> None:
    for t in tensors:
        if t is not None and t.dtype != torch.float64:
            raise TypeError(f"error-bound tables must be float64; got {t.dtype}")


@contextlib.contextmanager
def launch_context():
    """Where kernels run: under the interpreter, silence numpy's floating-point warnings.

    The interpreter emulates the GPU with numpy, which warns on ``inf·0``, ``inf − inf`` or
    an all-NaN ``max`` (NaN/Inf rows, masked ``+inf`` table entries); GPU arithmetic is IEEE
    non-stop, and the kernels handle those values explicitly (``tl.where``), so the warnings
    carry nothing.
    """
    if not interpreting():
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def pow2(n: int, lo: int, hi: int) -> int:
    """``next_pow2(n)`` clamped to ``[lo, hi]`` (tile sizes must be powers of two ≥ 16 for
    ``tl.dot`` on GPUs)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


def chunk_rows(width: int, block: int, total: int) -> int:
    """Rows per chunk so that a ``rows × width`` scratch stays under ``_CHUNK_ELEMS``."""
    rows = max(block, (_CHUNK_ELEMS // max(1, width)) // block * block)
    return min(rows, max(total, 1), 1 << 21)


def field(fields: tuple, name: str) -> tl.constexpr:
    """Index of a named constant in a CST tensor laid out as ``fields`` (:mod:`gmfast._fp`),
    as a compile-time constant the kernels may read."""
    return tl.constexpr(fields.index(name))


# where the kernels find each constant: the layout is gmfast._fp's, not restated here
NORM_AT = field(TIED_FIELDS, NORM_FIELDS[0])
UP4_AT = field(TIED_FIELDS, "up4")
TWO_U64_AT = field(TIED_FIELDS, "two_u64")
DOWN4_AT = field(TIED_FIELDS, "down4")


@functools.lru_cache(maxsize=64)
def _constants(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def constants(values, device) -> torch.Tensor:
    """A cached float64 tensor of kernel constants (see the module docstring for why)."""
    return _constants(tuple(float(v) for v in values), torch.device(device))


# --------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def norm_up(ss, CST, OFF: tl.constexpr):
    """Upper bound (float64) on ``‖z‖`` from ``ss = fl(Σz²)`` in T; ``CST[OFF:OFF+3]`` are
    the :data:`gmfast._fp.NORM_FIELDS`."""
    eta2 = tl.load(CST + OFF)
    g1 = tl.load(CST + OFF + 1)
    up = tl.load(CST + OFF + 2)
    return tl.sqrt((ss.to(tl.float64) + eta2) * g1) * up


@triton.jit
def tile_argmax(lg, ks, kmask):
    """Per row of a ``(BM, BK)`` logit tile: the max, its lowest index (int64) and whether
    every valid logit is finite (int32 0/1). With a NaN the index is meaningless; callers
    only use it for rows flagged finite."""
    v = tl.where(kmask[None, :], lg, float("-inf"))
    mx = tl.max(v, 1)
    c = tl.min(tl.where((v == mx[:, None]) & kmask[None, :], ks[None, :], 1 << 62), 1)
    fin = tl.where(kmask[None, :], (tl.abs(lg) < float("inf")).to(tl.int32), 1)
    return mx, c, tl.min(fin, 1)


@triton.jit
def _tile_min_ratio(lg, ks, kmask, rmask, lc, c, zn, ec, INV, ALPHA, EPS, K, up4, two_u,
                    FP_SOUND: tl.constexpr):
    """min over the tile's valid ``j ≠ c`` of ``max(0, m̂_cj − E_cj)·inv[c, j]`` (float64)."""
    m = lc[:, None] - lg.to(tl.float64)
    valid = rmask[:, None] & kmask[None, :]
    inv = tl.load(INV + c[:, None] * K + ks[None, :], mask=valid, other=float("inf"))
    if FP_SOUND:
        al = tl.load(ALPHA + ks, mask=kmask, other=0.0)
        ep = tl.load(EPS + ks, mask=kmask, other=0.0)
        e = zn[:, None] * al[None, :] + ep[None, :]
        num = m - ((ec[:, None] + e) * up4 + two_u * tl.abs(m))
    else:
        num = m
    # num > 0 with inv = +inf gives +inf: class j can never overtake c.
    ratio = tl.where(num > 0, num * inv, 0.0)
    ratio = tl.where(valid & (ks[None, :] != c[:, None]), ratio, float("inf"))
    return tl.min(ratio, 1)


@triton.jit
def _row_error(c, zn, ALPHA, EPS, FP_SOUND: tl.constexpr):
    """``e_c = α_c·zn + ε_c`` per row (float64); zeros when not fp_sound."""
    if FP_SOUND:
        return zn * tl.load(ALPHA + c) + tl.load(EPS + c)
    else:
        return zn * 0.0


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _gemm_nt_bias_kernel(X, sxm, sxk, Y, BIAS, OUT, SS, M, N, Kd,
                         WRITE_SS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``OUT[m, n] = fl(Σ_k X[m, k]·Y[n, k]) + BIAS[n]`` and, if ``WRITE_SS``, ``SS[m] =
    fl(Σ_k X[m, k]²)``, all in X's dtype. X (M, Kd) strided; Y (N, Kd), BIAS (N,), OUT
    (M, N) contiguous. Grid ``(cdiv(M, BM), cdiv(N, BN))``; SS is stored by the first
    column of programs."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    kk0 = tl.arange(0, BK).to(tl.int64)
    T = X.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=T)
    ss = tl.zeros([BM], dtype=T)
    for k0 in range(0, Kd, BK):
        kk = k0 + kk0
        kmask = kk < Kd
        x = tl.load(X + rows[:, None] * sxm + kk[None, :] * sxk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        y = tl.load(Y + cols[None, :] * Kd + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(x, y, acc, input_precision="ieee", out_dtype=T)
        if WRITE_SS:
            ss += tl.sum(x * x, 1)
    bias = tl.load(BIAS + cols, mask=cmask, other=0.0)
    out = acc + bias[None, :]
    tl.store(OUT + rows[:, None] * N + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])
    if WRITE_SS:
        tl.store(SS + rows, ss, mask=rmask & ((rows * 0 + pid_n) == 0))


@triton.jit
def _tied_fused_kernel(Z, szb, szd, A, BETA, INV, ALPHA, EPS, CST, PRED, RAD, B, d, K,
                       NEED_RADIUS: tl.constexpr, FP_SOUND: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """Whole tied certify for a tile of BM rows when all K logits fit in one BK tile.

    CST (float64): the :data:`gmfast._fp.TIED_FIELDS` (:func:`gmfast._fp.tied_constants`).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < B
    ks = tl.arange(0, BK).to(tl.int64)
    kmask = ks < K
    dd0 = tl.arange(0, BD).to(tl.int64)
    T = Z.dtype.element_ty
    acc = tl.zeros([BM, BK], dtype=T)
    ss = tl.zeros([BM], dtype=T)
    for d0 in range(0, d, BD):
        dd = d0 + dd0
        dmask = dd < d
        z = tl.load(Z + rows[:, None] * szb + dd[None, :] * szd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        at = tl.load(A + ks[None, :] * d + dd[:, None], mask=dmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(z, at, acc, input_precision="ieee", out_dtype=T)
        if FP_SOUND:
            ss += tl.sum(z * z, 1)
    lg = acc + tl.load(BETA + ks, mask=kmask, other=0.0)[None, :]
    mx, c, ok = tile_argmax(lg, ks, kmask)
    good = ok > 0
    c = tl.where(good, c, 0)
    tl.store(PRED + rows, tl.where(good, c, -1), mask=rmask)
    if NEED_RADIUS:
        if FP_SOUND:
            zn = norm_up(ss, CST, NORM_AT)
        else:
            zn = tl.zeros([BM], dtype=tl.float64)
        ec = _row_error(c, zn, ALPHA, EPS, FP_SOUND)
        r = _tile_min_ratio(lg, ks, kmask, rmask, mx.to(tl.float64), c, zn, ec, INV, ALPHA, EPS, K,
                            tl.load(CST + UP4_AT), tl.load(CST + TWO_U64_AT), FP_SOUND)
        if FP_SOUND:
            r = r * tl.load(CST + DOWN4_AT)
        tl.store(RAD + rows, tl.where(good, r, 0.0), mask=rmask)


@triton.jit
def _tied_epilogue_kernel(L, SS, INV, ALPHA, EPS, CST, PRED, RAD, R, K,
                          NEED_RADIUS: tl.constexpr, FP_SOUND: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr):
    """Prediction and radius from stored logits L (R, K) (and SS (R,) = fl(‖z‖²) in T).

    Pass 1 over K finds the argmax (lowest index on ties: a later tile replaces the best
    only if strictly larger); pass 2 re-reads the row and takes the min with c known.
    CST as in :func:`_tied_fused_kernel`.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < R
    kk0 = tl.arange(0, BK).to(tl.int64)
    T = L.dtype.element_ty
    best = tl.full([BM], float("-inf"), T)
    c = tl.zeros([BM], dtype=tl.int64)
    ok = tl.full([BM], 1, tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + kk0
        kmask = ks < K
        lg = tl.load(L + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        tm, ti, tok = tile_argmax(lg, ks, kmask)
        upd = tm > best
        best = tl.where(upd, tm, best)
        c = tl.where(upd, ti, c)
        ok = tl.minimum(ok, tok)
    good = ok > 0
    c = tl.where(good, c, 0)
    tl.store(PRED + rows, tl.where(good, c, -1), mask=rmask)
    if NEED_RADIUS:
        if FP_SOUND:
            zn = norm_up(tl.load(SS + rows, mask=rmask, other=0.0), CST, NORM_AT)
        else:
            zn = tl.zeros([BM], dtype=tl.float64)
        ec = _row_error(c, zn, ALPHA, EPS, FP_SOUND)
        lc = best.to(tl.float64)
        up4 = tl.load(CST + UP4_AT)
        two_u = tl.load(CST + TWO_U64_AT)
        r = tl.full([BM], float("inf"), tl.float64)
        for k0 in range(0, K, BK):
            ks = k0 + kk0
            kmask = ks < K
            lg = tl.load(L + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            r = tl.minimum(r, _tile_min_ratio(lg, ks, kmask, rmask, lc, c, zn, ec, INV, ALPHA, EPS, K,
                                              up4, two_u, FP_SOUND))
        if FP_SOUND:
            r = r * tl.load(CST + DOWN4_AT)
        tl.store(RAD + rows, tl.where(good, r, 0.0), mask=rmask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def gemm_nt_bias(X: torch.Tensor, Y: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                 ss: torch.Tensor | None = None) -> None:
    """``out = X Yᵀ + bias`` (IEEE products, X's dtype), and ``ss = fl(‖X_m‖²)`` if given.

    X (M, Kd) any strides; Y (N, Kd), bias (N,), out (M, N), ss (M,) contiguous.
    """
    M, Kd = X.shape
    N = Y.shape[0]
    if M == 0 or N == 0:
        return
    if interpreting():
        BM, BN, BK, warps = pow2(M, 16, 64), pow2(N, 16, 128), pow2(Kd, 16, 128), 4
    elif X.dtype == torch.float64:
        BM, BN, BK, warps = 64, 64, 16, 4
    else:
        BM, BN, BK, warps = 128, 128, 16, 8
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    if grid[1] > 65535:
        raise ValueError(f"gemm_nt_bias: N={N} columns need more than 65535 column tiles of {BN}")
    with launch_context():
        _gemm_nt_bias_kernel[grid](X, X.stride(0), X.stride(1), Y, bias, out, out if ss is None else ss, M, N,
                                   Kd, WRITE_SS=ss is not None, BM=BM, BN=BN, BK=BK, num_warps=warps,
                                   enable_fp_fusion=FP_FUSION)


def library_gemm(Z: torch.Tensor) -> bool:
    """Whether the split path takes its logits from ``torch.addmm`` (cuBLAS): on a GPU, when
    that GEMM is IEEE in Z's dtype (float64, or float32 with TF32 off). The bounds hold for
    any inner product of length ``d + 1`` in ``T``, so they cover it; on an H200 cuBLAS runs
    this GEMM about twice as fast as ``tl.dot(..., input_precision="ieee")``."""
    from gmfast.params import fp32_matmul_is_ieee

    if interpreting() or Z.device.type != "cuda":
        return False
    return Z.dtype == torch.float64 or fp32_matmul_is_ieee(Z.device)


def tied_certify(Z: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, inv: torch.Tensor | None,
                 fp: TiedErrorModel | None, *, split: bool | None = None, gemm: str | None = None):
    """Tied certify on the GPU (or the Triton interpreter); see the module docstring.

    Z (B, d) any strides; A (K, d), beta (K,) in Z's dtype; inv (K, K) float64 or None;
    ``fp`` the rounding-error model (:class:`gmfast._fp.TiedErrorModel`) or None
    (``fp_sound=False``). ``split`` forces the two-kernel path (True) or the fused one
    (False, only for ``K ≤ FUSED_MAX_K``); by default it is chosen by K. ``gemm`` (split
    path): ``"triton"`` (the GEMM kernel here, ``‖z‖²`` fused into it) or ``"torch"``
    (``torch.addmm``, then ``fl(Σ z_i²)`` by ``torch.sum`` in ``T``: a sum in some order,
    the same bound); by default :func:`library_gemm`.
    Returns pred (B,) int64 and radius (B,) float64 (None when ``inv`` is None).
    """
    if gemm not in (None, "triton", "torch"):
        raise ValueError(f"gemm must be None, 'triton' or 'torch'; got {gemm!r}")
    alpha, eps = (None, None) if fp is None else (fp.alpha, fp.eps)
    check_device(Z, A, beta, inv, alpha, eps)
    check_dtype(Z, A, beta)
    check_f64(inv, alpha, eps)
    B, d = Z.shape
    K = A.shape[0]
    if A.shape != (K, d) or beta.shape != (K,):
        raise ValueError(f"expected A ({K}, {d}) and beta ({K},); got {tuple(A.shape)} and {tuple(beta.shape)}")
    if fp is not None and (alpha.shape != (K,) or eps.shape != (K,) or len(fp.consts) != len(TIED_FIELDS)):
        raise ValueError(f"fp: expected alpha, eps of shape ({K},) and {len(TIED_FIELDS)} constants; got "
                         f"{tuple(alpha.shape)}, {tuple(eps.shape)} and {len(fp.consts)}")
    A, beta = A.contiguous(), beta.contiguous()
    need_radius = inv is not None
    fp_sound = alpha is not None and need_radius
    if need_radius:
        inv = inv.contiguous()
        if inv.shape != (K, K):
            raise ValueError(f"inv: expected ({K}, {K}); got {tuple(inv.shape)}")
    if fp_sound:
        alpha, eps = alpha.contiguous(), eps.contiguous()
    dev = Z.device
    pred = torch.empty(B, dtype=torch.int64, device=dev)
    radius = torch.empty(B, dtype=torch.float64, device=dev) if need_radius else None
    if B == 0:
        return pred, radius
    cst = constants(fp.consts if fp is not None else tied_constants(d, Z.dtype), dev)
    dummy = cst
    inv_, alpha_, eps_ = (inv if need_radius else dummy), (alpha if fp_sound else dummy), (eps if fp_sound else dummy)
    rad_ = radius if need_radius else dummy
    fused_max = 128 if interpreting() else FUSED_MAX_K
    if split is None:
        split = K > fused_max
    if not split:
        if K > fused_max:
            raise ValueError(f"the fused kernel takes K ≤ {fused_max}; got K={K}")
        if interpreting():
            BM, BD, warps = pow2(B, 16, 64), pow2(d, 16, 128), 4
        else:
            BM, BD, warps = 64, 32, 4
        BK = pow2(K, 16, fused_max)
        with launch_context():
            _tied_fused_kernel[(triton.cdiv(B, BM),)](
                Z, Z.stride(0), Z.stride(1), A, beta, inv_, alpha_, eps_, cst, pred, rad_, B, d, K,
                NEED_RADIUS=need_radius, FP_SOUND=fp_sound, BM=BM, BK=BK, BD=BD, num_warps=warps,
                enable_fp_fusion=FP_FUSION)
        return pred, radius
    BM_E, BK_E = (pow2(B, 16, 64), pow2(K, 16, 256)) if interpreting() else (32, 128)
    rows = chunk_rows(K, 128, B)
    L = torch.empty(rows, K, dtype=Z.dtype, device=dev)
    SS = torch.empty(rows, dtype=Z.dtype, device=dev)
    use_torch = library_gemm(Z) if gemm is None else gemm == "torch"
    for r0 in range(0, B, rows):
        n = min(rows, B - r0)
        Zc = Z[r0:r0 + n]
        if use_torch:
            torch.addmm(beta, Zc, A.T, out=L[:n])
            if fp_sound:
                torch.sum(Zc * Zc, 1, out=SS[:n])
        else:
            gemm_nt_bias(Zc, A, beta, L[:n], SS[:n] if fp_sound else None)
        with launch_context():
            _tied_epilogue_kernel[(triton.cdiv(n, BM_E),)](
                L, SS, inv_, alpha_, eps_, cst, pred[r0:], rad_[r0:] if need_radius else dummy, n, K,
                NEED_RADIUS=need_radius, FP_SOUND=fp_sound, BM=BM_E, BK=BK_E, num_warps=4, enable_fp_fusion=FP_FUSION)
    return pred, radius
