"""Reference backend: the certify contracts in pure PyTorch (DESIGN 1.3–1.5).

One backend on the same contracts as ``cpu``, ``triton`` and ``cuda``
(:mod:`gmfast.ops.certify`), and the oracle every kernel is tested against
(:func:`tied_oracle`, :func:`perclass_oracle` build the tables from the parameters first).
It favours clarity over speed, but it is blocked over rows so its memory stays bounded for
any batch size, and every radius it returns is sound: the rounding-error terms are those of
the docstrings of :func:`tied_certify`, :func:`perclass_certify` and
:func:`multiproto_certify`, with the constants of :mod:`gmfast._fp` (passed in the error
model, as to every backend). Runs on any device torch runs on.
"""

from __future__ import annotations

import math

import torch

from gmfast._fp import (PERCLASS_FIELDS, TIED_FIELDS, PerClassErrorModel, TiedErrorModel, norm_upper,
                        perclass_error_model)
from gmfast.params import (BLOCK_ELEMS, PerClassParams, TiedParams, cholesky_tables, curvature_table,
                           quadratic_terms, tied_denominators, tied_error_model)


def available():
    return True, "ok"


# --------------------------------------------------------------------------------------
# Tied
# --------------------------------------------------------------------------------------


def tied_epilogue(logits: torch.Tensor, z_norm_up: torch.Tensor | None, inv: torch.Tensor,
                  fp: TiedErrorModel | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and radius from a block of logits (the O(K)-per-row epilogue), float64.

    ``R = min_{j≠c} (m̂_cj − E_cj) · inv_cj`` with ``inv_cj ≤ 1/‖a_c − a_j‖_q`` and
    ``m̂_cj = ℓ̂_c − ℓ̂_j``; with an error model ``fp`` (not None) ``E_cj`` bounds
    ``|m̂_cj − m_cj|``:
    ``(e_c + e_j)(1 + 8u₆₄) + 2u₆₄|m̂_cj|`` where ``e_k = α_k‖z‖ + ε_k`` (the 8u₆₄ covers
    the float64 operations forming ``e``; ``2u₆₄|m̂|`` the float64 subtraction). The final
    product is deflated by ``1 − 8u₆₄``: the subtraction and product add ≤ 2 roundings. The
    factors are ``fp.consts`` (:func:`gmfast._fp.tied_constants`), as in every backend.
    A row whose logits overflowed gets radius 0. The min runs over **all** ``j``.

    logits (b, K) any float dtype; z_norm_up (b,) float64; inv (K, K) float64.
    Returns pred (b,) int64 and radius (b,) float64.
    """
    pred = logits.argmax(1)
    L = logits.to(torch.float64)
    m = L.gather(1, pred[:, None]) - L
    if fp is not None:
        c = dict(zip(TIED_FIELDS, fp.consts))
        e = z_norm_up[:, None] * fp.alpha[None, :] + fp.eps[None, :]
        E = (e.gather(1, pred[:, None]) + e) * c["up4"] + c["two_u64"] * m.abs()
        num = m - E
    else:
        num = m
    ratio = torch.where(num > 0, num * inv[pred], torch.zeros_like(num))
    ratio.scatter_(1, pred[:, None], math.inf)
    radius = ratio.amin(1)
    if fp is not None:
        radius = radius * c["down4"]
    finite = torch.isfinite(L).all(1)
    radius = torch.where(finite, radius, torch.zeros_like(radius))
    pred = torch.where(finite, pred, torch.full_like(pred, -1))
    return pred, radius


def tied_certify(Z: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, inv: torch.Tensor | None,
                 fp: TiedErrorModel | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tied contract (:mod:`gmfast.ops.certify`): exact certified radius of the linear
    classifier ``ℓ = zAᵀ + β`` (DESIGN 1.3), sound in floating point.

    For ``ℓ_k = a_kᵀz + β_k`` the decision region of ``c`` is the polyhedron
    ``{m_cj ≥ 0 ∀j}``; the distance from ``z`` to the half-space ``m_cj < 0`` in norm ``p`` is
    ``m_cj(z) / ‖a_c − a_j‖_q`` (Hölder, attained), and the distance to the complement of a
    polyhedron is the min over its facets: this is the exact radius. With an error model the
    computed margins are lowered by a rigorous bound on their rounding error and ``inv`` is a
    lower bound on the reciprocal norms (:func:`gmfast.params.tied_denominators`,
    :func:`gmfast.params.tied_error_coefficients`, :func:`tied_epilogue`): the result is ≤
    the exact radius.

    Z (B, d), A (K, d), beta (K,) in the working dtype; inv (K, K) float64 or None
    (predictions only); fp the error model or None (``fp_sound=False``). Returns pred (B,)
    int64 and radius (B,) float64 (``None`` without ``inv``).
    """
    # one memory layout: BLAS picks its summation order by layout, so a strided Z would get
    # (equally sound but) different radii from a contiguous copy of the same values
    Z = Z.contiguous()
    B, d = Z.shape
    K = A.shape[0]
    need_radius = inv is not None
    if need_radius:
        inv = inv.to(Z.device)
        if fp is not None:
            fp = fp._replace(alpha=fp.alpha.to(Z.device), eps=fp.eps.to(Z.device))
    # Outputs are allocated once and filled block by block: small per-block result tensors
    # allocated between the big temporaries would pin glibc's heap and make the resident
    # set grow with B (measured: 2.8 GB at B = 200,000, K = 1000), although nothing leaks.
    bs = max(1, BLOCK_ELEMS // max(K, 1))
    pred = torch.empty(B, dtype=torch.int64, device=Z.device)
    radius = torch.empty(B, dtype=torch.float64, device=Z.device) if need_radius else None
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        logits = torch.addmm(beta, Zb, A.T)
        if not need_radius:
            finite = torch.isfinite(logits).all(1)
            pred[i:i + bs] = torch.where(finite, logits.argmax(1), torch.full_like(finite, -1, dtype=torch.int64))
            continue
        zn = norm_upper(Zb) if fp is not None else None
        pred[i:i + bs], radius[i:i + bs] = tied_epilogue(logits, zn, inv, fp)
    return pred, radius


def tied_oracle(Z: torch.Tensor, p: TiedParams, norm, *, fp_sound: bool = True,
                need_radius: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`tied_certify` with the tables of ``p`` (the oracle tests and benchmarks call).

    Z (B, d) in the working dtype of ``p``; ``norm`` a canonical norm.
    """
    inv = fp = None
    if need_radius:
        inv_hat, inv_lo = tied_denominators(p, norm)
        inv = inv_lo if fp_sound else inv_hat
        fp = tied_error_model(p, Z.shape[1], Z.dtype) if fp_sound else None
    return tied_certify(Z, p.A, p.beta, inv, fp)


# --------------------------------------------------------------------------------------
# Per-class covariances
# --------------------------------------------------------------------------------------


def perclass_certify(Z: torch.Tensor, p: PerClassParams, lam: torch.Tensor | None, fp: PerClassErrorModel | None,
                     *, form: str = "precision"):
    """The per-class contract (:mod:`gmfast.ops.certify`): sound ℓ2 radius for per-class
    covariances (DESIGN 1.4).

    ``q_cj(z) = f_c − f_j`` is quadratic, so ``q_cj(z+δ) = q + gᵀδ + ½δᵀHδ`` exactly with
    ``g = P_j(z−μ_j) − P_c(z−μ_c) = u_j − u_c`` and ``H = P_j − P_c``; for ``‖δ‖ ≤ r``,
    ``q_cj(z+δ) ≥ q − ‖g‖r − ½λ_cj r²`` with ``λ_cj = max(0, λ_max(P_c − P_j))``, positive for
    every ``r`` below :func:`perclass_radius`. Every ``j`` stays below ``c`` on the ball of
    the smallest such ``r``: the min runs over all classes.

    Floating point (``fp_sound``), working precision ``T`` with unit roundoff ``u``,
    ``γ = γ_{d+4}(u)``, computed quantities hatted, ``ρ_k ≥ ‖|P_k|‖₂``:

    * ``‖û_k − u_k‖ ≤ Δ_k = γ ρ_k (‖z‖ + ‖μ_k‖) + u‖û_k‖`` (the GEMM ``P_k z`` and the
      precomputed ``P_k μ_k``, both with parameters rounded to ``T``, then one subtraction);
    * ``ŵ_k = fl(z − μ_k)``: ``‖ŵ_k − w_k‖ ≤ ε_k = 3u(‖z‖ + ‖μ_k‖)``;
    * ``|D̂_k − D_k| ≤ e_k = γ‖ŵ‖‖û‖ + ε_k‖û‖ + (‖ŵ‖ + ε_k)Δ_k`` with ``D_k = w_kᵀu_k``;
    * ``‖g‖ ≤ ‖fl(û_c − û_j)‖(1 + u) + Δ_c + Δ_j``;
    * computed norms are within ``γ_{d+1}`` of exact ones: every bound is multiplied by
      ``S = 1 + 4γ`` (products of at most three norms);
    * underflow: products may add ``η`` absolutely (Higham eq. 2.8), so each computed norm is
      raised by ``ν = √(2(d+4)η)`` (its squares may have underflowed), ``Δ_k`` by
      ``2(d+4)^{3/2}η`` and ``e_k`` by ``2(d+4)η``: negligible, but unconditional;
    * ``q`` is formed in float64 from ``κ`` and ``D̂``: lowered by ``½S(e_c + e_j)`` and by
      ``4u₆₄(|κ_c| + |κ_j| + |D̂_c| + |D̂_j|)`` for its own roundings;
    * ``λ⁺`` from :func:`gmfast.params.curvature_table` (``lam``). The radius is monotone (up in ``q``, down in
      ``‖g‖`` and ``λ``), so the pessimistic inputs give a lower bound; it is deflated by
      ``1 − 16u₆₄`` for its float64 evaluation. Every factor is ``fp.consts``
      (:func:`gmfast._fp.perclass_constants`), the same values every backend reads.

    ``form="cholesky"`` (full covariances): the margins from ``‖R_k(z−μ_k)‖²`` instead, as the
    CPU kernel computes them (:func:`_perclass_certify_cholesky`); ``"precision"`` (default)
    is the form above, that of the Triton and CUDA kernels.

    Z (B, d) in ``p``'s working dtype; ``lam`` (K, K) float64 or None (predictions only);
    ``fp`` the error model or None (``fp_sound=False``). Returns pred (B,) int64, radius
    (B,) float64 or None.
    """
    if form not in ("precision", "cholesky"):
        raise ValueError(f"form must be 'precision' or 'cholesky'; got {form!r}")
    Z = Z.contiguous()  # one memory layout, one summation order (see tied_certify)
    if form == "cholesky" and p.kind == "full":
        return _perclass_certify_cholesky(Z, p, lam, fp)
    B, d = Z.shape
    K = p.K
    fp_sound, need_radius = fp is not None, lam is not None
    if fp_sound:
        cst = dict(zip(PERCLASS_FIELDS, fp.consts))
        u, g_, S, nu, tiny_u, tiny_d = (cst[n] for n in ("u", "g", "S", "nu", "tiny_u", "tiny_d"))
    if need_radius:
        lam_tab = lam.to(Z.device)
    bs = max(1, BLOCK_ELEMS // max(1, K * d))
    out_pred = torch.empty(B, dtype=torch.int64, device=Z.device)  # filled in place: see tied_certify
    out_radius = torch.empty(B, dtype=torch.float64, device=Z.device) if need_radius else None
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        Wr, U = quadratic_terms(Zb, p)
        D = (Wr * U).sum(-1).double()
        f = p.kappa[None, :] - 0.5 * D
        pred = f.argmax(1)
        finite = torch.isfinite(f).all(1)
        if not need_radius:
            out_pred[i:i + bs] = torch.where(finite, pred, torch.full_like(pred, -1))
            continue
        ar = torch.arange(Zb.shape[0], device=Z.device)
        Uc = U[ar, pred]
        G = torch.linalg.vector_norm((U - Uc[:, None, :]).double(), dim=-1)
        q = f.gather(1, pred[:, None]) - f
        lam_c = lam_tab[pred]
        if fp_sound:
            zn = norm_upper(Zb)[:, None]
            un = torch.linalg.vector_norm(U.double(), dim=-1) + nu
            wn = torch.linalg.vector_norm(Wr.double(), dim=-1) + nu
            zm = zn + p.mu_norm_up[None, :]
            delta = g_ * p.prec_abs_up[None, :] * zm + u * un + tiny_u
            epsw = cst["three_u"] * zm
            e = S * (g_ * wn * un + epsw * un + (wn + epsw) * delta) + tiny_d
            ec = e.gather(1, pred[:, None])
            kap = p.kappa[None, :]
            mag = kap.abs() + D.abs()
            q = q - cst["half_S"] * (ec + e) - cst["four_u64"] * (mag.gather(1, pred[:, None]) + mag)
            G = S * ((G + nu) * cst["one_u"] + delta.gather(1, pred[:, None]) + delta)
        out_radius[i:i + bs] = _min_pair_radius(q, G, lam_c, pred, finite, cst["down8"] if fp_sound else None)
        out_pred[i:i + bs] = torch.where(finite, pred, torch.full_like(pred, -1))
    return out_pred, out_radius


def perclass_oracle(Z: torch.Tensor, p: PerClassParams, *, fp_sound: bool = True, need_radius: bool = True,
                    curvature: str = "auto", form: str = "precision"):
    """:func:`perclass_certify` with the tables of ``p`` (the oracle tests and benchmarks
    call); ``form="cholesky"`` is the oracle of the CPU kernel for full covariances."""
    if form not in ("precision", "cholesky"):
        raise ValueError(f"form must be 'precision' or 'cholesky'; got {form!r}")
    lam = fp = None
    if need_radius:
        lam_hat, lam_up, _ = curvature_table(p, curvature)
        lam = lam_up if fp_sound else lam_hat
        fp = perclass_error_model(Z.shape[1], Z.dtype) if fp_sound else None
    return perclass_certify(Z, p, lam, fp, form=form)


def _perclass_certify_cholesky(Z: torch.Tensor, p: PerClassParams, lam_tab: torch.Tensor | None,
                               fp: PerClassErrorModel | None):
    """:func:`perclass_certify` with the margins from the Cholesky form (``form="cholesky"``).

    ``D̂_k = fl(Σ ŷ_i²)`` with ``ŷ = fl(fl(R̃_k z) − b̃_k)`` (``R̃, b̃``: the tables rounded to
    the working precision). With ``ρ, σ, ε`` of :class:`CholeskyTables`, ``γ = γ_{d+4}(u)``,
    ``ζ_k = ‖z‖ + ‖μ_k‖ ≥ ‖z − μ_k‖``:

    * ``‖ŷ‖ ≤ ŷn = √((D̂ + 2(d+4)η)/(1 − γ_d))`` (a sum of ``d`` non-negative terms in any
      order has relative error ``≤ γ_d``; ``η``: underflow of the squares);
    * ``‖ŷ − R w‖ ≤ Δ = γ ρ ζ + u ŷn + 2(d+4)^{3/2}η`` (the product with ``R̃ = R(1+δ)``, the
      float64 ``b`` rounded once, one subtraction: the same shape as the precision form);
    * ``D = wᵀPw = ‖Rw‖² − wᵀEw``, so
      ``|D̂ − D| ≤ e = γ_d ŷn² + Δ(2ŷn + Δ) + ε ζ² + 2(d+4)η``;
    * ``‖u_k‖ = ‖P_k w‖ ≤ σ‖Rw‖ + ε‖w‖ ≤ ub_k = σ(ŷn + Δ) + ε ζ``: with it every pair has the
      cheap bound ``‖g_cj‖ ≤ ub_c + ub_j``.

    ``‖g_cj‖`` itself comes from ``û = fl(P̃z − P̃μ)`` as in the precision form (bound
    ``G``), and the radius of a pair uses ``min(G, S(ub_c' + ub_j))`` with
    ``ub_c' = min(ub_c, ‖û_c‖ + ν + Δ_c)``: both are upper bounds on ``‖g_cj‖``, so the min
    is one. The CPU kernel computes ``û`` only for the pairs that can be the minimum (those
    whose radius with the cheap bound is below the best exact one); its result is this
    function's. Predictions are the argmax of ``κ − ½D̂``.
    """
    B, d = Z.shape
    K = p.K
    T = Z.dtype
    fp_sound, need_radius = fp is not None, lam_tab is not None
    if fp_sound:
        cst = dict(zip(PERCLASS_FIELDS, fp.consts))
        u, g_, gd, S, nu, tiny_u, tiny_d, up4 = (cst[n] for n in ("u", "g", "gd", "S", "nu", "tiny_u", "tiny_d",
                                                                   "up4"))
    tab = cholesky_tables(p)
    work = p.cholesky.get("work")
    if work is None:
        work = p.cholesky["work"] = (tab.R.to(device=Z.device, dtype=T), tab.b.to(device=Z.device, dtype=T))
    Rt, bt = work
    if need_radius:
        lam_tab = lam_tab.to(Z.device)
    rho, sig, eps = (t.to(Z.device) for t in (tab.rho, tab.sigma, tab.eps))
    bs = max(1, BLOCK_ELEMS // max(1, K * d))
    out_pred = torch.empty(B, dtype=torch.int64, device=Z.device)
    out_radius = torch.empty(B, dtype=torch.float64, device=Z.device) if need_radius else None
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        Y = torch.einsum("bd,ked->bke", Zb, Rt) - bt[None]
        D = Y.square().sum(-1).double()
        f = p.kappa[None, :] - 0.5 * D
        pred = f.argmax(1)
        finite = torch.isfinite(f).all(1)
        out_pred[i:i + bs] = torch.where(finite, pred, torch.full_like(pred, -1))
        if not need_radius:
            continue
        ar = torch.arange(Zb.shape[0], device=Z.device)
        _, U = quadratic_terms(Zb, p)
        Uc = U[ar, pred]
        G = torch.linalg.vector_norm((U - Uc[:, None, :]).double(), dim=-1)
        q = f.gather(1, pred[:, None]) - f
        lam_c = lam_tab[pred]
        un = torch.linalg.vector_norm(U.double(), dim=-1)
        if fp_sound:
            zm = norm_upper(Zb)[:, None] + p.mu_norm_up[None, :]
            yn = torch.sqrt((D + tiny_d) / (1.0 - gd)) * up4
            dy = g_ * rho[None] * zm + u * yn + tiny_u
            e = S * (gd * yn * yn + dy * (2.0 * yn + dy) + eps[None] * zm * zm + tiny_d)
            ub = (sig[None] * (yn + dy) + eps[None] * zm) * up4
            mag = p.kappa[None, :].abs() + D.abs()
            q = (q - cst["half_S"] * (e.gather(1, pred[:, None]) + e)
                 - cst["four_u64"] * (mag.gather(1, pred[:, None]) + mag))
            dp = g_ * p.prec_abs_up[None, :] * zm + u * (un + nu) + tiny_u
            G = S * ((G + nu) * cst["one_u"] + dp.gather(1, pred[:, None]) + dp)
            ubc = torch.minimum(ub.gather(1, pred[:, None]), (un + nu + dp).gather(1, pred[:, None]) * up4)
            G = torch.minimum(G, S * (ubc + ub))
        else:
            ub = sig[None] * D.clamp_min(0).sqrt()
            ubc = torch.minimum(ub.gather(1, pred[:, None]), un.gather(1, pred[:, None]))
            G = torch.minimum(G, ubc + ub)
        out_radius[i:i + bs] = _min_pair_radius(q, G, lam_c, pred, finite, cst["down8"] if fp_sound else None)
    return out_pred, out_radius


def _min_pair_radius(q, G, lam, pred, finite, down):
    """``min_{j≠c} r_cj`` per row (times ``down``, the deflation for its float64 evaluation,
    when given), 0 for rows with non-finite logits or a NaN."""
    r = perclass_radius(q, G, lam)
    r.scatter_(1, pred[:, None], math.inf)
    radius = r.amin(1)
    if down is not None:
        radius = radius * down
    return torch.where(finite & ~torch.isnan(radius), radius, torch.zeros_like(radius))


def perclass_radius(q: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Largest ``r`` with ``q − g r − ½ λ r² ≥ 0``: ``2q / (g + √(g² + 2λq))``, float64.

    Written without cancellation (the textbook root ``(−g + √(g² + 2λq))/λ`` loses all
    digits when ``λq ≪ g²``). ``q ≤ 0`` gives 0; ``g = λ = 0`` gives ``+inf``.
    """
    qp = q.clamp_min(0)
    den = g + torch.sqrt(g * g + 2.0 * lam * qp)
    r = torch.where(den > 0, 2.0 * qp / den, torch.full_like(q, math.inf))
    return torch.where(q > 0, r, torch.zeros_like(q))


# --------------------------------------------------------------------------------------
# Multi-prototype (tied components, several per class)
# --------------------------------------------------------------------------------------


def multiproto_epilogue(logits: torch.Tensor, z_norm_up: torch.Tensor | None, inv: torch.Tensor,
                        fp: TiedErrorModel | None, comp_class: torch.Tensor, class_table: torch.Tensor):
    """Prediction and sound radius of the multi-prototype classifier from component logits.

    For the winning component's class ``c`` and each component ``m`` of ``c``:
    ``r_m = min_{i : class(i) ≠ c} (m̂_{m,i} − E_{m,i}) · inv[m, i]`` (0 if any numerator is
    ≤ 0), ``R = max_m r_m`` (see :mod:`gmfast.multiproto`). ``E`` bounds the rounding error
    of the margin as in :func:`tied_epilogue`, with the same constants (``fp.consts``);
    without ``fp`` it is 0 (the radius of the computed logits, not sound).

    Parameters
    ----------
    logits : (b, C) any float dtype, component logits ``ℓ̂``
    z_norm_up : (b,) float64 upper bounds on ``‖z‖₂``, or None
    inv : (C, C) float64, ``≤ 1/‖a_i − a_j‖_q`` (``+inf`` where equal)
    fp : the tied error model of the components, or None
    comp_class : (C,) int64, the class of each component
    class_table : (K, M) int64, the components of each class, padded with -1

    Returns
    -------
    pred (b,) int64 class (-1 where a logit is not finite), radius (b,) float64,
    component (b,) int64 the component ``m`` attaining the radius (the winner when R = 0).
    """
    win = logits.argmax(1)
    cls = comp_class[win]
    L = logits.to(torch.float64)
    cand = class_table[cls]  # (b, M)
    valid = cand >= 0
    cand = torch.where(valid, cand, win[:, None])  # padding repeats the winner: harmless under max
    m = L.gather(1, cand)[:, :, None] - L[:, None, :]  # (b, M, C)
    if fp is not None:
        c = dict(zip(TIED_FIELDS, fp.consts))
        e = z_norm_up[:, None] * fp.alpha[None, :] + fp.eps[None, :]  # (b, C)
        E = (e.gather(1, cand)[:, :, None] + e[:, None, :]) * c["up4"] + c["two_u64"] * m.abs()
        num = m - E
    else:
        num = m
    ratio = torch.where(num > 0, num * inv[cand], torch.zeros_like(num))
    same = comp_class[None, None, :] == cls[:, None, None]
    ratio = ratio.masked_fill(same, math.inf)
    r_m = ratio.amin(2)  # (b, M): distance to the complement of each P_m
    radius, best = r_m.max(1)
    comp = cand.gather(1, best[:, None])[:, 0]
    comp = torch.where(radius > 0, comp, win)
    if fp is not None:
        radius = radius * c["down4"]
    finite = torch.isfinite(L).all(1)
    radius = torch.where(finite, radius, torch.zeros_like(radius))
    pred = torch.where(finite, cls, torch.full_like(cls, -1))
    return pred, radius, comp


def multiproto_certify(Z: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, inv: torch.Tensor,
                       fp: TiedErrorModel | None, comp_class: torch.Tensor, class_table: torch.Tensor):
    """The multi-prototype contract: component logits ``zAᵀ + β`` (A (C, d), β (C,) in the
    working dtype of Z (B, d)), then :func:`multiproto_epilogue`, blocked over rows (memory
    ``O(block · M · C)``). ``comp_class`` (C,), ``class_table`` (K, M) on Z's device.

    Returns pred (B,) int64, radius (B,) float64, component (B,) int64.
    """
    Z = Z.contiguous()  # one layout, one summation order (see tied_certify)
    B = Z.shape[0]
    C = A.shape[0]
    M = class_table.shape[1]
    inv = inv.to(Z.device)
    if fp is not None:
        fp = fp._replace(alpha=fp.alpha.to(Z.device), eps=fp.eps.to(Z.device))
    bs = max(1, BLOCK_ELEMS // max(1, M * C))
    pred = torch.empty(B, dtype=torch.int64, device=Z.device)
    comp = torch.empty(B, dtype=torch.int64, device=Z.device)
    radius = torch.empty(B, dtype=torch.float64, device=Z.device)
    for i in range(0, B, bs):
        Zb = Z[i:i + bs]
        logits = torch.addmm(beta, Zb, A.T)
        zn = norm_upper(Zb) if fp is not None else None
        pred[i:i + bs], radius[i:i + bs], comp[i:i + bs] = multiproto_epilogue(
            logits, zn, inv, fp, comp_class, class_table)
    return pred, radius, comp
