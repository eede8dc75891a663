"""What smoothing's CERTIFY at n = 10⁵ would certify, bracketed from far fewer samples (issue 17).

    python benchmarks/smoothing_bracket.py --recipe-overrides JSON --sigma σ --out DIR \\
        [--tag TAG] [--base FILE.safetensors] [--all] [--data mnist] [--delta 0.001]

A smoothing comparison for a candidate recipe needs smoothing bases of the candidate's
architecture, and CERTIFY at n = 10⁵ on 200 images costs 2·10⁷ base evaluations per σ: ~25 min
of a core for the MLP, 2–5 hours for a convolutional base (an FFT convolution at 0.5–0.9 ms
per image on one core). This script answers the question the comparison asks, *how many of
these images would CERTIFY(n, α) certify at each radius*, from a few thousand samples per
image, as an **interval on the expected count**, so that a candidate can be judged on the CPU
and the full run kept for the adopted recipe (or a GPU).

The quantity. CERTIFY (Cohen et al. 2019) picks ``c_A`` from ``n0`` samples, draws ``n``
fresh ones, counts ``N_A ~ Binom(n, p_A)`` and returns ``r(N_A) = σΦ⁻¹(CP_lower(N_A, n, α))``
(abstaining when ``CP_lower ≤ ½``). ``r`` is nondecreasing in ``N_A``, so with ``k_ε`` the
least count whose radius reaches ``ε`` (computed with the library's own radius function over
every count ``0..n``), the input is certified correct at ``ε`` with probability

    P_ε(p_A) = [c_A = y] · P(Binom(n, p_A) ≥ k_ε),

nondecreasing in ``p_A``. The expected certified count is ``Σ_i P_ε(p_A,i)``.

The bracket. The selection here is drawn exactly as CERTIFY draws it (``n0`` samples, the
same ``c_A``); estimation samples then give ``k`` of ``m`` for ``c_A``, at checkpoints
``m_1 < … < m_J`` (an input stops when its bracket is narrower than ``--tol`` at every
radius). At each checkpoint the two-sided Clopper–Pearson interval at level ``δ/J`` per side
covers ``p_A``; by the union bound over checkpoints, with probability ``≥ 1 − 2δ`` per input
the interval at the stopping checkpoint does, and then (monotonicity)
``P_ε(p_lo) ≤ P_ε(p_A) ≤ P_ε(p_hi)``. Summed over inputs: ``lower ≤ expected ≤ upper``
except on an event of probability ``≤ 2δ`` per input (δ = 0.001: ``≤ 0.4`` inputs expected
outside on 200). The point estimate uses ``p̂ = k/m``.

What it is not: a certificate (use :class:`gmfast.smoothing.Smooth`), nor the count one
CERTIFY run would return (that count varies around its expectation by the borderline
inputs' Bernoulli draws; the file also records the per-input probabilities).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

from gmfast.binomial import clopper_pearson_interval, clopper_pearson_lower
from gmfast.smoothing import Smooth, _radius

CHECKPOINTS = (1_000, 4_000, 16_000)


def count_thresholds(sigma: float, radii, n: int, alpha: float) -> np.ndarray:
    """``k_ε`` for each radius: the least ``N_A`` in ``0..n`` whose CERTIFY radius reaches ``ε``
    and does not abstain (``n + 1`` when none does)."""
    p_lower = clopper_pearson_lower(np.arange(n + 1), n, alpha)
    r = _radius(p_lower, sigma)  # the radius CERTIFY returns for N_A = k
    certified = p_lower > 0.5
    out = []
    for eps in radii:
        ok = np.flatnonzero(certified & (r >= eps))
        out.append(int(ok[0]) if ok.size else n + 1)
    return np.asarray(out)


def certify_probability(p, k_eps, n: int) -> np.ndarray:
    """``P(Binom(n, p) ≥ k_ε)`` for each ``p`` (rows) and threshold (columns)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)[:, None]
    return stats.binom.sf(np.asarray(k_eps)[None, :] - 1, n, p)


def bracket(smooth: Smooth, X: torch.Tensor, y: torch.Tensor, radii, *, n: int = 100_000, n0: int = 100,
            alpha: float = 0.001, delta: float = 0.001, checkpoints=CHECKPOINTS, tol: float = 0.02,
            batch_size: int = 10_000) -> dict:
    """The bracket of the module docstring for CERTIFY(``n0``, ``n``, ``alpha``) of ``smooth`` on
    ``X`` with labels ``y``. Returns per-input arrays (``c_a``, ``k``, ``m``, ``p_lo``, ``p_hi``,
    ``lower``/``estimate``/``upper`` of shape (B, R)) and the summed ``lower``/``estimate``/
    ``upper`` certified accuracies at ``radii``."""
    checkpoints = list(checkpoints)
    if not checkpoints or any(b <= a for a, b in zip(checkpoints, checkpoints[1:])) or checkpoints[0] < 1:
        raise ValueError(f"checkpoints must be strictly increasing positive ints; got {checkpoints}")
    B = len(X)
    y = torch.as_tensor(y).reshape(-1)
    if len(y) != B:
        raise ValueError(f"X has {B} inputs but y has {len(y)} labels")
    k_eps = count_thresholds(smooth.sigma, radii, n, alpha)
    level = 2 * delta / len(checkpoints)  # two-sided: δ/J per side
    first = smooth.certify_batch(X, n0=n0, n=checkpoints[0], alpha=alpha, batch_size=batch_size)
    c_a = first.counts_selection.argmax(1)
    correct = (c_a == y).numpy() & (first.invalid == 0).numpy()
    k = first.counts.gather(1, c_a[:, None])[:, 0].numpy().astype(np.int64)
    m = np.full(B, checkpoints[0], dtype=np.int64)
    spent = first.samples.numpy().copy()  # base evaluations per input, selection included
    active = np.ones(B, dtype=bool)
    for j, m_j in enumerate(checkpoints):
        if j:  # fresh estimation samples for the undecided inputs (n0 = 1 selection draw is discarded)
            idx = np.flatnonzero(active)
            if not idx.size:
                break
            more = smooth.certify_batch(X[torch.from_numpy(idx)], n0=1, n=m_j - checkpoints[j - 1], alpha=alpha,
                                        batch_size=batch_size)
            k[idx] += more.counts.gather(1, c_a[idx][:, None])[:, 0].numpy()
            m[idx] = m_j
            spent[idx] += more.samples.numpy()
            correct[idx] &= (more.invalid == 0).numpy()
        p_lo, p_hi = clopper_pearson_interval(k, m, level)
        w = correct[:, None].astype(np.float64)
        lo = w * certify_probability(p_lo, k_eps, n)
        hi = w * certify_probability(p_hi, k_eps, n)
        est = w * certify_probability(k / m, k_eps, n)
        active &= (hi - lo).max(1) > tol
    return dict(radii=list(radii), n=n, n0=n0, alpha=alpha, delta=delta, checkpoints=checkpoints, tol=tol,
                k_eps=k_eps.tolist(), c_a=c_a.numpy(), k=k, m=m, p_lo=p_lo, p_hi=p_hi, lower=lo, estimate=est,
                upper=hi, accuracy_lower=lo.mean(0), accuracy_estimate=est.mean(0), accuracy_upper=hi.mean(0),
                evaluations=int(spent.sum()))


