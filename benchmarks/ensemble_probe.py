"""Probe (issue 17, MNIST ε = 0.5): does an ensemble of recipe models certify more?

    python benchmarks/ensemble_probe.py train --seed S --out DIR    # one member, on the fit split
    python benchmarks/ensemble_probe.py combine DIR...               # members and their ensemble

An ensemble of ``S`` 1-Lipschitz encoders ``f_s`` with tied prototype heads ``p_{k,s}``
(equal priors, covariance ``I``) that sums the members' logits
``Σ_s (p_{k,s}ᵀ f_s(x) − ½‖p_{k,s}‖²)`` is itself a tied Gaussian-mixture head on a
1-Lipschitz encoder: with ``z = [f_1; …; f_S]/√S`` (``‖z(x) − z(x')‖² =
Σ_s‖f_s(x) − f_s(x')‖²/S ≤ ‖x − x'‖²``), means ``μ_k = [p_{k,1}; …; p_{k,S}]/√S`` and
covariance ``I/S``, ``μ_kᵀΣ⁻¹z − ½μ_kᵀΣ⁻¹μ_k`` is exactly that sum. So the ordinary
certificate applies (:class:`gmfast.Certifier`, global route; the tracer bounds the
concatenation in quadrature), and it is attacked here with PGD like every other.

Validation split only (:func:`gmfast.train.data.validation_split`); the held-out split is not
read. Smoothing is not re-run: an ensemble is a different architecture, whose smoothing
bases would need the same ensemble (the benchmark's rule), so this only says whether the
direction is worth that cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

import gmfast
from gmfast.head import GaussianMixtureHead
from gmfast.train import final_head, load, recipe, save, train
from gmfast.train.attack import pgd_flips
from gmfast.train.data import validation_split

RADII = (0.0, 0.5, 1.0, 1.58, 2.0)


class Concat(nn.Module):
    """``x ↦ [f_1(x); …; f_S(x)] / √S`` (1-Lipschitz when every ``f_s`` is)."""

    def __init__(self, encoders):
        super().__init__()
        self.members = nn.ModuleList(encoders)
        self.scale = 1.0 / math.sqrt(len(encoders))

    def forward(self, x):
        return torch.cat([f(x) for f in self.members], dim=1) * self.scale


def ensemble(members):
    """``(encoder, head)`` of the logit-sum ensemble of ``[(encoder, tied head)]`` (module docstring)."""
    S = len(members)
    for _, h in members:
        if h.covariance_type != "tied" or not torch.allclose(h.covariance_, torch.eye(h.covariance_.shape[0],
                                                                                       dtype=torch.float64)):
            raise ValueError("ensemble: every member needs a tied head with covariance I (the prototype head)")
        if not torch.allclose(h.priors_, torch.full_like(h.priors_, 1.0 / len(h.priors_))):
            raise ValueError("ensemble: every member needs equal priors (the prototype head)")
    means = torch.cat([h.means_ for _, h in members], dim=1) / math.sqrt(S)
    d = means.shape[1]
    K = means.shape[0]
    head = GaussianMixtureHead.from_params(means, torch.eye(d, dtype=torch.float64) / S,
                                           torch.full((K,), 1.0 / K, dtype=torch.float64))
    return Concat([e for e, _ in members]).eval(), head


def evaluate(name, enc, head, X, y):
    cert = gmfast.Certifier(enc, head, method="lipschitz").certify(X)
    ca = gmfast.certified_accuracy(cert, y, RADII)
    flips = pgd_flips(enc, head, X, cert.prediction, cert.radius, steps=40, restarts=3)
    print(f"{name}: CA " + " / ".join(f"{100 * a:.1f}" for a in ca) + f" at r = {RADII}; PGD flips "
          f"{int(flips.sum())}/{len(X)}", flush=True)
    return dict(name=name, accuracy=ca.tolist(), pgd_flips=int(flips.sum()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--out", required=True)
    c = sub.add_parser("combine")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    Xfit, yfit, Xval, yval = validation_split("mnist")
    if args.cmd == "train":
        # the recipe as it was when the stored probe ran (round 6: no shifts; augment=1 since round 9)
        r = recipe("mnist", seed=args.seed, augment=0)
        enc, proto, hist = train(r, Xfit, yfit, progress=False)
        enc, proto = enc.cpu(), proto.cpu()
        save(args.out, enc, final_head(r, enc, proto, Xfit, yfit), r, metrics=dict(seconds=hist["seconds"]))
        print(f"seed {args.seed}: {hist['epochs']} epochs in {hist['seconds']:.0f} s -> {args.out}")
        return 0
    members = [load(d) for d in args.dirs]
    rows = [evaluate(f"member {d}", e, h, Xval, yval) for d, (e, h) in zip(args.dirs, members)]
    enc, head = ensemble(members)
    b = gmfast.Certifier(enc, head).lipschitz_bound((1, 28, 28), points=Xval[:8])
    print(f"ensemble of {len(members)}: L <= {float(b):.7f} (estimate {b.estimate:.7f})")
    rows.append(evaluate(f"ensemble of {len(members)}", enc, head, Xval, yval) | dict(lipschitz_bound=float(b)))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(radii=RADII, rows=rows, n_validation=len(yval)), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
