"""fit_head (streaming, distributed), Certifier, and the command line."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import blobs
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gmfast
from gmfast import GaussianMixtureHead as Head
from gmfast.cli import main as cli_main
from gmfast.cli import read_latents, write_latents

ROOT = Path(__file__).resolve().parents[1]


def _encoder(d_in=6, d=5, seed=1):
    enc = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, d)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return enc


def test_fit_head_equals_fit_on_all_latents():
    X, y = blobs(700, 4, 6, seed=80)
    X = torch.tensor(X)
    enc = _encoder().train()
    loader = DataLoader(TensorDataset(X, torch.tensor(y)), batch_size=64)
    head = gmfast.fit_head(enc, loader, covariance_type="full", shrinkage=0.1, progress=False)
    assert enc.training  # mode restored
    with torch.no_grad():
        Z = enc(X)
    ref = Head("full", shrinkage=0.1).fit(Z, y)
    np.testing.assert_allclose(head.means_.numpy(), ref.means_.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(head.covariances_.numpy(), ref.covariances_.numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="pairs"):
        gmfast.fit_head(enc, [X[:3]], progress=False)


def test_certifier_radius_is_latent_radius_over_L_and_never_flips():
    X, y = blobs(600, 3, 6, seed=81)
    X = torch.tensor(X)
    enc = _encoder()
    with torch.no_grad():
        Z = enc(X)
    head = Head("tied").fit(Z, y)
    L = 1.0
    for m in enc.modules():
        if isinstance(m, nn.Linear):
            L *= torch.linalg.matrix_norm(m.weight, 2).item()
    L *= 1 + 1e-12
    cert = gmfast.Certifier(enc, head, lipschitz=L, batch_size=50).certify(X[:200])
    lat = head.certify(Z[:200])
    assert torch.equal(cert.prediction, lat.prediction)
    np.testing.assert_allclose(cert.radius.numpy(), lat.radius.numpy() / L, rtol=1e-12)
    assert (cert.radius <= cert.extra["latent_radius"] / L).all()
    # PGD-style l2 attack inside the certified input radius never flips the prediction
    rng = torch.Generator().manual_seed(0)
    for i in range(200):
        R = cert.radius[i].item()
        if R == 0:
            continue
        x0 = X[i:i + 1]
        delta = torch.randn(x0.shape, generator=rng, dtype=torch.float64) * 1e-3
        c = cert.prediction[i].item()
        for _ in range(20):
            delta.requires_grad_(True)
            logp = torch.log_softmax(head(enc(x0 + delta)), 1)
            loss = logp[0, c] - logp[0].masked_fill(torch.arange(3) == c, -math.inf).max()
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta - 0.2 * R * g / (g.norm() + 1e-30)
                delta = delta * min(1.0, 0.999 * R / (delta.norm().item() + 1e-30))
        with torch.no_grad():
            assert head.predict(enc(x0 + delta)).item() == c


def test_certifier_validates():
    X, y = blobs(100, 2, 6, seed=82)
    enc = _encoder()
    with torch.no_grad():
        head = Head().fit(enc(torch.tensor(X)), y)
    with pytest.raises(ValueError, match="positive finite"):
        gmfast.Certifier(enc, head, lipschitz=-1.0)
    with pytest.raises(TypeError, match="GaussianMixtureHead"):
        gmfast.Certifier(enc, object())
    with pytest.raises(ValueError, match="l2"):
        gmfast.Certifier(enc, head, lipschitz=1.0).certify(torch.tensor(X), norm=1)  # l2 and l-inf are certified (issue 16)


def test_cli_fit_certify_round_trip(tmp_path, capsys):
    Z, y = blobs(500, 3, 4, seed=83)
    write_latents(tmp_path / "train.safetensors", torch.tensor(Z), torch.tensor(y))
    np.savez(tmp_path / "test.npz", latents=Z[:50], labels=y[:50])
    assert cli_main(["fit", "--latents", str(tmp_path / "train.safetensors"), "--out", str(tmp_path / "h.safetensors"),
                     "--shrinkage", "ledoit-wolf", "--batch-size", "128"]) == 0
    assert cli_main(["certify", "--head", str(tmp_path / "h.safetensors"), "--latents", str(tmp_path / "test.npz"),
                     "--out", str(tmp_path / "r.tsv"), "--norm", "inf"]) == 0
    lines = (tmp_path / "r.tsv").read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    rows = [ln.split("\t") for ln in lines[1:]]
    head = Head.load(tmp_path / "h.safetensors")
    ref = head.certify(Z[:50], norm=math.inf)
    assert [int(r[0]) for r in rows] == list(range(50))
    assert [int(r[2]) for r in rows] == ref.prediction.tolist()
    assert [float(r[3]) for r in rows] == ref.radius.tolist()  # full precision: bit-exact round trip
    assert [int(r[4]) for r in rows] == (ref.prediction.numpy() == y[:50]).astype(int).tolist()
    # bad input: a clear error and exit code 2
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    assert cli_main(["certify", "--head", str(tmp_path / "h.safetensors"), "--latents",
                     str(tmp_path / "bad.safetensors")]) == 2
    assert "cannot read latents" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'labels'"):
        np.savez(tmp_path / "nolab.npz", latents=Z[:5])
        read_latents(tmp_path / "nolab.npz")


def test_cli_help_for_every_command(capsys):
    for cmd in ("demo", "fit", "certify", "smooth", "analyze", "bench", "report"):
        assert cli_main([cmd, "--help"]) == 0
        assert "usage: gmfast " + cmd in capsys.readouterr().out
    # the module entry point and the console script both exist (one subprocess: each costs a torch import)
    proc = subprocess.run([sys.executable, "-m", "gmfast.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("gmfast ")
    assert shutil.which("gmfast") is not None


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29533",
                           str(ROOT / "tests" / "workers" / "dist_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "dist.safetensors"))
    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    import dist_worker

    X, y = dist_worker.data()
    enc = torch.nn.Linear(6, 5).double()
    with torch.no_grad():
        enc.weight.copy_(torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        enc.bias.zero_()
    with torch.no_grad():
        Z = enc(X)
    for kind, shrink in (("tied", 0.0), ("full", "ledoit-wolf"), ("diag", 0.1)):
        head = Head(kind, shrinkage=shrink).fit(Z[:600], y[:600])
        np.testing.assert_allclose(got[f"{kind}_means"].numpy(), head.means_.numpy(), rtol=1e-12)
        np.testing.assert_allclose(got[f"{kind}_cov"].numpy(), head.covariances_.numpy(), rtol=1e-9, atol=1e-12)
        cert = gmfast.Certifier(enc, head, lipschitz=2.0).certify(X)
        assert torch.equal(got[f"{kind}_pred"], cert.prediction)
        np.testing.assert_allclose(got[f"{kind}_radius"].numpy(), cert.radius.numpy(), rtol=1e-9)
