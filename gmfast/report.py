"""The distributional report: empirical certified accuracy, ``CA_Q`` and its KL lower bound
per radius, with the diagnostics, as a dict, a plain-text table (``gmfast report``) and plots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import stats

from gmfast._validate import as_radii
from gmfast.certificate import certified_accuracy
from gmfast.diagnostics import heldout_log_likelihood, joint_kl_estimate, mahalanobis_gaussianity, mahalanobis_sq
from gmfast.distributional import CAResult, certified_accuracy_gmm, certified_accuracy_lower_bound

__all__ = ["report", "format_report", "plot_mahalanobis_qq"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_mahalanobis_qq(head, Z, y, path) -> Path:
    """QQ plot (PNG at ``path``) of squared Mahalanobis distances against ``χ²_d`` quantiles,
    one series per class; points on the diagonal are what a Gaussian class gives."""
    plt = _pyplot()
    d2 = mahalanobis_sq(head, Z, y).numpy()
    y = np.asarray(torch.as_tensor(y))
    d = head.n_features_in_
    K = head.n_classes_
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    top = 0.0
    for k in range(K):
        v = np.sort(d2[y == k])
        if v.size < 2:
            continue
        q = stats.chi2(d).ppf((np.arange(1, v.size + 1) - 0.5) / v.size)
        ax.plot(q, v, ".", ms=3, alpha=0.6, label=f"class {k}" if K <= 12 else None)
        top = max(top, q.max(), v.max())
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set_xlabel(f"χ²({d}) quantiles")
    ax.set_ylabel("squared Mahalanobis distance to the class mean")
    ax.set_title("per-class Gaussianity of the latents (diagnostic)", fontsize=9)
    if K <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def report(head, Z_test, y_test, radii, kl=None, *, out_dir=None, norm=2, confidence: float = 0.95,
           n_samples: int | None = None, seed: int = 0) -> dict:
    """Empirical certified accuracy, ``CA_Q`` and the KL lower bound per radius, with diagnostics.

    Parameters
    ----------
    head : fitted GaussianMixtureHead or MultiPrototypeHead
    Z_test : (n, d) held-out latents;  y_test : (n,) labels
    radii : sequence of float (R,)
    kl : float, optional
        An upper bound on ``KL(P‖Q)`` (joint laws) supplied by the user: then the lower bound
        is a guarantee (at ``confidence``). If None, :func:`joint_kl_estimate` on the test
        latents is used instead and everything derived from it is labelled an **estimate**.
    out_dir : path, optional
        Writes ``certified_accuracy.png`` (the three curves) and, for a
        ``GaussianMixtureHead``, ``mahalanobis_qq.png``.
    norm, confidence, n_samples, seed : see :func:`certified_accuracy_gmm` and
        :func:`certified_accuracy_lower_bound`.

    Returns
    -------
    dict with ``radii`` (R,); ``empirical`` (R,) certified accuracy of ``head.certify`` on the
    test latents and ``empirical_stderr`` (binomial); ``ca_q``, ``ca_q_stderr`` (R,),
    ``ca_q_method``; ``lower_bound`` (R,), ``confidence``; ``kl``, ``kl_source``
    (``"given"`` or ``"k-NN estimate (not a guarantee)"``), ``tv``; ``loglik`` (held-out
    joint log-likelihood per sample); ``gaussianity`` (``{class: (n, KS, p)}`` or None);
    ``n_test``; ``plots`` (list of paths).
    """
    radii = as_radii(radii)
    Z = torch.as_tensor(Z_test)
    y = torch.as_tensor(y_test).long()
    cert = head.certify(Z, norm=norm)
    # with plots, CA_Q is computed once on the user's radii merged with a fine grid (one run of
    # the estimator; the radii are thresholds on the same draws), then the user's are picked out
    grid = radii if out_dir is None else np.unique(np.concatenate([radii, np.linspace(0, radii.max(), 25)]))
    pick = np.searchsorted(grid, radii)
    ca_grid = certified_accuracy_gmm(head, grid, norm=norm, n_samples=n_samples, seed=seed)
    if kl is None:
        kl = joint_kl_estimate(head, Z, y, seed=seed + 1)
        kl_source = "k-NN estimate (not a guarantee)"
    else:
        kl_source = "given"
    lb_grid = certified_accuracy_lower_bound(head, grid, kl, confidence=confidence, ca_q=ca_grid)
    try:
        gauss = mahalanobis_gaussianity(head, Z, y)
    except TypeError:
        gauss = None
    n = len(y)
    empirical = certified_accuracy(cert, y, radii)
    res = dict(radii=radii, empirical=empirical, empirical_stderr=np.sqrt(empirical * (1 - empirical) / max(n, 1)),
               ca_q=ca_grid.estimate[pick], ca_q_stderr=ca_grid.stderr[pick], ca_q_method=ca_grid.method,
               lower_bound=lb_grid.estimate[pick], confidence=confidence, kl=float(kl), kl_source=kl_source,
               tv=lb_grid.details["tv"], loglik=heldout_log_likelihood(head, Z, y), gaussianity=gauss, n_test=n,
               plots=[])
    if out_dir is not None:
        out = Path(out_dir)
        res["plots"].append(str(_plot_report(res, cert, y, ca_grid, lb_grid, norm, out / "certified_accuracy.png")))
        if gauss is not None:
            res["plots"].append(str(plot_mahalanobis_qq(head, Z, y, out / "mahalanobis_qq.png")))
    return res


def _plot_report(res, cert, y, ca: CAResult, lb: CAResult, norm, path) -> Path:
    from gmfast.plot import certified_accuracy_curve

    plt = _pyplot()
    r = ca.radii
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    fine, emp = certified_accuracy_curve(cert, y, max_radius=float(r.max()) or 1.0)
    ax.plot(fine, 100 * emp, lw=2, label=f"empirical (n={res['n_test']} test latents)")
    est, se = 100 * ca.estimate, 100 * ca.stderr
    ax.plot(r, est, lw=2, label="CA_Q (fitted mixture)")
    ax.fill_between(r, est - 2 * se, est + 2 * se, alpha=0.25, lw=0)
    what = "" if res["kl_source"] == "given" else " (KL estimated: not a guarantee)"
    ax.plot(r, 100 * lb.estimate, "--", lw=2, label=f"CA_Q - TV bound, KL={res['kl']:.3g}{what}")
    ax.plot(res["radii"], 100 * res["lower_bound"], "s", ms=4, color=ax.lines[-1].get_color())
    ax.set_xlabel(f"latent radius ({'ℓ' + str(norm) if norm != 'mahalanobis' else 'Mahalanobis'})")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("certified accuracy: data, mixture Q, and CA_Q − TV(KL)", fontsize=10)
    return _save(fig, path)


def format_report(res: dict) -> str:
    """The output of :func:`report` as a plain-text table (percentages)."""
    est = res["kl_source"] != "given"
    conf = res.get("confidence")
    lines = [
        f"KL(P||Q) = {res['kl']:.4g} ({res['kl_source']}); TV bound {res['tv']:.4g}",
        f"CA_Q by {res['ca_q_method']}",
        f"lower bound = CA_Q{'' if conf is None else f' ({conf:g} lower confidence bound)'} - TV"
        + ("   [an ESTIMATE: KL was estimated, not given]" if est else "   [valid if KL(P||Q) <= the KL above]"),
        f"held-out log-likelihood (joint): {res['loglik']:.4g} nats/sample on {res['n_test']} test latents",
        f"{'radius':>8} {'empirical':>10} {'+-':>5} {'CA_Q':>7} {'+-':>7} {'lower bound':>12}",
    ]
    for i, r in enumerate(res["radii"]):
        lines.append(f"{r:>8.4g} {100 * res['empirical'][i]:>9.1f}% {100 * res['empirical_stderr'][i]:>5.1f} "
                     f"{100 * res['ca_q'][i]:>6.1f}% {100 * res['ca_q_stderr'][i]:>7.2g} "
                     f"{100 * res['lower_bound'][i]:>11.1f}%")
    g = res.get("gaussianity")
    if g:
        worst = min(g.items(), key=lambda kv: kv[1][2])
        small = sum(1 for v in g.values() if v[2] < 1e-3)
        lines.append(f"Gaussianity (KS of squared Mahalanobis vs chi2_d, per class): lowest p-value {worst[1][2]:.3g} "
                     f"(class {worst[0]}); {small}/{len(g)} classes below 1e-3 (a diagnostic, not a guarantee)")
    for p in res["plots"]:
        lines.append(f"plot: {p}")
    return "\n".join(lines)
