"""Input-space certificates on the demo's encoders, per route (issue 16).

For the demo's CNN and spectral-normalised MLP (``gmfast.demo``, sklearn digits, tied
Ledoit–Wolf heads) and each route of :class:`gmfast.Certifier` (``lipschitz``, ``margin``,
``local``, ``auto``): clean accuracy, certified accuracy at ℓ2 input radii, the median
certified radius, the median tightness ratio *certified radius / smallest adversarial
distance found by PGD* (bisection over the radius, restarts), and ms/input beside one
encoder forward and randomized smoothing (``gmfast.smoothing``) on the same encoder + head.

    python benchmarks/input_certificates.py [--n 100] [--epochs 80] [--weights PATH] [--threads T]
                                            [--compare OLD.json]

``--weights``: a ``torch.save``\\ d dict ``{"cnn": state_dict, "lip": state_dict}`` of encoders
trained by :func:`gmfast.demo.train_encoder` with the demo's settings (written there when
absent, so a rerun skips the training). Results go to
``benchmarks/results_input_certificates.json`` (with every input's radius per route); the
markdown table is printed. ``--threads``: torch's intra-op threads (the issue's cost target
is per input on 2 cores; CPU ms with 1 thread bounds it without the other sessions' load).
``--compare``: an earlier results file of the same inputs and weights: per route, how many
radii went down or up and by how much at most (a faster engine must not certify less).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import gmfast
from gmfast.attack import min_adversarial_distance
from gmfast.demo import cnn_encoder, lipschitz_encoder, load_digits_split, train_encoder

ROUTES = ("lipschitz", "margin", "local", "auto")
RADII = (0.1, 0.25, 0.5)


def encoders(epochs: int, weights: str | None):
    Xtr, ytr, Xte, yte = load_digits_split(0)
    cnn, lip = cnn_encoder(), lipschitz_encoder()
    if weights and os.path.exists(weights):
        sd = torch.load(weights)
        cnn.load_state_dict(sd["cnn"])
        lip.load_state_dict(sd["lip"])
    else:
        train_encoder(cnn, Xtr, ytr, epochs=epochs, latent=32, scale=0.5, seed=0)
        train_encoder(lip, Xtr, ytr, epochs=epochs, latent=32, scale=1.0, noise=0.25, margin=1.0, margin_weight=3.0,
                      seed=0)
        if weights:
            torch.save(dict(cnn=cnn.state_dict(), lip=lip.state_dict()), weights)
    return dict(cnn=cnn.eval(), lipschitz=lip.eval()), (Xtr, ytr, Xte, yte)


def per_input_ms(fn, n, reps=1):
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="test inputs certified per encoder")
    ap.add_argument("--n-attack", type=int, default=40, help="inputs attacked for the tightness ratio")
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--smoothing-n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compare", default=None, help="earlier results JSON: per-input radius changes per route")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_input_certificates.json")))
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encs, (Xtr, ytr, Xte, yte) = encoders(args.epochs, args.weights)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=256)
    X, y = Xte[:args.n], yte[:args.n]
    machine = dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   torch=torch.__version__, load_before=os.getloadavg())
    results = dict(machine=machine, n=args.n, encoders={})
    for name, enc in encs.items():
        head = gmfast.fit_head(enc, loader, covariance_type="tied", shrinkage="ledoit-wolf", progress=False)
        with torch.no_grad():
            t_enc = per_input_ms(lambda: enc(X), len(X), reps=3)
        row = dict(encoder_ms=t_enc, routes={})
        certs = {}
        for route in ROUTES:
            c = gmfast.Certifier(enc, head, method=route)
            c.certify(X[:2])  # graph analyses are cached per input shape: time the steady state
            t, t_cpu = time.perf_counter(), time.process_time()
            cert = c.certify(X)
            ms = 1e3 * (time.perf_counter() - t) / len(X)
            # CPU seconds of this process: on a shared machine closer to the unloaded cost
            cpu_ms = 1e3 * (time.process_time() - t_cpu) / len(X)
            ok = cert.prediction == y
            certs[route] = cert
            row["routes"][route] = dict(
                ms=ms, cpu_ms=cpu_ms, clean=float(ok.double().mean()),
                certified_accuracy={str(r): float((ok & (cert.radius >= r)).double().mean()) for r in RADII},
                median_radius=float(cert.radius[ok].median()) if bool(ok.any()) else 0.0,
                radii=cert.radius.tolist())
        g = row["routes"]["lipschitz"]["median_radius"]
        for route in ROUTES:
            row["routes"][route]["median_vs_global"] = row["routes"][route]["median_radius"] / g if g > 0 else None
        # tightness: certified radius / smallest adversarial distance found
        A = min(args.n_attack, len(X))
        pred = certs["auto"].prediction[:A]
        sel = (pred == y[:A]).nonzero().reshape(-1)
        adv = min_adversarial_distance(enc.double(), head, X[:A][sel].double(), pred[sel], 2, hi=4.0, iters=10,
                                       steps=40, restarts=3)
        enc.float()
        found = torch.isfinite(adv)
        row["attack"] = dict(inputs=int(sel.numel()), found=int(found.sum()),
                             median_adv_distance=float(adv[found].median()) if bool(found.any()) else None)
        for route in ROUTES:
            r = certs[route].radius[:A][sel][found]
            row["routes"][route]["tightness_median"] = float((r / adv[found]).median()) if r.numel() else None
            assert bool((r <= adv[found]).all()), \
                f"{name}/{route}: a certified radius above a found adversarial distance"
        # randomized smoothing on the same encoder + head (a few inputs)
        from gmfast.smoothing import Smooth

        sm = Smooth((enc, head), num_classes=10, sigma=0.25, seed=0)
        k = 10
        t = time.perf_counter()
        sm.certify_batch(X[:k], n0=100, n=args.smoothing_n, alpha=0.001, batch_size=10_000)
        row["smoothing_ms"] = 1e3 * (time.perf_counter() - t) / k
        row["smoothing_n"] = args.smoothing_n
        results["encoders"][name] = row
    machine["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    if args.compare:
        print(compare(json.loads(Path(args.compare).read_text()), results))


def compare(old, new) -> str:
    """Per encoder and route, the radii of ``new`` against ``old`` (same inputs, input by input)."""
    lines = []
    for name, row in new["encoders"].items():
        for route, r in row["routes"].items():
            prev = old["encoders"].get(name, {}).get("routes", {}).get(route, {}).get("radii")
            if prev is None or len(prev) != len(r["radii"]):
                lines.append(f"{name}/{route}: no per-input radii of the same inputs to compare")
                continue
            a, b = torch.tensor(prev, dtype=torch.float64), torch.tensor(r["radii"], dtype=torch.float64)
            rel = (b - a) / a.clamp_min(1e-300)
            lines.append(f"{name}/{route}: lower on {int((b < a).sum())}, higher on {int((b > a).sum())}, "
                         f"equal on {int((b == a).sum())} of {len(a)}; relative change in "
                         f"[{float(rel.min()):.3g}, {float(rel.max()):.3g}]")
    return "\n".join(lines)


def table(res) -> str:
    m = res["machine"]
    lines = [f"machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads); "
             f"load before/after {m['load_before'][0]:.1f}/{m['load_after'][0]:.1f}; n = {res['n']} test inputs",
             "",
             "| encoder | route | clean | CA@0.1 | CA@0.25 | CA@0.5 | median radius | × global "
             "| tightness (median r/adv) "
             "| ms/input (CPU ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in res["encoders"].items():
        for route, r in row["routes"].items():
            ca = r["certified_accuracy"]
            vs = "n/a" if r["median_vs_global"] is None else f"{r['median_vs_global']:.1f}"
            ti = "n/a" if r["tightness_median"] is None else f"{r['tightness_median']:.3f}"
            lines.append(f"| {name} | {route} | {r['clean']:.3f} | {ca['0.1']:.3f} | {ca['0.25']:.3f} "
                         f"| {ca['0.5']:.3f} "
                         f"| {r['median_radius']:.4g} | {vs} | {ti} | {r['ms']:.2f} ({r['cpu_ms']:.2f}) |")
        a = row["attack"]
        lines.append(f"| {name} | (encoder forward {row['encoder_ms']:.3f} ms/input; smoothing n={row['smoothing_n']} "
                     f"{row['smoothing_ms']:.1f} ms/input; PGD found a flip on {a['found']}/{a['inputs']} inputs, "
                     f"median distance {a['median_adv_distance']}) | | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
