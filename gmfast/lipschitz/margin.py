"""Margin-aware global bounds for tied heads: each margin's own Lipschitz constant.

For a tied head the prediction at ``x`` is ``c`` as long as every margin
``m_cj(x') = (a_c − a_j)ᵀ h(x') + β_c − β_j`` stays positive. If the encoder ends with a
linear layer, ``h(x) = W g(x) + b`` with ``g`` the rest of the encoder, then

    |m_cj(x') − m_cj(x)| = |(a_c − a_j)ᵀ W (g(x') − g(x))| ≤ ‖Wᵀ(a_c − a_j)‖₂ · L(g) · ‖x' − x‖₂,

so ``m_cj`` is ``Λ_cj = ‖Wᵀ(a_c − a_j)‖₂ · L(g)``-Lipschitz, with ``L(g)`` the global bound of
the rest (:class:`~gmfast.lipschitz.global_bound.GlobalBound` over the same traced graph).
The certified ℓ2 radius is ``min_j m_cj(x)/Λ_cj``: every margin is still positive inside it.
This is never worse than the global route (``Λ_cj ≤ ‖a_c − a_j‖ ‖W‖₂ L(g)``, and the global
route divides ``min_j m_cj/‖a_c − a_j‖`` by ``L(h) ≥ ‖W‖₂ L(g)``) and much better when the
head's directions are not aligned with ``W``'s top singular vectors. All ``K²`` pair
directions come from one GEMM ``G = A W`` (``Wᵀ(a_c − a_j) = G_c − G_j``). Without a final
linear layer, ``W = I`` and ``L(g) = L(h)``. For ``ℓ∞`` inputs, ``‖δ‖₂ ≤ √n ‖δ‖∞`` divides the
radius by ``√n``.

Floating point (float64, ``u = 2⁻⁵³``):

* ``Ĝ = fl(A W)``: ``|Ĝ − G| ≤ γ_d |A||W|`` entrywise (Higham 3.5), so
  ``‖G_c − G_j‖ ≤ ‖fl(Ĝ_c − Ĝ_j)‖ + u‖Ĝ_c − Ĝ_j‖ + γ_d ‖(|a_c| + |a_j|)ᵀ|W|‖``, each norm from
  :func:`gmfast._fp.norm_upper` (an upper bound on the exact norm of the computed vector),
  the sum and the product by ``L(g)`` raised by ``slack_up``;
* margins at the computed latent ``ẑ`` (float64, exact copy of the encoder's output):
  ``ℓ̂_k = fl(a_kᵀẑ + β_k)`` within ``e_k = γ_{d+1}(|a_k|ᵀ|ẑ| + |β_k|)``, so
  ``m_cj ≥ fl(ℓ̂_c − ℓ̂_j) − 2(e_c + e_j + u|m̂|)`` (the factor 2 covers the rounding of ``e``),
  then ``nextafter`` down; a latent error bound ``e_h`` (``encoder_error``) lowers it by
  ``e_h·‖a_c − a_j‖`` (rounded up);
* the quotient is deflated by ``slack_down(2)``.

As for the global route, the certificate is for the computed latent and the exact-arithmetic
encoder: the encoder's own rounding error is not covered unless bounded by ``encoder_error``.
"""

from __future__ import annotations

import math

import torch

from gmfast._fp import U64, gamma, norm_upper, slack_down, slack_up
from gmfast.lipschitz.global_bound import GlobalBound
from gmfast.lipschitz.graph import check_same_function, trace
from gmfast.lipschitz.ops import module_kind

_F64 = torch.float64


def _last_linear(tg):
    """``(W, node before it)`` when the graph's output is a Linear module applied to an
    input-dependent node, else ``(None, output node)``."""
    out = next(n for n in tg.nodes if n.op == "output").args[0]
    if isinstance(out, torch.fx.Node) and out.op == "call_module" and tg.kind.get(out) == "dep":
        mod = tg.gm.get_submodule(out.target)
        src = out.args[0] if out.args else None
        deps = [a for a in out.all_input_nodes if tg.kind.get(a) == "dep"]
        if module_kind(mod) == "linear" and len(deps) == 1 and deps[0] is src:
            return mod.weight.detach().cpu().to(_F64), src
    return None, out