def _benchmark():
    """``certified_accuracy.py`` beside this file: the plan (subset, n, n0, α) the bracket is for."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("certified_accuracy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--sigma", type=float, required=True)
    ap.add_argument("--recipe-overrides", default="{}", help="JSON recipe fields (the candidate), as in certified_accuracy.py")
    ap.add_argument("--base", default=None,
                    help="safetensors state dict of the base (nn.Sequential(encoder, prototypes)); trained and "
                         "written there when missing")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="", help="names the files, as the benchmark's base tags ('aol': the AOL MLP)")
    ap.add_argument("--delta", type=float, default=0.001)
    ap.add_argument("--all", action="store_true",
                    help="every held-out image (default: the benchmark's smoothing subset)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    from gmfast.train import recipe, train
    from gmfast.train.data import load_split

    torch.set_num_threads(args.threads)
    bench = _benchmark()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = json.loads(args.recipe_overrides)
    Xtr, ytr, Xte, yte = load_split(args.data)
    rs = recipe(args.data, **overrides).replace(loss="ce", noise=args.sigma)  # as the benchmark's smoothing bases
    tag = args.tag + "_" if args.tag else ""
    path = Path(args.base) if args.base else out / f"{args.data}_base_{tag}sigma{args.sigma}.safetensors"
    train_s = None
    if path.is_file():
        base = _load_base(path, rs)
    else:
        t = time.perf_counter()
        enc, proto, _ = train(rs, Xtr, ytr, progress=False)
        base = nn.Sequential(enc, proto).eval()
        train_s = time.perf_counter() - t
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path),
                  metadata={"recipe": json.dumps(rs.to_json(), sort_keys=True)})
    with torch.no_grad():
        clean = (base(Xte).argmax(1) == yte).float().mean().item()
    sub = torch.arange(len(yte)) if args.all else bench.subset(yte, bench.PER_CLASS[args.data])
    radii = bench.RADII[args.data]
    t = time.perf_counter()
    b = bracket(Smooth(base, num_classes=10, sigma=args.sigma, seed=0), Xte[sub], yte[sub], radii,
                n=bench.SMOOTHING_N[args.data], n0=bench.N0, alpha=bench.ALPHA, delta=args.delta)
    sec = time.perf_counter() - t
    rec = dict(data=args.data, sigma=args.sigma, recipe=rs.to_json(), base=str(path), trained=train_s is not None,
               train_seconds=train_s, base_clean_accuracy=clean, seconds=sec, subset=sub.tolist(),
               **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in b.items()})
    stem = f"{args.data}_bracket_{tag}sigma{args.sigma}{'_all' if args.all else ''}"
    (out / f"{stem}.json").write_text(json.dumps(rec, default=float) + "\n")
    fmt = bench.fmt
    print(f"{args.data} σ={args.sigma}: base clean {100 * clean:.1f}%; CERTIFY(n={b['n']}) expected certified "
          f"accuracy at {radii}: lower {fmt(b['accuracy_lower'])}, estimate {fmt(b['accuracy_estimate'])}, upper "
          f"{fmt(b['accuracy_upper'])} ({b['evaluations'] / len(sub):.0f} evaluations per input, {sec:.0f} s)")
    return 0


def _load_base(path, rs):
    """The base as :func:`gmfast.train.train` builds it (encoder, tied prototypes), with the
    weights stored at ``path``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gmfast.train.layers import build_encoder
    from gmfast.train.loss import TiedPrototypeHead

    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("recipe")
    if stored is None:  # a base saved by other means: its weights must fit, its training is not checked
        print(f"{path}: no recipe recorded; the base's training recipe is not checked", flush=True)
    elif json.loads(stored) != json.loads(json.dumps(rs.to_json())):
        raise ValueError(f"{path} was trained with recipe {stored}; expected {json.dumps(rs.to_json(), sort_keys=True)}")
    base = nn.Sequential(build_encoder(rs.architecture), TiedPrototypeHead(rs.latent, rs.classes, rs.covariance))
    base.load_state_dict(load_file(str(path)))
    return base.eval()


if __name__ == "__main__":
    sys.exit(main())
