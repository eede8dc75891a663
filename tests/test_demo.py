"""The main job runs end to end: `gmfast demo --quick` prints its table and writes the plot."""

import shutil
import subprocess

import pytest


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
                   "smoothing σ=0.25", "distributional guarantee", "does a closer fit pay?"):
        assert needle in text, needle
    assert out.exists() and out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Lipschitz encoder's bound is computed, close to 1, and above its estimate
    row = next(line for line in text.splitlines() if line.startswith("gmfast, lipschitz enc., isotropic"))
    bound, est = (float(v) for v in row.split()[4:6])
    assert 0.9 < bound < 1.5 and est <= bound
