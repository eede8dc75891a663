"""Plots: the certified-accuracy-vs-radius curve, the standard figure of the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def certified_accuracy_curve(cert, labels, max_radius: float | None = None, num: int = 200):
    """(radii, accuracy) on a grid from 0 to ``max_radius`` (default: the largest radius).

    Computed from the per-input radii of ``cert``, so a method's curve reaches 0 where its
    largest certified radius ends (randomized smoothing's cannot pass ``σΦ⁻¹(α^{1/n})``)."""
    from gmfast.certificate import certified_accuracy

    pred, rad = cert
    finite = rad[rad.isfinite()] if hasattr(rad, "isfinite") else rad
    top = float(max_radius) if max_radius is not None else float(finite.max()) if len(finite) else 1.0
    radii = np.linspace(0.0, max(top, 1e-12), num)
    return radii, certified_accuracy(cert, labels, radii)


def plot_certified_accuracy(curves: dict, path, *, title: str | None = None,
                            xlabel: str = "ℓ2 radius", marks: dict | None = None, vlines: dict | None = None):
    """Write a PNG of certified accuracy against radius.

    Parameters
    ----------
    curves : {label: (radii, accuracy)}
        One line per method; ``accuracy`` in [0, 1].
    marks : {label: (radii, accuracy)}, optional
        Drawn as points (e.g. a method evaluated at a few radii only).
    vlines : {label: radius}, optional
        Dotted vertical lines (e.g. the largest radius randomized smoothing can certify with
        its sample size and level).
    path : where to write (parent directories are created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_entries = len(curves) + len(marks or {}) + len(vlines or {})
    fig, ax = plt.subplots(figsize=(6.4, 4.2 + 0.2 * n_entries), dpi=120)
    for label, (r, a) in curves.items():
        ax.plot(np.asarray(r), 100 * np.asarray(a), label=label, lw=2)
    for label, (r, a) in (marks or {}).items():
        ax.plot(np.asarray(r), 100 * np.asarray(a), "o--", label=label, ms=5)
    for label, x in (vlines or {}).items():
        ax.axvline(float(x), ls=":", color="0.4", lw=1.2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    # below the axes: inside, it would hide the curves' high-accuracy start
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
