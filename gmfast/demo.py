"""``gmfast demo``: certified robustness on real images, end to end, on two CPU cores.

Data: scikit-learn's bundled handwritten digits (1,797 images, 8×8, 10 classes; no
download), pixels scaled to [0, 1], a stratified 75/25 split.

Three encoders are trained (one thread each). Two with a prototype loss
``logits_k = −s‖z − m_k‖²``, which shapes the latents into clusters, the structure a
Gaussian-mixture head models:

* ``cnn``: a standard small CNN (conv–BatchNorm–ReLU ×2, linear), 15 epochs. Accurate, but
  its Lipschitz bound is large, so its global-route radii are small;
* ``lipschitz``: an MLP of spectrally normalised linear layers and ReLUs (Lipschitz
  constant near 1), 80 epochs with Gaussian input noise (σ = 0.25) and a hinge on each
  sample's distance to the nearest prototype bisector (a Lipschitz-margin term, Tsuzuku et
  al. 2018), so latent radii carry over to the input;

and the certified-training recipe of :mod:`gmfast.train` (``recipe("digits")``: a Cayley/MaxMin
1-Lipschitz MLP and a tied head trained on the head's normalised margin, certified with its
trained prototypes; 300 epochs or :data:`RECIPE_BUDGET` seconds).

For each, a tied ``GaussianMixtureHead`` is fitted on the training latents
(:func:`gmfast.fit_head`; the recipe's head is its trained prototypes) and the test split is
certified in input space through a sound Lipschitz bound (:class:`gmfast.Certifier`,
``method="lipschitz"``). For the spectrally normalised encoder two heads are shown:
Ledoit–Wolf shrinkage, and full shrinkage (``shrinkage=1``, an isotropic covariance). Its
latents have a few nearly collapsed directions, which a fitted covariance amplifies
(``Σ⁻¹``): the LDA boundaries tilt toward the data and the *exact* ℓ2 radius shrinks. Randomized smoothing (Cohen et al. 2019) runs on
a base classifier of the recipe's architecture trained with Gaussian noise for the same
epochs, and the recipe is shown on the same inputs. The table gives clean accuracy,
certified accuracy at several ℓ2 radii (pixel units), time per input, and the Lipschitz
bound beside its power-iteration estimate; a second table gives every input-space route
(global, margin, local, auto) of three encoders on smoothing's inputs within a time budget;
the curves are written as a PNG.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
from torch import nn

from gmfast.train.data import load_digits_split  # the split gmfast.train's digits recipe uses

RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def cnn_encoder(latent: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, latent),
    )


def lipschitz_encoder(latent: int = 32, width: int = 256) -> nn.Module:
    """Spectrally normalised linear layers and ReLUs: Lipschitz constant near 1 in ℓ2.

    The normalisation divides by a power-iteration estimate, which can fall short of the
    true spectral norm, so the product is a little above 1; the certificates use the sound
    bound computed from the exact spectral norms, never the estimate.
    """
    from torch.nn.utils.parametrizations import spectral_norm

    return nn.Sequential(
        nn.Flatten(),
        spectral_norm(nn.Linear(64, width)), nn.ReLU(),
        spectral_norm(nn.Linear(width, width)), nn.ReLU(),
        spectral_norm(nn.Linear(width, latent)),
    )


class _Prototypes(nn.Module):
    """``logits_k = −s‖z − m_k‖²``: cross-entropy on these pulls each class to a prototype."""

    def __init__(self, latent: int, classes: int, scale: float):
        super().__init__()
        self.m = nn.Parameter(torch.randn(classes, latent) * 0.5)
        self.scale = scale

    def forward(self, z):
        return -self.scale * torch.cdist(z, self.m).square()


def train_encoder(encoder: nn.Module, X, y, *, epochs: int, latent: int, scale: float, noise: float = 0.0,
                  margin: float = 0.0, margin_weight: float = 0.0, lr: float = 3e-3, seed: int = 0,
                  progress=None) -> nn.Module:
    """Prototype cross-entropy, optional Gaussian input noise and bisector-margin hinge.

    ``progress(epoch, epochs)``, if given, is called after each epoch."""
    torch.manual_seed(seed)
    K = int(y.max()) + 1
    proto = _Prototypes(latent, K, scale)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(proto.parameters()), lr=lr)
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    with one_thread():
        _train_epochs(encoder, proto, opt, X, y, g, epochs, K, scale, noise, margin, margin_weight, progress)
    _settle_spectral_norms(encoder)
    return encoder.eval()


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside the block: these networks are tiny and their batches small,
    so several threads' synchronisation costs more than the work (4x when training, 7x for
    the local route, on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_epochs(encoder, proto, opt, X, y, g, epochs, K, scale, noise, margin, margin_weight, progress):
    for epoch in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], 64):
            idx = perm[i:i + 64]
            xb, yb = X[idx], y[idx]
            if noise:
                xb = xb + noise * torch.randn(xb.shape, generator=g)
            logits = proto(encoder(xb))
            loss = nn.functional.cross_entropy(logits, yb)
            if margin_weight:
                # signed distance to the bisector of the own and every other prototype: the
                # latent l2 radius of an isotropic head; hinge it at `margin`
                d2 = -logits / scale
                m = proto.m
                gap = (m[yb][:, None, :] - m[None]).norm(dim=-1).clamp_min(1e-6)
                dist = (d2 - d2.gather(1, yb[:, None])) / (2 * gap)
                dist = dist.masked_fill(nn.functional.one_hot(yb, K).bool(), math.inf)
                loss = loss + margin_weight * torch.relu(margin - dist.amin(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress is not None:
            progress(epoch + 1, epochs)


def _settle_spectral_norms(module: nn.Module, steps: int = 100) -> None:
    """Spectral normalisation divides by a one-step power-iteration estimate, which lags the
    true norm; reading the weight in train mode runs more steps (only the parametrisations'
    vectors change, no data and no BatchNorm statistics are involved), so each layer's norm
    ends up ~1. The certificates never rely on this: they use the exact bound."""
    from torch.nn.utils import parametrize

    with torch.no_grad():
        for m in module.modules():
            if parametrize.is_parametrized(m, "weight"):
                was = m.training
                m.train()
                for _ in range(steps):
                    _ = m.weight
                m.train(was)


def _time_per_input(fn, n: int, reps: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / max(n, 1)


class _Stages:
    """Announces each stage, reports what it cost (wall and CPU seconds) and keeps the list."""

    def __init__(self, log):
        self.log = log
        self.costs = []  # (name, wall s, cpu s)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.log(f"... {name}")
        t, c = time.perf_counter(), time.process_time()
        yield
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        self.costs.append((name, wall, cpu))
        self.log(f"    {name}: {wall:.1f} s")

    def summary(self) -> str:
        wall = sum(w for _, w, _ in self.costs)
        cpu = sum(c for _, _, c in self.costs)
        parts = " | ".join(f"{n} {w:.1f} ({c:.1f})" for n, w, c in self.costs)
        return f"time per stage, s wall (CPU): {parts} | total {wall:.1f} s wall, {cpu:.1f} s CPU"


def _epoch_progress(log, name):
    """Log training progress at each quarter of the epochs, with the time so far."""
    t0 = time.perf_counter()

    def progress(epoch, epochs):
        if epoch == epochs or epoch % max(1, epochs // 4) == 0:
            log(f"    {name}: epoch {epoch}/{epochs} ({time.perf_counter() - t0:.1f} s)")

    return progress


#: Randomized-smoothing settings of the demo (Cohen et al.'s CERTIFY): noise, selection and
#: estimation samples, failure probability, inputs certified (every k-th test image).
SMOOTHING = dict(sigma=0.25, n0=100, n=10_000, alpha=0.001, inputs=100)
SMOOTHING_QUICK = dict(sigma=0.25, n0=100, n=1_000, alpha=0.001, inputs=60)
#: Training epochs per encoder. The CNN only has to be accurate (its row shows that a large
#: Lipschitz bound leaves no input-space certificate), and it costs ~10x the MLP per epoch.
EPOCHS = dict(cnn=15, lipschitz=80)
EPOCHS_QUICK = dict(cnn=3, lipschitz=8)
#: Seconds of training for the certified-training recipe (:func:`gmfast.train.recipe`
#: ``("digits")``: Cayley/MaxMin MLP, loss on the normalised margin): its 300 epochs take ~25 s on
#: a quiet core; the budget only caps a heavily loaded machine, where fewer epochs are trained
#: (and certify less). Smoothing's base classifier, the same architecture trained with
#: Gaussian noise, gets the same number of epochs.
RECIPE_BUDGET = 60.0
RECIPE_BUDGET_QUICK = 2.0
#: Input-space routes: the local route (the costly one) runs on smoothing's inputs in chunks of
#: ``ROUTE_CHUNK`` while the next chunk is expected to end within this many seconds per
#: encoder (at least one chunk); the other routes then run on the same inputs.
ROUTE_BUDGET = 10.0
ROUTE_BUDGET_QUICK = 4.0
ROUTE_CHUNK = 20


def smoothing_max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` samples at level ``α``:
    ``σ Φ⁻¹(α^{1/n})`` (every sample of the top class gives ``p_A = α^{1/n}``)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def run_demo(*, quick: bool = False, out="gmfast_demo.png", seed: int = 0, smoothing: bool = True,
             log=print, epochs: dict | None = None) -> dict:
    """Run the demo; returns the table rows, the stage costs (and writes the plot to ``out``).

    ``epochs`` = ``{"cnn": .., "lipschitz": ..}`` overrides :data:`EPOCHS`."""
    import gmfast
    from gmfast.plot import certified_accuracy_curve, plot_certified_accuracy

    torch.manual_seed(seed)
    stage = _Stages(log)
    with stage("load digits"):
        Xtr, ytr, Xte, yte = load_digits_split(seed)
    log(f"digits: {len(Xtr)} train / {len(Xte)} test images, 8x8, 10 classes (scikit-learn, bundled)")
    epochs = dict(epochs or (EPOCHS_QUICK if quick else EPOCHS))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=256)
    sm_cfg = SMOOTHING_QUICK if quick else SMOOTHING
    sigma = sm_cfg["sigma"]
    with stage(f"train cnn encoder ({epochs['cnn']} epochs)"):
        enc_cnn = train_encoder(cnn_encoder(), Xtr, ytr, epochs=epochs["cnn"], latent=32, scale=0.5, seed=seed,
                                progress=_epoch_progress(log, "cnn"))
    with stage(f"train lipschitz encoder ({epochs['lipschitz']} epochs)"):
        enc_lip = train_encoder(lipschitz_encoder(), Xtr, ytr, epochs=epochs["lipschitz"], latent=32, scale=1.0,
                                noise=sigma, margin=1.0, margin_weight=3.0, seed=seed,
                                progress=_epoch_progress(log, "lipschitz"))
    from gmfast.train.recipe import final_head, recipe, train

    budget = RECIPE_BUDGET_QUICK if quick else RECIPE_BUDGET
    rec = recipe("digits", seed=seed)
    with stage(f"train certified recipe (Cayley/MaxMin MLP, {rec.epochs} epochs or {budget:g} s)"):
        with one_thread():
            enc_rec, proto_rec, hist = train(rec, Xtr, ytr, time_budget=budget, progress=False,
                                             log=lambda m: log("    " + m))
    log(f"    recipe: {hist['epochs']} epochs in {hist['seconds']:.1f} s, train accuracy "
        f"{100 * hist['train_accuracy'][-1]:.1f}%")
    setups = {  # name -> (encoder, shrinkage of the refitted tied head, or the head itself)
        "cnn encoder, LW": (enc_cnn, "ledoit-wolf"),
        "lipschitz enc., LW": (enc_lip, "ledoit-wolf"),
        "lipschitz enc., isotropic": (enc_lip, 1.0),
        # the recipe's own head (its trained prototypes, equal priors)
        "trained Cayley/MaxMin, proto.": (enc_rec, final_head(rec, enc_rec, proto_rec, Xtr, ytr)),
    }
    rows, curves, vlines = [], {}, {}
    certs = {}
    with stage("fit heads, Lipschitz bounds, certify"):
        for name, (enc, shrink) in setups.items():
            head = shrink if isinstance(shrink, gmfast.GaussianMixtureHead) else \
                gmfast.fit_head(enc, loader, covariance_type="tied", shrinkage=shrink, progress=False)
            certifier = gmfast.Certifier(enc, head, method="lipschitz")
            cert = certifier.certify(Xte)
            lb = certifier.lipschitz_bound(tuple(Xte.shape[1:]))
            with torch.no_grad():
                t_enc = _time_per_input(lambda: enc(Xte), len(Xte))
            t_cert = _time_per_input(lambda: certifier.certify(Xte), len(Xte))
            ca = gmfast.certified_accuracy(cert, yte, RADII)
            rows.append(dict(method=f"gmfast, {name}", L=float(lb), L_est=getattr(lb, "estimate", None),
                             accuracy=ca, ms=1e3 * t_cert, ms_encoder=1e3 * t_enc, samples=1, abstained=0.0))
            curves[f"gmfast ({name})"] = certified_accuracy_curve(cert, yte, max_radius=max(RADII) * 1.2)
            certs[name] = (enc, head, cert)
    smooth_info = None
    n_eval = sm_cfg["inputs"]
    idx = torch.arange(0, len(Xte), max(1, len(Xte) // n_eval))[:n_eval]  # smoothing's (and the routes') inputs
    if smoothing:
        from gmfast.smoothing import Smooth

        n0, n, alpha = sm_cfg["n0"], sm_cfg["n"], sm_cfg["alpha"]
        base_recipe = rec.replace(loss="ce", noise=sigma, epochs=hist["epochs"])
        with stage(f"train smoothing base (Cayley/MaxMin MLP, Gaussian noise σ={sigma}, {hist['epochs']} epochs)"):
            with one_thread():
                enc_sm, proto_sm, _ = train(base_recipe, Xtr, ytr, progress=False)
            base = nn.Sequential(enc_sm, proto_sm).eval()
        with stage(f"randomized smoothing ({len(idx)} inputs x {n0 + n} samples)"):
            sm = Smooth(base, num_classes=10, sigma=sigma, seed=seed)
            t = time.perf_counter()
            with torch.no_grad():
                sc = sm.certify_batch(Xte[idx], n0=n0, n=n, alpha=alpha, batch_size=10_000)
            t_sm = (time.perf_counter() - t) / len(idx)
        ca = gmfast.certified_accuracy(sc, yte[idx], RADII)
        r_max = smoothing_max_radius(sigma, n, alpha)
        abstained = float((sc.prediction < 0).double().mean())
        _, _, cert_rec = certs["trained Cayley/MaxMin, proto."]
        rec_row = next(r for r in rows if r["method"] == "gmfast, trained Cayley/MaxMin, proto.")
        rows.append(rec_row | dict(method=f"gmfast, trained Cayley/MaxMin, proto. (same {len(idx)} in.)",
                                   ms_encoder=None,
                                   accuracy=gmfast.certified_accuracy((cert_rec.prediction[idx],
                                                                       cert_rec.radius[idx]), yte[idx], RADII)))
        rows.append(dict(method=f"smoothing σ={sigma}, Cayley/MaxMin base ({len(idx)} in.)", L=None, L_est=None,
                         accuracy=ca, ms=1e3 * t_sm, ms_encoder=None, samples=n0 + n, abstained=abstained))
        label = f"randomized smoothing (σ={sigma}, n={n}, α={alpha:g}; {len(idx)} inputs)"
        curves[label] = certified_accuracy_curve(sc, yte[idx], max_radius=max(RADII) * 1.2)
        vlines[f"largest radius smoothing can certify with n={n}, α={alpha:g}: σΦ⁻¹(α^(1/n)) = {r_max:.3f}"] = r_max
        smooth_info = dict(sigma=sigma, n0=n0, n=n, alpha=alpha, inputs=len(idx), r_max=r_max, abstained=abstained,
                           epochs=hist["epochs"])
    route_setups = {name: certs[name][:2] for name in ("cnn encoder, LW", "lipschitz enc., isotropic",
                                                      "trained Cayley/MaxMin, proto.")}
    route_budget = ROUTE_BUDGET_QUICK if quick else ROUTE_BUDGET
    with stage(f"input-space routes ({len(idx)} inputs, {route_budget:g} s per encoder)"):
        with one_thread():
            routes = route_table(route_setups, Xte[idx], yte[idx], budget=route_budget)
    with stage("plot"):
        path = plot_certified_accuracy(curves, out, vlines=vlines, xlabel="ℓ2 input radius (pixels in [0, 1])",
                                       title="digits: certified accuracy under ℓ2 input perturbations")
    _print_table(rows, log, smooth_info)
    _print_routes(routes, log, route_budget)
    with stage("distributional section"):
        dist = _distributional_section(certs["lipschitz enc., LW"], loader, Xte, yte, quick, log)
    log("")
    log(stage.summary())
    log(f"plot: {path}")
    return dict(rows=rows, plot=str(path), distributional=dist, stages=stage.costs, smoothing=smooth_info,
                routes=routes, recipe_epochs=hist["epochs"])


def route_table(setups: dict, X, y, *, budget: float, chunk: int = ROUTE_CHUNK) -> list[dict]:
    """Certified accuracy and cost per input-space route of :class:`gmfast.Certifier` on the
    first inputs of ``X``.

    ``setups``: ``{name: (encoder, head)}``. For each, ``method="local"`` certifies ``X`` in
    chunks of ``chunk`` inputs while the next chunk, at the mean time per chunk so far, is
    expected to end within ``budget`` seconds (at least one chunk; the per-model work, bounds
    and trace, is done before the clock starts). ``"lipschitz"``, ``"margin"`` and ``"auto"``
    (the default: the per-input maximum of the routes, whose local search starts above the
    others' radii) then certify the same inputs, each timed alone. An encoder the local route
    refuses gets the other rows, on the first chunk, and the reason in ``skipped``.
    Returns rows ``dict(encoder, route, inputs, accuracy, ms, skipped)``.
    """
    import gmfast
    from gmfast.lipschitz import UnsupportedOpError

    rows = []
    for name, (enc, head) in setups.items():
        local, skipped, n = gmfast.Certifier(enc, head, method="local"), {}, chunk
        try:
            local.certify(X[:1])
        except UnsupportedOpError as e:
            skipped["local"] = str(e)
        if not skipped:
            preds, radii, n = [], [], 0
            t = time.perf_counter()
            while n < len(X) and (n == 0 or (time.perf_counter() - t) * (1 + 1 / len(preds)) <= budget):
                cert = local.certify(X[n:n + chunk])
                preds.append(cert.prediction)
                radii.append(cert.radius)
                n += len(cert.prediction)
            ms = 1e3 * (time.perf_counter() - t) / n
        Xn, yn = X[:n], y[:n]
        for route in ("lipschitz", "margin", "local", "auto"):
            if route == "local":
                if not skipped:
                    rows.append(dict(encoder=name, route=route, inputs=n, ms=ms, skipped=None,
                                     accuracy=gmfast.certified_accuracy((torch.cat(preds), torch.cat(radii)), yn,
                                                                        RADII)))
                continue
            c = gmfast.Certifier(enc, head, method=route)
            c.certify(X[:1])
            t = time.perf_counter()
            cert = c.certify(Xn)
            t = time.perf_counter() - t
            if route != "auto":  # microseconds: the best of a few repeats
                t = n * _time_per_input(lambda: c.certify(Xn), n)
            rows.append(dict(encoder=name, route=route, inputs=n, ms=1e3 * t / n,
                             skipped=(skipped | cert.extra["skipped"]) if route == "auto" else None,
                             accuracy=gmfast.certified_accuracy(cert, yn, RADII)))
    return rows


def _print_routes(rows, log, budget) -> None:
    labels = [f"{r['encoder']}: {r['route']}" for r in rows]
    width = max(len(s) for s in labels) + 1
    hdr = (f"{'encoder: route':<{width}} {'inputs':>6} " + " ".join(f"{'r=' + format(r, 'g'):>7}" for r in RADII)
           + f" {'ms/input':>9}")
    log("")
    log("input-space routes of gmfast.Certifier, certified accuracy (%) on smoothing's inputs (the first that "
        f"method='local' certifies in {budget:g} s per encoder):")
    log(hdr)
    log("-" * len(hdr))
    for label, r in zip(labels, rows):
        ms = f"{r['ms']:.3f}"
        log(f"{label:<{width}} {r['inputs']:>6} " + " ".join(f"{100 * a:>7.1f}" for a in r["accuracy"]) + f" {ms:>9}")
    log("  lipschitz: latent radius / global Lipschitz bound; margin: each margin over its own Lipschitz constant; "
        "local: linear bound propagation (CROWN) over the input ball; auto (the default): the per-input maximum "
        "of the routes, its local search started above the other routes' radii. Each route timed alone.")
    for r in rows:
        for route, why in (r["skipped"] or {}).items():
            log(f"  {r['encoder']}: {route} route skipped: {' '.join(why.split())[:160]}")


def _distributional_section(setup, loader, Xte, yte, quick, log) -> dict:
    """The paper's guarantee on the demo's latents: certified accuracy of the fitted mixture Q
    next to the observed one, the lower bound CA_Q − TV(KL) for a stated KL, the labelled k-NN
    estimate of KL, and whether more prototypes per class pay."""
    from gmfast.bounds import joint_kl_estimate, report
    from gmfast.fit import encode
    from gmfast.multiproto import compare_prototypes, format_prototype_table

    enc, head, _ = setup
    with torch.no_grad():
        Ztr = torch.cat([encode(enc, x, torch.device("cpu")) for x, _ in loader]).double()
        ytr = torch.cat([y for _, y in loader])
        Zte = encode(enc, Xte, torch.device("cpu")).double()
    radii = (0.0, 0.05, 0.1, 0.25)
    kl = 0.05
    res = report(head, Zte, yte, radii, kl=kl, n_samples=2**13 if quick else 2**15)
    kl_est = joint_kl_estimate(head, Zte, yte)
    log("")
    log("distributional guarantee in latent space (lipschitz encoder, Ledoit-Wolf head):")
    log(f"  {'radius':>8} {'observed':>9} {'CA_Q':>8} {'CA_P lower bound if KL(P||Q)<=' + format(kl, 'g'):>34}")
    for i, r in enumerate(radii):
        log(f"  {r:>8g} {100 * res['empirical'][i]:>8.1f}% {100 * res['ca_q'][i]:>7.1f}% "
            f"{100 * res['lower_bound'][i]:>33.1f}%")
    g = res["gaussianity"]
    log(f"  k-NN estimate of KL(P||Q): {kl_est:.3g} nats (d={Zte.shape[1]}, ~{len(yte) // 10} test latents per "
        "class: far too few for this estimator, whose bias grows with d; no guarantee can use it). "
        f"Lowest per-class chi2 p-value {min(v[2] for v in g.values()):.2g}: the classes are not Gaussian.")
    # M = 4 costs a minute of EM on two cores; M = 2 answers the question
    rows = compare_prototypes(Ztr, ytr, Zte, yte, Ms=(1, 2), radii=radii, shrinkage="ledoit-wolf")
    log("does a closer fit pay? several prototypes per class, EM, one shared Ledoit-Wolf covariance:")
    for line in format_prototype_table(rows).splitlines()[1:]:
        log("  " + line)
    return dict(report=res, kl_estimate=kl_est, prototypes=rows)


def _print_table(rows, log, smooth=None) -> None:
    width = max(len(r["method"]) for r in rows) + 1
    hdr = (f"{'method':<{width}} {'L bound':>8} {'L est.':>7} "
           + " ".join(f"{'r=' + format(r, 'g'):>7}" for r in RADII) + f" {'ms/input':>9} {'samples':>8}")
    log("")
    log("certified accuracy (%) at l2 input radius r (pixels in [0,1]): correct and certified at r")
    log(hdr)
    log("-" * len(hdr))
    for r in rows:
        L = "-" if r["L"] is None else f"{r['L']:.3g}" if r["L"] >= 10 else f"{r['L']:.2f}"
        Le = "-" if r.get("L_est") is None else f"{r['L_est']:.3g}" if r["L_est"] >= 10 else f"{r['L_est']:.2f}"
        acc = " ".join(f"{100 * a:>7.1f}" for a in r["accuracy"])
        log(f"{r['method']:<{width}} {L:>8} {Le:>7} {acc} {r['ms']:>9.3f} {r['samples']:>8}")
    log("  r=0: for the gmfast rows, clean accuracy (the closed form answers every input; radius 0 means "
        "not certified).")
    if smooth is not None:
        log(f"  r=0 for smoothing: correct and not abstained ({100 * smooth['abstained']:.1f}% of its "
            f"{smooth['inputs']} inputs abstained); each radius holds with probability 1-α. Settings: "
            f"σ={smooth['sigma']}, n0={smooth['n0']} selection + n={smooth['n']} estimation samples per input, "
            f"α={smooth['alpha']:g}; no radius above σΦ⁻¹(α^(1/n)) = {smooth['r_max']:.3f} can be certified "
            "with these n and α.")
    log("  L bound: sound upper bound on the encoder's l2 Lipschitz constant, computed from its layers (input "
        "radius = latent radius / L bound). L est.: a lower estimate of the same constant (power iteration on "
        "the encoder's Jacobian at a few random points); the true constant lies between the two.")
    log("  LW: Ledoit-Wolf shrinkage of the fitted covariance; isotropic: shrinkage=1 (covariance ∝ I).")
    enc_ms = [r for r in rows if r.get("ms_encoder")]
    for r in enc_ms:
        log(f"  {r['method']}: certify {r['ms']:.4f} ms/input vs the encoder's own forward {r['ms_encoder']:.4f} "
            f"ms/input ({r['ms'] / r['ms_encoder']:.2f}x)")
    if enc_ms:
        log("  (these encoders take ~1 us per input, so a fixed per-call cost shows; on a CIFAR-sized CNN "
            "certify costs 1.02x the forward: benchmarks/RESULTS.md)")
