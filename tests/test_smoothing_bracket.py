"""``benchmarks/smoothing_bracket.py``: the interval on CERTIFY's expected certified count,
checked on a linear base whose ``p_A`` is known in closed form (``Φ(d/σ)`` at signed
distance ``d`` from the boundary) and against the mean of many real CERTIFY runs."""

import json

import numpy as np
import pytest
import torch
from helpers import benchmark_module
from safetensors.torch import save_file
from scipy import stats
from torch import nn

from gmfast.smoothing import Smooth
from gmfast.train import recipe
from gmfast.train.layers import build_encoder, mlp_architecture
from gmfast.train.loss import TiedPrototypeHead


def _sb():
    return benchmark_module("smoothing_bracket")


class _Halfplane(nn.Module):
    """Two classes split by ``x·w = b``; class 1 on the positive side."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x @ self.w - self.b
        return torch.stack((-s, s), dim=1)


def _problem(seed=0, B=24, sigma=0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([0.6, 0.8], dtype=torch.float64)  # unit normal
    d = torch.linspace(-0.4, 1.6, B, dtype=torch.float64)  # signed distances: borderline to far
    t = torch.tensor([-0.8, 0.6], dtype=torch.float64)
    X = d[:, None] * w + 0.3 * torch.randn(B, 1, generator=g, dtype=torch.float64) * t  # move along the boundary
    y = torch.ones(B, dtype=torch.int64)
    y[::5] = 0  # some labels disagree with the smoothed prediction: they never count
    p_true = stats.norm.cdf(np.abs(d.numpy()) / sigma)  # P(f(x + δ) = class of x's side)
    side = (d > 0).long().numpy()
    return _Halfplane(w, 0.0), X, y, p_true, side


def test_count_thresholds_are_the_least_count_reaching_each_radius():
    sb = _sb()
    from gmfast.binomial import clopper_pearson_lower

    n, alpha, sigma = 2000, 0.001, 0.5
    radii = [0.0, 0.3, 0.9, 1.3, 1.4, 5.0]  # n = 2000 reaches at most 0.5·Φ⁻¹(0.001^(1/2000)) ≈ 1.35
    k_eps = sb.count_thresholds(sigma, radii, n, alpha)
    for eps, k in zip(radii, k_eps):
        def cert(k):  # CERTIFY's decision for N_A = k, recomputed with scipy's Beta in float64
            p = stats.beta.ppf(alpha, k, n - k + 1) if 0 < k < n else (alpha ** (1 / n) if k == n else 0.0)
            return p > 0.5 and sigma * stats.norm.ppf(p) >= eps * (1 + 1e-12)
        if k == n + 1:
            assert not cert(n) and eps > 1.3  # beyond the largest radius n samples can give
        else:
            assert cert(k) and not cert(k - 1), (eps, k)
            assert clopper_pearson_lower(k, n, alpha) > 0.5


def test_bracket_covers_the_closed_form_expectation():
    sb = _sb()
    base, X, y, p_true, side = _problem()
    radii, n = [0.0, 0.25, 0.5, 1.0], 100_000
    b = sb.bracket(Smooth(base, num_classes=2, sigma=0.5, seed=1), X, y, radii, n=n, delta=1e-4,
                   checkpoints=(500, 2000, 8000), batch_size=50_000)
    assert np.array_equal(b["c_a"], side)  # selection by 100 samples: these distances leave no doubt
    assert np.all(b["p_lo"] <= p_true) and np.all(p_true <= b["p_hi"])
    k_eps = np.asarray(b["k_eps"])
    exact = (side == y.numpy())[:, None] * stats.binom.sf(k_eps[None, :] - 1, n, p_true[:, None])
    assert np.all(b["lower"] <= exact + 1e-12) and np.all(exact <= b["upper"] + 1e-12)
    assert np.all(b["lower"][side != y.numpy()] == 0) and np.all(b["upper"][side != y.numpy()] == 0)
    # the sums are the accuracies, and the bracket is informative: wide only where p_A is borderline
    assert np.allclose(b["accuracy_lower"], b["lower"].mean(0)) and np.all(b["accuracy_lower"] <= b["accuracy_upper"])
    assert (b["accuracy_upper"] - b["accuracy_lower"]).max() < 0.25
    assert b["m"].min() == 500 and b["m"].max() == 8000  # far inputs stop at once, borderline ones go on
    # selection, estimation, and the one discarded selection draw of each later checkpoint
    later = sum((b["m"] >= c).sum() for c in (2000, 8000))
    assert b["evaluations"] == 100 * len(X) + b["m"].sum() + later


def test_bracket_covers_the_mean_of_real_certify_runs():
    """CERTIFY itself, run 40 times at n = 4,000: the mean certified count at each radius lies
    in the bracket up to Monte Carlo error (3 standard errors of the mean)."""
    sb = _sb()
    base, X, y, _, _ = _problem(seed=3, B=16)
    radii, n, runs = [0.0, 0.3, 0.6, 1.0], 4000, 40
    b = sb.bracket(Smooth(base, num_classes=2, sigma=0.5, seed=2), X, y, radii, n=n, delta=1e-4,
                   checkpoints=(2000, 16000), batch_size=50_000)
    sm = Smooth(base, num_classes=2, sigma=0.5, seed=3)
    counts = []
    for _ in range(runs):
        pred, rad = sm.certify_batch(X, n0=100, n=n, alpha=0.001, batch_size=100_000)
        counts.append([((pred == y) & (rad >= eps)).sum().item() if eps > 0 else (pred == y).sum().item()
                       for eps in radii])
    counts = np.asarray(counts, dtype=np.float64)
    mean, se = counts.mean(0), counts.std(0, ddof=1) / np.sqrt(runs) + 1e-9
    lower, upper = b["lower"].sum(0), b["upper"].sum(0)
    assert np.all(mean >= lower - 3 * se - 0.05) and np.all(mean <= upper + 3 * se + 0.05), (mean, lower, upper)


def test_bracket_refuses_bad_arguments():
    sb = _sb()
    base, X, y, _, _ = _problem()
    sm = Smooth(base, num_classes=2, sigma=0.5, seed=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        sb.bracket(sm, X, y, [0.0], checkpoints=(100, 100))
    with pytest.raises(ValueError, match="labels"):
        sb.bracket(sm, X, y[:-1], [0.0])


def test_cli_loads_a_stored_base_and_writes_its_record(tmp_path):
    """The command line on MNIST's smoothing subset with a stored (untrained, small) base:
    the record names the recipe, the images and the bracket, and the base is not retrained."""
    sb = _sb()
    over = {"architecture": mlp_architecture(784, [16], 8, linear="cayley_linear"), "latent": 8}
    rs = recipe("mnist", **over).replace(loss="ce", noise=0.5)
    torch.manual_seed(0)
    base = nn.Sequential(build_encoder(rs.architecture), TiedPrototypeHead(rs.latent, rs.classes, rs.covariance))
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path),
              metadata={"recipe": json.dumps(rs.to_json(), sort_keys=True)})  # as the script writes it
    assert sb.main(["--sigma", "0.5", "--recipe-overrides", json.dumps(over), "--base", str(path),
                    "--tag", "t", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "mnist_bracket_t_sigma0.5.json").read_text())
    assert rec["trained"] is False and rec["recipe"]["noise"] == 0.5 and len(rec["subset"]) == 200
    lo, est, hi = (np.asarray(rec[k]) for k in ("accuracy_lower", "accuracy_estimate", "accuracy_upper"))
    assert lo.shape == (5,) and np.all(lo <= est) and np.all(est <= hi)


def test_cli_refuses_a_base_trained_with_another_recipe(tmp_path):
    sb = _sb()
    over = {"architecture": mlp_architecture(784, [16], 8, linear="cayley_linear"), "latent": 8}
    other = recipe("mnist", **over).replace(loss="ce", noise=1.0)  # the base of σ = 1.0
    base = nn.Sequential(build_encoder(other.architecture), TiedPrototypeHead(other.latent, other.classes))
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path),
              metadata={"recipe": json.dumps(other.to_json(), sort_keys=True)})
    with pytest.raises(ValueError, match="was trained with recipe"):
        sb.main(["--sigma", "0.5", "--recipe-overrides", json.dumps(over), "--base", str(path), "--out", str(tmp_path)])
