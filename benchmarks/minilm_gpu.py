"""Full-depth local certificates (CROWN, no cuts) for all-MiniLM-L6-v2 on one token's word
embedding, on a GPU: the six-layer run that the cut passes cannot certify and that takes hours
on two CPU cores (``benchmarks/RESULTS.md``, issue 16, "MiniLM").

Needs only the compact copy written by ``benchmarks/minilm_gpu_prepare.py`` (``--data``, default
``.devrun/minilm``); no weights package, no network. Per sentence: the tied Ledoit–Wolf head
(refitted on the stored latents), the ℓ2 ball of the word embedding at ``--position``
(:class:`TokenPerturbation`), the linearisation built on the CPU and moved to ``--device``
(:func:`gmfast.lipschitz.local_device.to_device`), a radius search of ``--steps`` balls from
``--start`` (×4 while they pass, then bisection; each ball one pass of
:func:`gmfast.lipschitz.local_cut.tied_margin_radius`, which certifies the largest radius up to
the ball that its relaxation proves),
then PGD on the CPU in the same ball (the smallest flip it finds; a flip below the radius
would be a bug). One JSON line per sentence, and all of them in ``--out``/minilm_gpu.json,
written after every sentence so a timeout keeps what finished; sentences stop when the next
would likely pass ``--budget`` seconds.

    python benchmarks/minilm_gpu.py --out $OUT [--device cuda] [--n 6] [--steps 4] [--start 2.5e-4]
        [--layers 6] [--tokens T] [--budget 400] [--row-chunk 512]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch

import gmfast
from gmfast.attack import min_adversarial_distance
from gmfast.lipschitz.local import LocalBounds
from gmfast.lipschitz.local_cut import tied_margin_radius
from gmfast.lipschitz.local_device import on_device, to_device

ROOT = Path(__file__).resolve().parents[1]


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / ".devrun" / "minilm"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--start", type=float, default=2.5e-4)
    ap.add_argument("--position", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="keep the first layers only (a smoke test)")
    ap.add_argument("--tokens", type=int, default=None, help="keep the first tokens only (a smoke test)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; no new sentence after")
    ap.add_argument("--row-chunk", type=int, default=512)
    ap.add_argument("--attack-hi", type=float, default=4.0)
    args = ap.parse_args()
    t_all = time.perf_counter()
    te = _module(ROOT / "examples" / "transformer_encoders.py", "transformer_encoders")
    prep = _module(ROOT / "benchmarks" / "minilm_gpu_prepare.py", "minilm_gpu_prepare")
    data = torch.load(Path(args.data) / "data.pt", weights_only=True)
    state = prep.unpack((Path(args.data) / "weights.xz").read_bytes(), data["index"])
    if args.layers is not None:
        state = {k: v for k, v in state.items() if not k.startswith("layers.") or int(k.split(".")[1]) < args.layers}
    head = gmfast.GaussianMixtureHead("tied", shrinkage="ledoit-wolf").fit(data["Z_train"], data["y_train"])
    dev = torch.device(args.device)
    torch.set_num_threads(max(1, min(16, os.cpu_count() or 1)))
    out = dict(device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               torch=torch.__version__, layers=args.layers or 6, position=args.position, steps=args.steps,
               start=args.start, bounds="full CROWN (LocalBounds, no cuts)", sentences=[])
    path = Path(args.out) / "minilm_gpu.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    last = 0.0
    for s, label, e in list(zip(data["sentences"], data["labels"], data["word_embeddings"]))[:args.n]:
        if time.perf_counter() - t_all + 1.5 * last > args.budget:
            out["stopped"] = f"budget {args.budget} s: next sentence would likely not finish"
            break
        t0 = time.perf_counter()
        e = e[:, :args.tokens] if args.tokens else e
        e64 = e.double()
        enc = te.MiniLMFromEmbeddings.from_state(state, e.shape[1]).double()
        w = te.TokenPerturbation(enc, e64, [args.position]).double().eval()
        x = w.tokens(e64)
        lb = LocalBounds(w, tuple(x.shape[1:]))
        lb.row_chunk = args.row_chunk
        built = time.perf_counter() - t0
        if dev.type != "cpu":
            to_device(lb, dev)
        wd = copy.deepcopy(w).to(dev)
        with torch.no_grad():
            t2 = time.perf_counter()
            pred = head.predict(w(x))
            fwd_ms = 1e3 * (time.perf_counter() - t2)
        row = dict(sentence=s, T=int(e.shape[1]), label=int(label), prediction=int(pred[0]), radius=0.0,
                   token_embedding_norm=float(x.norm()), refined_neurons=lb.n_neurons, linearise_s=built,
                   cpu_forward_ms=fwd_ms, passes=[])
        out["sentences"].append(row)
        # the radius search one ball at a time (each pass proves the largest radius <= its ball that
        # its relaxation certifies: tied_margin_radius with steps=1), the JSON written after each
        # pass so that a timeout keeps what was proved
        t1 = time.perf_counter()
        best, fail, eps = 0.0, float("inf"), args.start
        for _ in range(args.steps):
            tp = time.perf_counter()
            with on_device(dev):
                _, r = tied_margin_radius(lb, wd, head, x.to(dev), 2, steps=1, start=eps)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            got = float(r.cpu()[0])
            row["passes"].append(dict(ball=eps, certified=got, seconds=time.perf_counter() - tp))
            best = max(best, got)
            if got < eps:
                fail = min(fail, eps)
            row.update(radius=best, certify_s=time.perf_counter() - t1)
            out["elapsed_s"] = time.perf_counter() - t_all
            path.write_text(json.dumps(out, indent=1))
            if fail <= 1.05 * best:
                break
            eps = 4.0 * eps if fail == float("inf") else (math.sqrt(best * fail) if best > 0 else fail / 8.0)
        if row["radius"] > 0:
            t3 = time.perf_counter()
            adv = min_adversarial_distance(w, head, x, pred.cpu(), 2, hi=args.attack_hi, iters=8, steps=30,
                                           restarts=2)
            row.update(pgd_flip_distance=float(adv[0]), ratio=row["radius"] / float(adv[0]),
                       attack_s=time.perf_counter() - t3)  # the ratio must be < 1
        last = time.perf_counter() - t0
        out["elapsed_s"] = time.perf_counter() - t_all
        path.write_text(json.dumps(out, indent=1))
        print(json.dumps(row), flush=True)
    out["elapsed_s"] = time.perf_counter() - t_all
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
