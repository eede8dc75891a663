"""Probe (issue 17, MNIST ε = 0.5): do several prototypes per class certify more?

    python benchmarks/multiproto_probe.py --per-class M [--overrides JSON] --out FILE.json

The recipe's encoder (``gmfast.train.recipe("mnist")``) trained with ``M`` prototypes per
class instead of one; the classifier is the nearest prototype's class (the hard limit of a
mixture of ``M`` isotropic Gaussians per class with a shared variance). Its certificate in
the latent space: with ``P`` the prototypes of the predicted class and ``Q`` all others,

    R(z) = max_{p ∈ P} min_{q ∈ Q} (‖z − q‖² − ‖z − p‖²) / (2‖p − q‖)

(each term is the distance from ``z`` to the bisector of ``p`` and ``q``; inside the ball of
radius ``R`` some ``p`` of the predicted class stays nearer than every ``q``, so the
predicted class cannot change; exact for ``M = 1``): the certificate of
:class:`gmfast.multiproto.MultiPrototypeHead`, which computes it here (rounding included),
divided by the encoder's sound Lipschitz bound ``L``. Trained with the recipe's offset loss on the margins of the *nearest* own
prototype against every other-class prototype (for ``M = 1`` exactly the recipe's loss);
own prototypes start at the ``k``-means centres (``k = M``) of their class's latents under
the initial encoder, and for the first 80% of the epochs a prototype that is the nearest own
prototype of no training image of its class restarts, after the epoch, at the latent of its
class's worst-served training image (the smallest margin).

The recipe's random shifts (``augment``) are applied as :func:`gmfast.train.train` applies
them (the stored runs pass ``{"augment": 0}``: they predate the shifts); other training
options of the recipe are refused, not ignored.

Validation split only (:func:`gmfast.train.data.validation_split`): this says whether the
direction is worth building into the library (a new head type, its kernels and tests), not
a benchmark figure. Every certificate is attacked by :func:`gmfast.train.attack.pgd_flips` (40
steps, 3 restarts; ascent on the head's class log-joint, flips judged by its decision rule).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import gmfast
from gmfast.lipschitz import lipschitz_bound
from gmfast.train import recipe
from gmfast.train.attack import pgd_flips
from gmfast.train.data import validation_split
from gmfast.train.layers import build_encoder
from gmfast.train.loss import margin_loss
from gmfast.train.recipe import _lr_at, translate

RADII = (0.0, 0.5, 1.0, 1.58, 2.0)


def margins(z, protos, owner, y):
    """``(B, K·M)`` margins of each row's nearest own prototype against every prototype
    (``+inf`` on own prototypes), and the index of that nearest own prototype."""
    d2 = torch.cdist(z, protos) ** 2
    own = owner[None, :] == y[:, None]
    pstar = d2.masked_fill(~own, float("inf")).argmin(dim=1)
    p = protos[pstar]
    gap = (p[:, None, :] - protos[None, :, :]).norm(dim=-1)
    r = (d2 - d2.gather(1, pstar[:, None])) / (2 * gap.masked_fill(own, 1.0))
    return r.masked_fill(own, float("inf")), pstar


def as_head(protos, owner):
    """The trained nearest-prototype classifier as a :class:`gmfast.multiproto.MultiPrototypeHead`
    (components the prototypes, covariance ``I``, equal priors and weights): its ``certify``
    is the library's sound best-component radius, the ``R`` of the module docstring with
    float rounding accounted for."""
    from gmfast.multiproto import MultiPrototypeHead, _Fit

    P = protos.detach().double()
    K = int(owner.max()) + 1
    means = [P[owner == k] for k in range(K)]
    weights = [torch.full((len(m),), 1.0 / len(m), dtype=torch.float64) for m in means]
    head = MultiPrototypeHead(n_components=max(len(m) for m in means))
    head._set(_Fit(means, weights, torch.eye(P.shape[1], dtype=torch.float64)),
              torch.full((K,), 1.0 / K, dtype=torch.float64), 0.0, [], 0, True)
    return head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, required=True)
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = recipe("mnist", **json.loads(args.overrides))
    unsupported = {k: getattr(r, k) for k in ("noise", "ema", "clean_weight", "target_warmup", "weight_decay")
                   if getattr(r, k)} | ({"covariance": r.covariance} if r.covariance != "isotropic" else {})
    if r.loss != "margin" or unsupported:
        raise ValueError(f"the probe trains the margin loss with isotropic prototypes, shifts (augment) and nothing "
                         f"else; the recipe has loss {r.loss!r} and {unsupported}")
    M, K = args.per_class, r.classes
    Xfit, yfit, Xval, yval = validation_split("mnist")
    torch.manual_seed(r.seed)
    g = torch.Generator().manual_seed(r.seed)
    enc = build_encoder(r.architecture)
    with torch.no_grad():
        enc.eval()
        init = []
        for k in range(K):
            zk = enc(Xfit[yfit == k])
            c = zk[torch.randperm(len(zk), generator=g)[:M]].clone()
            for _ in range(20):  # Lloyd's k-means on the class's initial latents
                a = torch.cdist(zk, c).argmin(1)
                for m in range(M):
                    if (a == m).any():
                        c[m] = zk[a == m].mean(0)
            init.append(c)
    protos = torch.nn.Parameter(torch.cat(init))
    owner = torch.arange(K).repeat_interleave(M)
    opt = torch.optim.Adam(list(enc.parameters()) + [protos], lr=r.lr)
    n, bs = len(Xfit), r.batch_size
    total, step, t0 = r.epochs * math.ceil(n / bs), 0, time.perf_counter()
    for epoch in range(r.epochs):
        enc.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, r.lr)
            xb = translate(Xfit[idx], r.augment, g) if r.augment else Xfit[idx]
            rj, _ = margins(enc(xb), protos, owner, yfit[idx])
            loss = margin_loss(rj, r.target, r.temperature)  # the recipe's offset loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            enc.eval()
            zf = torch.cat([enc(Xfit[i:i + 500]) for i in range(0, n, 500)])
            rf, pstar = margins(zf, protos, owner, yfit)
            used = torch.bincount(pstar, minlength=K * M) > 0
            if epoch < 0.8 * r.epochs:  # a prototype no sample of its class is nearest to restarts
                worst = rf.amin(1)      # at the latent of its class's worst-served training sample
                for j in torch.nonzero(~used).flatten().tolist():
                    cls = torch.nonzero(yfit == owner[j]).flatten()
                    pick = cls[worst[cls].argmin()]
                    protos[j] = zf[pick]
                    worst[pick] = float("inf")
            used = int(used.sum())
        if epoch % 20 == 19 or epoch == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, prototypes used on the fit split {used}/{K * M} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    enc.eval()
    L = float(lipschitz_bound(enc, r.input_shape, cache=False))
    P = protos.detach()
    head = as_head(P, owner)
    out = {}
    for name, X, y in (("validation", Xval, yval), ("fit", Xfit, yfit)):
        with torch.no_grad():
            z = torch.cat([enc(X[i:i + 500]) for i in range(0, len(X), 500)])
        cert = head.certify(z.double())
        # input radius R/L, deflated far beyond the float64 division's rounding
        pred, R = cert.prediction, cert.radius / (L * (1 + 1e-12))
        ca = gmfast.certified_accuracy((pred, R), y, RADII).tolist()
        row = dict(certified_accuracy=ca)
        if name == "validation":
            row["pgd_flips"] = int(pgd_flips(enc, head, X, pred, R, steps=40, restarts=3).sum())
            used = torch.bincount(torch.cdist(z, P).argmin(1), minlength=K * M)
            row["prototypes_used"] = int((used > 0).sum())
        out[name] = row
        print(f"M={M} {name}: CA " + " / ".join(f"{100 * a:.1f}" for a in ca) + f" at r = {RADII}"
              + (f"; PGD flips {row['pgd_flips']}/{len(X)}; prototypes used {row['prototypes_used']}/{K * M}"
                 if name == "validation" else ""), flush=True)
    rec = dict(per_class=M, overrides=json.loads(args.overrides), lipschitz_bound=L, seconds=seconds, radii=RADII,
               **out)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
