"""Triton kernel for randomized-smoothing counts with a tied head (DESIGN 1.6, kernel 4).

``smoothing_counts(Z, owner, num_inputs, A, beta)``: for noisy latents ``Z (N, d)`` the
tied head's class ``argmax_k (a_kᵀz + β_k)`` (lowest index on ties, as ``torch.argmax``),
added to a per-input histogram ``counts[owner[n], class] += 1``. Logits live only in
registers: each row tile runs over K in tiles with a running argmax, then one atomic add
per row. A row with a non-finite logit (NaN/Inf input, overflow) is not a class and is
not counted, as ``head.predict`` returns ``-1`` for it and
:func:`gmfast.smoothing._count` drops ``-1``; so is a row whose owner is out of range.

The same arithmetic as the head's prediction in its working dtype: ``fl(Z Aᵀ) + β`` with
IEEE products (no TF32). Counting needs no error bound (the smoothing certificate is
statistical), but a different summation order can flip the argmax at exact near-ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gmfast.triton.tied import FP_FUSION, check_device, check_dtype, interpreting, launch_context, pow2, tile_argmax


@triton.jit
def _count_kernel(Z, szb, szd, A, BETA, OWNER, COUNTS, N, d, K, num_inputs,
                  BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < N
    kk0 = tl.arange(0, BK).to(tl.int64)
    dd0 = tl.arange(0, BD).to(tl.int64)
    T = Z.dtype.element_ty
    best = tl.full([BM], float("-inf"), T)
    c = tl.zeros([BM], dtype=tl.int64)
    ok = tl.full([BM], 1, tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + kk0
        kmask = ks < K
        acc = tl.zeros([BM, BK], dtype=T)
        for d0 in range(0, d, BD):
            dd = d0 + dd0
            dmask = dd < d
            z = tl.load(Z + rows[:, None] * szb + dd[None, :] * szd, mask=rmask[:, None] & dmask[None, :], other=0.0)
            at = tl.load(A + ks[None, :] * d + dd[:, None], mask=dmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(z, at, acc, input_precision="ieee", out_dtype=T)
        lg = acc + tl.load(BETA + ks, mask=kmask, other=0.0)[None, :]
        tm, ti, tok = tile_argmax(lg, ks, kmask)
        upd = tm > best  # strict: an earlier tile keeps ties
        best = tl.where(upd, tm, best)
        c = tl.where(upd, ti, c)
        ok = tl.minimum(ok, tok)
    own = tl.load(OWNER + rows, mask=rmask, other=0)
    valid = rmask & (ok > 0) & (own >= 0) & (own < num_inputs)
    tl.atomic_add(COUNTS + own * K + c, tl.full([BM], 1, tl.int64), mask=valid)


def smoothing_counts(Z: torch.Tensor, owner: torch.Tensor, num_inputs: int, A: torch.Tensor,
                     beta: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input class histogram of a tied head's predictions on noisy latents.

    Parameters
    ----------
    Z : Tensor (N, d), float32 or float64, any strides
        Noisy latents (the head's working dtype).
    owner : LongTensor (N,)
        Input index ``0..num_inputs−1`` of each row.
    num_inputs : int
    A, beta : Tensor (K, d), (K,) in Z's dtype
        The tied head's linear logits ``ℓ = Z Aᵀ + β`` (``TiedParams.A``/``.beta`` of the
        working copy).
    counts : LongTensor (num_inputs, K), optional
        Accumulate into this histogram instead of a fresh zero one.

    Returns
    -------
    LongTensor (num_inputs, K) on Z's device.
    """
    check_device(Z, owner, A, beta, counts)
    check_dtype(Z, A, beta)
    N, d = Z.shape
    K = A.shape[0]
    if A.shape != (K, d) or beta.shape != (K,) or owner.shape != (N,):
        raise ValueError(f"expected A ({K}, {d}), beta ({K},), owner ({N},); got "
                         f"{tuple(A.shape)}, {tuple(beta.shape)}, {tuple(owner.shape)}")
    if owner.dtype != torch.int64:
        raise TypeError(f"owner must be int64; got {owner.dtype}")
    if counts is None:
        counts = torch.zeros(num_inputs, K, dtype=torch.int64, device=Z.device)
    elif counts.shape != (num_inputs, K) or counts.dtype != torch.int64 or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous int64 ({num_inputs}, {K}) tensor")
    if N == 0:
        return counts
    if interpreting():
        BM, BK, BD, warps = pow2(N, 16, 64), pow2(K, 16, 128), pow2(d, 16, 128), 4
    else:
        BM, BK, BD, warps = 64, pow2(K, 16, 64), 32, 4
    with launch_context():
        _count_kernel[(triton.cdiv(N, BM),)](
            Z, Z.stride(0), Z.stride(1), A.contiguous(), beta.contiguous(), owner.contiguous(), counts, N, d, K,
            num_inputs, BM=BM, BK=BK, BD=BD, num_warps=warps, enable_fp_fusion=FP_FUSION)
    return counts