def margin_lipschitz_table(encoder, input_shape, A: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``Λ`` (K, K) float64: ``Λ[c, j] ≥`` the ℓ2 Lipschitz constant of ``x ↦ (a_c − a_j)ᵀh(x)``
    (``inf`` never; 0 on the diagonal), and a report dict (``rest``: ``L(g)``, ``folded``:
    whether a final linear layer was folded in). ``A`` (K, d) float64, the head's ``a_k``."""
    input_shape = tuple(input_shape)
    tg = trace(encoder, input_shape)
    dp = GlobalBound(tg, "fft")
    total = dp.run()
    check_same_function(tg, encoder, input_shape)
    W, src = _last_linear(tg)
    A = A.detach().cpu().to(_F64)
    K, d = A.shape
    if W is None:
        W = torch.eye(d, dtype=_F64)
        rest = float(total)
    else:
        rest = float(dp.L[src])
    if W.shape[0] != d:
        raise ValueError(f"the encoder's last linear layer has {W.shape[0]} outputs; the head expects {d} features")
    G = A @ W
    Gabs = A.abs() @ W.abs()  # ≥ the exact |A||W| up to a factor 1 + γ_d, absorbed below
    g = gamma(d + 2, U64)
    table = torch.zeros((K, K), dtype=_F64)
    for c in range(K):
        diff = G[c] - G
        nd = norm_upper(diff, dim=1)
        nerr = norm_upper(Gabs[c] + Gabs, dim=1) * (2.0 * g)
        table[c] = (nd * (1.0 + 2.0 * U64) + nerr) * slack_up(4) * rest * slack_up(2)
    table.fill_diagonal_(0.0)
    return table, dict(rest=rest, folded=W.shape != (d, d) or not torch.equal(W, torch.eye(d, dtype=_F64)),
                       bound=float(total))


def margin_lower_bounds(Z: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, pred: torch.Tensor,
                        encoder_error: float = 0.0) -> torch.Tensor:
    """Lower bounds (B, K) float64 on the exact margins ``m_{c j}(z)`` at the latents ``Z``
    (B, d) for the predicted class ``c = pred`` (``+inf`` at ``j = c``; ``-inf`` rows where
    ``pred < 0``), reduced by ``encoder_error·‖a_c − a_j‖``."""
    Z = Z.detach().cpu().to(_F64)
    A, beta = A.detach().cpu().to(_F64), beta.detach().cpu().to(_F64)
    B, d = Z.shape
    ok = pred >= 0
    c = pred.clamp_min(0).cpu()
    logits = Z @ A.T + beta
    e = gamma(d + 2, U64) * (Z.abs() @ A.abs().T + beta.abs())
    lc = logits.gather(1, c[:, None])
    m = lc - logits
    err = 2.0 * (e.gather(1, c[:, None]) + e + U64 * m.abs())
    low = torch.nextafter(m - err, torch.full_like(m, -math.inf))
    if encoder_error:
        na = norm_upper(A[c][:, None, :] - A[None, :, :], dim=2) * slack_up(2)
        low = torch.nextafter(low - encoder_error * na * slack_up(2), torch.full_like(m, -math.inf))
    low.scatter_(1, c[:, None], math.inf)
    return torch.where(ok[:, None], low, torch.full_like(low, -math.inf))


def margin_radius(low: torch.Tensor, table: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``min_j low[:, j] / Λ[c, j]`` rounded down, 0 where a margin is not positive (B,)."""
    c = pred.clamp_min(0).cpu()
    lip = table[c]  # (B, K)
    r = torch.where(lip > 0, low / lip.clamp_min(1e-300), torch.where(low > 0, math.inf, 0.0))
    r = r.amin(1).clamp_min(0) * slack_down(2)
    r = torch.where(torch.isinf(r), torch.zeros_like(r), r)  # K = 1 or all-equal directions: none
    return torch.where(pred >= 0, r, torch.zeros_like(r))
