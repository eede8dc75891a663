"""Input-space certificates on transformer encoders (issue 16, "Transformer encoders").

* **ViT** (``examples/transformer_encoders.py``: 4×4 patches of sklearn's 8×8 digits, two
  pre-LN blocks of softmax attention + GELU MLP, mean pooling; trained here in seconds) with a
  tied Ledoit–Wolf head on its latents; ℓ2 and ℓ∞ (pixels in [0, 1]); the local route with
  full CROWN and with cut passes (:class:`CutBounds`, windows 1 and 2).
* **MiniLM** (all-MiniLM-L6-v2 as a function of one sentence's word embeddings, its six
  layers, mean pooling and normalisation) with a tied head fitted on the sentence embeddings
  of ``examples/minilm_text.py``'s corpus. By default only the linearisation is measured;
  ``--minilm-certify`` certifies the one-token threat model (an ℓ2 ball of the word embedding
  at ``--minilm-position``, the other tokens fixed: :class:`TokenPerturbation`) with cut
  passes (full CROWN would refine ~4·10⁵ rows per sentence through six layers).

Per encoder: the global route (refused: LayerNorm, softmax and products of input-dependent
tensors have no global Lipschitz bound), then the local route: clean accuracy, certified
accuracy at radii, median certified radius (correct inputs), ms/input beside one encoder
forward, and the median ratio certified radius / smallest adversarial distance PGD finds.

    nice -n 19 python benchmarks/transformer_certificates.py [--n-vit 20] [--vit-steps 8] [--n-minilm 4]
        [--minilm-layers L] [--minilm-certify] [--minilm-position 1] [--minilm-start 1e-4]
        [--minilm-steps 2] [--minilm-window 1] [--minilm-report EPS] [--skip-minilm] [--skip-vit]

Results go to ``benchmarks/results_transformers.json``; the markdown rows are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import gmfast
from gmfast.attack import min_adversarial_distance
from gmfast.lipschitz import UnsupportedOpError
from gmfast.lipschitz.local_cut import CutBounds, boundary_report, tied_margin_radius

ROOT = Path(__file__).resolve().parents[1]
#: boundaries of the cut passes (:class:`CutBounds`): every LayerNorm's output and centred
#: input, each softmax's output and each scaled score matrix (``q kᵀ · scale``)
VIT_CUTS = r"(blocks\.\d+\.)?ln\d?(/center)?|softmax(_\d+)?|mul(_\d+)?"
MINILM_CUTS = r"encoder\.(emb_ln|layers\.\d+\.ln\d)(/center)?|softmax(_\d+)?|mul(_\d+)?"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def global_route(enc, head, x):
    """The global route's answer: its radii, or the refusal's first line."""
    try:
        c = gmfast.Certifier(enc, head, method="lipschitz").certify(x)
        return dict(refused=False, median_radius=float(c.radius.median()))
    except UnsupportedOpError as e:
        return dict(refused=True, reason=str(e).split(";")[0])


def local_rows(enc, head, x, y, norm, radii, domain=None, attack_n=8, attack_hi=2.0, steps=4, cut=None):
    """Certified accuracy, median radius, cost and tightness of the local route: through
    ``Certifier(method="local")`` (full CROWN), or with ``cut=(boundaries, window)`` through
    :class:`gmfast.lipschitz.local_cut.CutBounds` (passes that stop at those boundaries)."""
    t = time.perf_counter()
    if cut is None:
        c = gmfast.Certifier(enc, head, method="local", domain=domain, local_steps=steps).certify(x, norm=norm)
        pred, radius = c.prediction, c.radius
    else:
        lb = CutBounds(enc, tuple(x.shape[1:]), cut[0], cut[1])
        pred, radius = tied_margin_radius(lb, enc, head, x, norm, domain if norm == math.inf else None, steps=steps)
    ms = 1e3 * (time.perf_counter() - t) / len(y)
    with torch.no_grad():
        t = time.perf_counter()
        enc(x)
        fwd = 1e3 * (time.perf_counter() - t) / len(y)
    correct = pred == y
    r = torch.where(correct, radius, torch.zeros_like(radius))
    out = dict(norm="l2" if norm == 2 else "linf", bounds="full CROWN" if cut is None else
               f"cuts at {cut[0]!r}, window {cut[1]}", n=len(y), clean=float(correct.float().mean()),
               certified={f"{e:g}": float((r > e).float().mean()) for e in radii},
               median_radius=float(r[correct].median()) if bool(correct.any()) else 0.0,
               ms_per_input=ms, forward_ms_per_input=fwd, cpu_load=os.getloadavg()[0])
    idx = (correct & (radius > 0)).nonzero().reshape(-1)[:attack_n]
    if idx.numel():
        enc64 = enc.double()
        adv = min_adversarial_distance(enc64, head, x[idx].double(), pred[idx], norm,
                                       domain=domain if norm == math.inf else None, hi=attack_hi, iters=8,
                                       steps=30, restarts=2)
        enc.float()
        ratio = radius[idx] / adv
        out["tightness_median"] = float(ratio[torch.isfinite(adv)].median()) if bool(torch.isfinite(adv).any()) \
            else None
        out["attack_n"] = int(idx.numel())
        out["max_ratio"] = float(ratio.max())  # must be < 1: a certified radius below every flip found
    return out


def vit(args):
    te = _example("transformer_encoders")
    t = time.perf_counter()
    enc, (Xtr, ytr, Xte, yte), acc = te.train_vit(epochs=args.vit_epochs, depth=args.vit_depth)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        Z = enc(Xtr)
    head = gmfast.GaussianMixtureHead("tied", shrinkage="ledoit-wolf").fit(Z, ytr)
    x, y = Xte[:args.n_vit], yte[:args.n_vit]
    res = dict(encoder=f"TinyViT(d=32, depth={args.vit_depth}, 2 heads, 4x4 patches: 4 tokens)", train_s=train_s,
               encoder_acc=acc, global_route=global_route(enc, head, x[:4]))
    res["local"] = []
    for cut in (None, (VIT_CUTS, 1), (VIT_CUTS, 2)):
        res["local"] += [local_rows(enc, head, x, y, 2, (0.01, 0.02, 0.05), cut=cut, steps=args.vit_steps),
                         local_rows(enc, head, x, y, math.inf, (1 / 255, 2 / 255, 4 / 255), domain=(0.0, 1.0),
                                    cut=cut, steps=args.vit_steps)]
    return res


def minilm(args):
    """The traced MiniLM: equality with sentence-transformers, the global route's refusal, the
    size of the linearisation; with ``--minilm-certify`` the local route with cuts on the
    one-token threat model (:class:`TokenPerturbation`: an ℓ2 ball of the word embedding at
    ``--minilm-position``, the other tokens fixed; Shi et al. 2020): certified radius,
    ms/sentence and the smallest flip PGD finds in the same ball."""
    from gmfast.lipschitz.local import LocalBounds

    te = _example("transformer_encoders")
    mt = _example("minilm_text")
    st = te.load_minilm()
    sentences, labels = mt.build_corpus()
    Z = mt.embed(st, sentences)
    n_train = int(0.7 * len(labels))
    head = gmfast.GaussianMixtureHead("tied", shrinkage="ledoit-wolf").fit(Z[:n_train], labels[:n_train])
    test = list(range(n_train, len(labels)))[:args.n_minilm]
    rows = []
    for i in test:
        e = te.word_embeddings(st, sentences[i])
        enc = te.MiniLMFromEmbeddings(st, e.shape[1], layers=args.minilm_layers)
        t = time.perf_counter()
        lb = LocalBounds(enc, tuple(e.shape[1:]))
        row = dict(sentence=sentences[i], T=e.shape[1], word_embedding_norm=float(e[0].norm(dim=-1).median()),
                   max_abs_diff_vs_sentence_transformers=te.check_minilm(st, [sentences[i]], args.minilm_layers)
                   if args.minilm_layers is None else None,
                   refined_neurons_full_crown=lb.n_neurons, linearise_s=time.perf_counter() - t,
                   global_route=global_route(enc, head, e))
        if args.minilm_certify:
            row["local"] = minilm_token(te, enc.double(), head, e.double(), int(labels[i]), args)
        if args.minilm_report is not None:
            row["boundary_report"] = minilm_report(te, enc.double(), e.double(), args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return dict(encoder=f"all-MiniLM-L6-v2 from word embeddings ({args.minilm_layers or 6} layers)",
                threat_model=f"l2 ball of the word embedding at token position {args.minilm_position} (the first "
                "word after [CLS]); other tokens fixed", cuts=MINILM_CUTS, window=args.minilm_window,
                sentences=rows)


def minilm_report(te, enc, e, args):
    """Where the cut passes' widths come from (:func:`boundary_report`) at ``--minilm-report ε``
    on the one-token ball, beside the exact first-order width ``2ε max_i ‖∇h_i(x)‖₂`` of each
    LayerNorm output (forward-mode Jacobian at the centre)."""
    w = te.TokenPerturbation(enc, e, [args.minilm_position]).double().eval()
    x = w.tokens(e)
    eps = args.minilm_report
    lb = CutBounds(w, tuple(x.shape[1:]), MINILM_CUTS, args.minilm_window)
    lb.row_chunk, lb.keep_bounds = 512, True
    t = time.perf_counter()
    rep = boundary_report(lb, lb.prepare(x, eps, 2))
    seconds = time.perf_counter() - t
    mods = {f"encoder.{n}": m for n, m in enc.named_modules() if n == "emb_ln" or n.endswith(("ln1", "ln2"))}

    def outs(z):
        got = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: got.append(o)) for m in mods.values()]
        w(z)
        for h in hooks:
            h.remove()
        return tuple(got)

    jac = torch.func.jacfwd(outs)(x)
    exact = {n: 2 * eps * float(j.reshape(-1, x.numel()).norm(dim=1).max()) for n, j in zip(mods, jac)}
    for r in rep:
        r["exact_first_order_width"] = exact.get(r["name"])
    return dict(eps=eps, window=args.minilm_window, prepare_s=seconds, boundaries=rep)


def minilm_token(te, enc, head, e, label, args):
    """One sentence: the local route with cuts on the one-token ball (see :func:`minilm`)."""
    w = te.TokenPerturbation(enc, e, [args.minilm_position]).double().eval()
    x = w.tokens(e)
    t = time.perf_counter()
    lb = CutBounds(w, tuple(x.shape[1:]), MINILM_CUTS, args.minilm_window)
    lb.row_chunk = 1024  # rows of (T, 1536) entries: bounds the working memory (~1 GB)
    pred, r = tied_margin_radius(lb, w, head, x, 2, steps=args.minilm_steps, start=args.minilm_start)
    s = time.perf_counter() - t
    out = dict(position=args.minilm_position, token_embedding_norm=float(x.norm()), label=label,
               prediction=int(pred), radius=float(r), ms_per_sentence=1e3 * s, refined_neurons=lb.n_neurons,
               cpu_load=os.getloadavg()[0])
    if float(r) > 0:
        adv = min_adversarial_distance(w, head, x, pred, 2, hi=args.minilm_attack_hi, iters=8, steps=30, restarts=2)
        out["pgd_flip_distance"] = float(adv)
        out["ratio"] = float(r / adv)  # must be < 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-vit", type=int, default=20)
    ap.add_argument("--vit-epochs", type=int, default=30)
    ap.add_argument("--vit-depth", type=int, default=2)
    ap.add_argument("--vit-steps", type=int, default=8, help="passes of the radius search per input")
    ap.add_argument("--n-minilm", type=int, default=4)
    ap.add_argument("--minilm-layers", type=int, default=None)
    ap.add_argument("--minilm-steps", type=int, default=2)
    ap.add_argument("--minilm-start", type=float, default=1e-4)
    ap.add_argument("--minilm-position", type=int, default=1)
    ap.add_argument("--minilm-window", type=int, default=1)
    ap.add_argument("--minilm-attack-hi", type=float, default=4.0)
    ap.add_argument("--minilm-certify", action="store_true")
    ap.add_argument("--minilm-report", type=float, default=None, metavar="EPS",
                    help="per-boundary width report of the cut passes at this radius (boundary_report)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_transformers.json")))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                   threads=torch.get_num_threads(), load_at_start=load)
    if not args.skip_vit:
        results["vit"] = vit(args)
    if not args.skip_minilm:
        results["minilm"] = minilm(args)
    results["load_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
