"""Plots: the certified-accuracy-vs-radius curve, the standard figure of the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def certified_accuracy_curve(cert, labels, max_radius: float | None = None, num: int = 200):
    """(radii, accuracy) on a grid from 0 to ``max_radius`` (default: the largest radius)."""
    from gmfast.certificate import certified_accuracy

    pred, rad = cert
    finite = rad[rad.isfinite()] if hasattr(rad, "isfinite") else rad
    top = float(max_radius) if max_radius is not None else float(finite.max()) if len(finite) else 1.0
    radii = np.linspace(0.0, max(top, 1e-12), num)
    return radii, certified_accuracy(cert, labels, radii)


def plot_certified_accuracy(curves: dict, path, *, title: str | None = None,
                            xlabel: str = "ℓ2 radius", marks: dict | None = None):
    """Write a PNG of certified accuracy against radius.

    Parameters
    ----------
    curves : {label: (radii, accuracy)}
        One line per method; ``accuracy`` in [0, 1].
    marks : {label: (radii, accuracy)}, optional
        Drawn as points (e.g. randomized smoothing evaluated at a few radii).
    path : where to write (parent directories are created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, (r, a) in curves.items():
        ax.plot(np.asarray(r), 100 * np.asarray(a), label=label, lw=2)
    for label, (r, a) in (marks or {}).items():
        ax.plot(np.asarray(r), 100 * np.asarray(a), "o--", label=label, ms=5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
