"""Triton kernels for the per-class (full / diag / spherical) certificate (DESIGN 1.4).

Contract (:mod:`gmfast.ops.certify`): ``Z (B, d)`` in the working dtype ``T``; ``p`` a
:class:`gmfast.params.PerClassParams` on Z's device in ``T`` (``mu``, ``prec``,
``prec_mu``; float64 ``kappa``, ``prec_abs_up``, ``mu_norm_up``); ``lam (K, K)`` float64
curvature table or ``None`` (predictions only). Returns ``pred (B,)`` int64 (``-1``: a
non-finite score) and ``radius (B,)`` float64 or ``None``.

Per row ``z`` and class ``k``: ``w_k = fl(z − μ_k)``, ``û_k`` (full: ``fl(P_k z) − P_kμ_k``
from one GEMM of a chunk of rows against the stacked ``P`` (K·d × d); diag ``fl(p_k ⊙
w_k)``; spherical ``fl(s_k w_k)``), ``D_k = fl(w_kᵀû_k)``, ``f_k = κ_k − D_k/2`` (float64),
``c = argmax f`` (lowest index on ties). For every ``j ≠ c``: ``q = f_c − f_j``,
``g = ‖fl(û_c − û_j)‖``, ``r_j = 2q/(g + √(g² + 2λ_cj q))``; radius ``min_j r_j``.

What is fused, and memory
-------------------------
``_perclass_kernel`` takes a tile of rows through two passes over the classes, in blocks of
``BC`` classes (3-D ``rows × classes × features`` tiles, reduced over features): pass 1
computes ``D_k, ‖û_k‖², ‖w_k‖²`` for every ``k`` and keeps a running argmax (and the winner's
terms); pass 2 recomputes them for every ``j`` together with ``‖û_c − û_j‖²`` (``û_c``
reloaded or recomputed per row once ``c`` is known) and folds ``r_j`` into a running min.
Both passes call one helper, so they compute identical terms. Nothing of size B×K is
stored. For ``full`` the ``û`` of a bounded chunk of rows (``chunk × K·d ≤ 2²³`` elements)
comes from :func:`gmfast.triton.tied.gemm_nt_bias`; B×K×d is never materialised.

Soundness
---------
The error terms are those of :func:`gmfast.ops._reference.perclass_certify`, same formulas and
constants: ``γ = γ_{d+4}(u_T)``, ``S = 1 + 4γ``, the underflow allowances ``ν``, ``τ_u``,
``τ_D``, ``λ⁺`` from the table. ``D`` and the squared norms are accumulated in ``T`` (the
reference accumulates the norms in float64): that bound is written for working-precision
accumulation, the computed norms are within ``γ_{d+1}(u_T)`` of the exact ones (covered by
``S``) and possibly-underflowed squares by ``ν``; an overflow gives ``inf`` and radius 0.
``‖z‖`` is bounded from ``fl(Σz²)`` in ``T`` as in :mod:`gmfast.triton.tied`. Everything
after the accumulations is float64, and float64 constants come in a tensor (Triton types
Python floats as float32). A NaN anywhere in a pair's terms yields ``r_j = 0``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from gmfast._fp import NORM_FIELDS, PERCLASS_FIELDS, CovKind, PerClassErrorModel, perclass_constants
from gmfast.triton.tied import (FP_FUSION, chunk_rows, check_device, check_dtype, check_f64, constants, field,
                                gemm_nt_bias, interpreting, launch_context, norm_up, pow2)

# where the kernel finds each constant: the layout is gmfast._fp's, not restated here
_NORM = field(PERCLASS_FIELDS, NORM_FIELDS[0])
_U, _G, _S, _NU = (field(PERCLASS_FIELDS, n) for n in ("u", "g", "S", "nu"))
_TINY_U, _TINY_D, _THREE_U, _HALF_S = (field(PERCLASS_FIELDS, n) for n in ("tiny_u", "tiny_d", "three_u", "half_S"))
_FOUR_U64, _ONE_U, _DOWN8 = (field(PERCLASS_FIELDS, n) for n in ("four_u64", "one_u", "down8"))
_FULL, _DIAG = tl.constexpr(int(CovKind.FULL)), tl.constexpr(int(CovKind.DIAG))


@triton.jit
def _block_terms(Z, szb, szd, rows, rmask, U, su, MU, PREC, kc, kmask, c, d,
                 KIND: tl.constexpr, WITH_C: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """For a tile of BM rows and a block of BC classes ``kc``: ``D = fl(wᵀû)``, ``‖û‖²``,
    ``‖w‖²`` and, if ``WITH_C``, ``‖fl(û_c − û_k)‖²`` with the per-row class ``c``; each
    (BM, BC), accumulated in T. Both passes call this, so they compute identical terms."""
    T = Z.dtype.element_ty
    dd0 = tl.arange(0, BD).to(tl.int64)
    D = tl.zeros([BM, BC], dtype=T)
    uu = tl.zeros([BM, BC], dtype=T)
    ww = tl.zeros([BM, BC], dtype=T)
    gg = tl.zeros([BM, BC], dtype=T)
    for d0 in range(0, d, BD):
        dd = d0 + dd0
        dmask = dd < d
        zmask = rmask[:, None] & dmask[None, :]
        cmask = kmask[:, None] & dmask[None, :]
        z = tl.load(Z + rows[:, None] * szb + dd[None, :] * szd, mask=zmask, other=0.0)
        mu = tl.load(MU + kc[:, None] * d + dd[None, :], mask=cmask, other=0.0)
        w = z[:, None, :] - mu[None, :, :]
        if KIND == _FULL:
            u = tl.load(U + rows[:, None, None] * su + kc[None, :, None] * d + dd[None, None, :],
                        mask=rmask[:, None, None] & cmask[None, :, :], other=0.0)
        elif KIND == _DIAG:
            u = tl.load(PREC + kc[:, None] * d + dd[None, :], mask=cmask, other=0.0)[None, :, :] * w
        else:
            u = tl.load(PREC + kc, mask=kmask, other=0.0)[None, :, None] * w
        D += tl.sum(w * u, 2)
        uu += tl.sum(u * u, 2)
        ww += tl.sum(w * w, 2)
        if WITH_C:
            if KIND == _FULL:
                uc = tl.load(U + rows[:, None] * su + c[:, None] * d + dd[None, :], mask=zmask, other=0.0)
            else:
                wc = z - tl.load(MU + c[:, None] * d + dd[None, :], mask=zmask, other=0.0)
                if KIND == _DIAG:
                    uc = tl.load(PREC + c[:, None] * d + dd[None, :], mask=zmask, other=0.0) * wc
                else:
                    uc = tl.load(PREC + c, mask=rmask, other=0.0)[:, None] * wc
            diff = uc[:, None, :] - u
            gg += tl.sum(diff * diff, 2)
    return D, uu, ww, gg


@triton.jit
def _pair_radius(q, g, lam):
    """Largest r with ``q − g r − λr²/2 ≥ 0``, cancellation-free; 0 for q ≤ 0 or NaN."""
    qp = tl.maximum(q, 0.0)
    den = g + tl.sqrt(g * g + 2.0 * lam * qp)
    r = tl.where(den > 0, 2.0 * qp / den, tl.where(den == 0, float("inf"), 0.0))
    return tl.where(q > 0, r, 0.0)


@triton.jit
def _error_terms(un2, wn2, zm, pabs, nu, u, g_, S, tiny_u, tiny_d, three_u):
    """``(Δ, e)`` of the reference: bounds on ‖û − u‖ and |D̂ − D| from the computed
    squared norms (float64)."""
    un = tl.sqrt(un2) + nu
    wn = tl.sqrt(wn2) + nu
    delta = g_ * pabs * zm + u * un + tiny_u
    epsw = three_u * zm
    e = S * (g_ * wn * un + epsw * un + (wn + epsw) * delta) + tiny_d
    return delta, e


@triton.jit
def _perclass_kernel(Z, szb, szd, U, su, MU, PREC, KAPPA, PABS, MUN, LAM, CST, PRED, RAD, R, d, K,
                     KIND: tl.constexpr, NEED_RADIUS: tl.constexpr, FP_SOUND: tl.constexpr,
                     BM: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """Prediction and sound radius for a tile of BM rows, classes in blocks of BC; see the
    module docstring. CST (float64): the constants of :func:`_kernel_constants`, in order."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < R
    kc0 = tl.arange(0, BC).to(tl.int64)
    best = tl.full([BM], float("-inf"), tl.float64)
    c = tl.zeros([BM], dtype=tl.int64)
    ok = tl.full([BM], 1, tl.int32)
    Dc = tl.zeros([BM], dtype=tl.float64)
    uuc = tl.zeros([BM], dtype=tl.float64)
    wwc = tl.zeros([BM], dtype=tl.float64)
    # Pass 1: scores of every class, the argmax and the winner's terms.
    for k0 in range(0, K, BC):
        kc = k0 + kc0
        kmask = kc < K
        D, uu, ww, _ = _block_terms(Z, szb, szd, rows, rmask, U, su, MU, PREC, kc, kmask, c, d,
                                    KIND, False, BM, BC, BD)
        D64 = D.to(tl.float64)
        f = tl.load(KAPPA + kc, mask=kmask, other=0.0)[None, :] - 0.5 * D64
        fin = tl.where(kmask[None, :], (tl.abs(f) < float("inf")).to(tl.int32), 1)
        ok = tl.minimum(ok, tl.min(fin, 1))
        fv = tl.where(kmask[None, :], f, float("-inf"))
        tm = tl.max(fv, 1)
        ti = tl.min(tl.where((fv == tm[:, None]) & kmask[None, :], kc[None, :], 1 << 62), 1)
        sel = kc[None, :] == ti[:, None]
        upd = tm > best  # strict: an earlier block keeps ties (lowest index wins)
        best = tl.where(upd, tm, best)
        c = tl.where(upd, ti, c)
        Dc = tl.where(upd, tl.sum(tl.where(sel, D64, 0.0), 1), Dc)
        uuc = tl.where(upd, tl.sum(tl.where(sel, uu.to(tl.float64), 0.0), 1), uuc)
        wwc = tl.where(upd, tl.sum(tl.where(sel, ww.to(tl.float64), 0.0), 1), wwc)
    good = ok > 0
    c = tl.where(good, c, 0)
    tl.store(PRED + rows, tl.where(good, c, -1), mask=rmask)
    if NEED_RADIUS:
        u = tl.load(CST + _U)
        g_ = tl.load(CST + _G)
        S = tl.load(CST + _S)
        nu = tl.load(CST + _NU)
        tiny_u = tl.load(CST + _TINY_U)
        tiny_d = tl.load(CST + _TINY_D)
        three_u = tl.load(CST + _THREE_U)
        half_S = tl.load(CST + _HALF_S)
        four_u64 = tl.load(CST + _FOUR_U64)
        one_u = tl.load(CST + _ONE_U)
        if FP_SOUND:
            dd0 = tl.arange(0, BD).to(tl.int64)
            zss = tl.zeros([BM], dtype=Z.dtype.element_ty)
            for d0 in range(0, d, BD):
                dd = d0 + dd0
                z = tl.load(Z + rows[:, None] * szb + dd[None, :] * szd,
                            mask=rmask[:, None] & (dd < d)[None, :], other=0.0)
                zss += tl.sum(z * z, 1)
            zn = norm_up(zss, CST, _NORM)
            delta_c, e_c = _error_terms(uuc, wwc, zn + tl.load(MUN + c), tl.load(PABS + c),
                                        nu, u, g_, S, tiny_u, tiny_d, three_u)
            mag_c = tl.abs(tl.load(KAPPA + c)) + tl.abs(Dc)
        # Pass 2: every j against c, folded into a running min.
        r = tl.full([BM], float("inf"), tl.float64)
        for k0 in range(0, K, BC):
            kc = k0 + kc0
            kmask = kc < K
            D, uu, ww, gg = _block_terms(Z, szb, szd, rows, rmask, U, su, MU, PREC, kc, kmask, c, d,
                                         KIND, True, BM, BC, BD)
            D64 = D.to(tl.float64)
            kap = tl.load(KAPPA + kc, mask=kmask, other=0.0)[None, :]
            q = best[:, None] - (kap - 0.5 * D64)
            G = tl.sqrt(gg.to(tl.float64))
            if FP_SOUND:
                zm = zn[:, None] + tl.load(MUN + kc, mask=kmask, other=0.0)[None, :]
                delta, e = _error_terms(uu.to(tl.float64), ww.to(tl.float64), zm,
                                        tl.load(PABS + kc, mask=kmask, other=0.0)[None, :],
                                        nu, u, g_, S, tiny_u, tiny_d, three_u)
                mag = tl.abs(kap) + tl.abs(D64)
                q = q - half_S * (e_c[:, None] + e) - four_u64 * (mag_c[:, None] + mag)
                G = S * ((G + nu) * one_u + delta_c[:, None] + delta)
            lam = tl.load(LAM + c[:, None] * K + kc[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            rj = _pair_radius(q, G, lam)
            rj = tl.where(kmask[None, :] & (kc[None, :] != c[:, None]), rj, float("inf"))
            r = tl.minimum(r, tl.min(rj, 1))
        if FP_SOUND:
            r = r * tl.load(CST + _DOWN8)
        tl.store(RAD + rows, tl.where(good & (r == r), r, 0.0), mask=rmask)


def perclass_certify(Z: torch.Tensor, p, lam: torch.Tensor | None, fp: PerClassErrorModel | None):
    """Per-class certify on the GPU (or the Triton interpreter); see the module docstring.

    Z (B, d) any strides, in ``p``'s working dtype; ``lam`` (K, K) float64 or None; ``fp``
    the rounding-error model (:class:`gmfast._fp.PerClassErrorModel`) or None
    (``fp_sound=False``). Returns pred (B,) int64 and radius (B,) float64 (None when
    ``lam`` is None).
    """
    kind = int(CovKind.of(p.kind))
    check_device(Z, p.mu, p.prec, p.prec_mu, p.kappa, p.prec_abs_up, p.mu_norm_up, lam)
    check_dtype(Z, p.mu, p.prec, p.prec_mu)
    check_f64(p.kappa, p.prec_abs_up, p.mu_norm_up, lam)
    B, d = Z.shape
    K = p.mu.shape[0]
    need_radius = lam is not None
    fp_sound = fp is not None and need_radius
    dev = Z.device
    pred = torch.empty(B, dtype=torch.int64, device=dev)
    radius = torch.empty(B, dtype=torch.float64, device=dev) if need_radius else None
    if B == 0:
        return pred, radius
    cst = constants(fp.consts if fp is not None else perclass_constants(d, Z.dtype), dev)
    mu, prec = p.mu.contiguous(), p.prec.contiguous()
    kappa, pabs, mun = p.kappa.contiguous(), p.prec_abs_up.contiguous(), p.mu_norm_up.contiguous()
    lam_ = lam.contiguous() if need_radius else cst
    if need_radius and lam_.shape != (K, K):
        raise ValueError(f"lam: expected ({K}, {K}); got {tuple(lam_.shape)}")
    if interpreting():
        BM, BC, BD, warps = pow2(B, 16, 64), pow2(K, 2, 32), pow2(d, 16, 32), 4
    else:
        BM, BC, BD, warps = 16, 8, 16, 4

    def launch(Zc, U, n, pred_c, rad_c):
        with launch_context():
            _perclass_kernel[(triton.cdiv(n, BM),)](
                Zc, Zc.stride(0), Zc.stride(1), U, U.stride(0) if U.dim() == 2 else 0, mu, prec, kappa, pabs,
                mun, lam_, cst, pred_c, rad_c, n, d, K, KIND=kind, NEED_RADIUS=need_radius, FP_SOUND=fp_sound,
                BM=BM, BC=BC, BD=BD, num_warps=warps, enable_fp_fusion=FP_FUSION)

    if kind != CovKind.FULL:
        launch(Z, cst, B, pred, radius if need_radius else cst)
        return pred, radius
    # full: û for a chunk of rows = Z_chunk · [P_1; …; P_K]ᵀ − [P_1μ_1; …] (negation is exact)
    Pst = prec.reshape(K * d, d)
    neg_pm = -p.prec_mu.reshape(K * d).contiguous()
    rows = chunk_rows(K * d, 64, B)
    U = torch.empty(rows, K * d, dtype=Z.dtype, device=dev)
    for r0 in range(0, B, rows):
        n = min(rows, B - r0)
        Zc = Z[r0:r0 + n]
        gemm_nt_bias(Zc, Pst, neg_pm, U[:n])
        launch(Zc, U, n, pred[r0:], radius[r0:] if need_radius else cst)
    return pred, radius
