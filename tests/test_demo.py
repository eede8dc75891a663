"""The main job runs end to end: `gmfast demo --quick` prints its table and writes the plot;
the table and the curves say what they mean (fast tests below need no training)."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy import stats

from gmfast.demo import RADII, _print_table, smoothing_max_radius
from gmfast.plot import certified_accuracy_curve
from gmfast.smoothing import Smooth


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_demo_quick(tmp_path):
    exe = shutil.which("gmfast")
    assert exe is not None, "the gmfast console script is not installed"
    out = tmp_path / "curve.png"
    proc = subprocess.run([exe, "demo", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("certified accuracy (%)", "gmfast, cnn encoder", "gmfast, lipschitz enc., isotropic",
                   "smoothing σ=0.25", "distributional guarantee", "does a closer fit pay?",
                   "n0=100", "α=0.001", "L est.:", "LW: Ledoit-Wolf", "r=0 for smoothing",
                   "cnn: epoch 3/3", "time per stage"):
        assert needle in text, needle
    # each stage reports its cost
    for stage in ("load digits", "train cnn encoder", "train lipschitz encoder", "randomized smoothing", "plot"):
        assert re.search(rf"{stage}[^|\n]*: \d+\.\d s", text), stage
    assert out.exists() and out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Lipschitz encoder's bound is computed, close to 1, and above its estimate
    row = next(line for line in text.splitlines() if line.startswith("gmfast, lipschitz enc., isotropic"))
    bound, est = (float(v) for v in row.split()[4:6])
    assert 0.9 < bound < 1.5 and est <= bound


def test_table_columns_line_up_and_footnotes_explain():
    rows = [dict(method="gmfast, cnn encoder, LW", L=284.0, L_est=9.4, accuracy=np.full(len(RADII), 0.5), ms=0.005,
                 ms_encoder=0.006, samples=1),
            dict(method="smoothing σ=0.25, same enc.+head (100 in.)", L=None, L_est=None,
                 accuracy=np.full(len(RADII), 0.25), ms=300.0, ms_encoder=None, samples=10100)]
    lines = []
    smooth = dict(sigma=0.25, n0=100, n=10_000, alpha=0.001, inputs=100, abstained=0.04,
                  r_max=smoothing_max_radius(0.25, 10_000, 0.001))
    _print_table(rows, lines.append, smooth)
    header = next(ln for ln in lines if ln.startswith("method"))
    ends = [m.end() for m in re.finditer(r"\S+", header)]
    for ln in lines:
        if ln.startswith(("gmfast, cnn", "smoothing σ")):
            # every value ends where its header ends: no label overflows its column
            got = [m.end() for m in re.finditer(r"\S+", ln)]
            # L, L est., the radii, ms/input, samples (the header's "L bound" and "L est." are two words each)
            assert got[-(len(RADII) + 3):] == ends[-(len(RADII) + 3):], (ln, header)
            assert got[-(len(RADII) + 4)] == ends[-(len(RADII) + 5)], (ln, header)
    text = "\n".join(lines)
    for needle in ("n0=100", "n=10000", "α=0.001", "4.0% of its 100 inputs abstained", "0.800", "L bound:",
                   "L est.:", "LW: Ledoit-Wolf", "r=0: for the gmfast rows, clean accuracy"):
        assert needle in text, needle


def test_smoothing_curve_from_per_input_radii_stops_at_the_largest_certifiable_radius():
    sigma, n, alpha = 0.25, 500, 0.01
    r_max = smoothing_max_radius(sigma, n, alpha)
    assert r_max == pytest.approx(sigma * stats.norm.ppf(alpha ** (1 / n)), rel=1e-15)

    class Constant(torch.nn.Module):  # always class 0: every input gets the largest radius
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 3).double()

    cert = Smooth(Constant(), 3, sigma, seed=0).certify_batch(torch.zeros(20, 2), 10, n, alpha, 1000)
    assert (cert.radius <= r_max).all() and (cert.radius > 0.999 * r_max).all()
    radii, acc = certified_accuracy_curve(cert, torch.zeros(20, dtype=torch.long), max_radius=2 * r_max)
    assert (acc[radii <= 0.999 * r_max] == 1).all() and (acc[radii > r_max] == 0).all()
