"""The main job runs end to end: `gmfast demo --quick` prints its table and writes the plot;
the table and the curves say what they mean (fast tests below need no training)."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy import stats

import gmfast
from gmfast.demo import RADII, _print_routes, _print_table, route_table, smoothing_max_radius
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
                   "gmfast, trained Cayley/MaxMin, proto.", "gmfast, trained Cayley/MaxMin, proto. (same 60 in.)",
                   "smoothing σ=0.25, Cayley/MaxMin base (60 in.)", "distributional guarantee", "does a closer fit pay?",
                   "n0=100", "α=0.001", "L est.:", "LW: Ledoit-Wolf", "r=0 for smoothing",
                   "cnn: epoch 3/3", "time per stage", "input-space routes of gmfast.Certifier"):
        assert needle in text, needle
    # each stage reports its cost
    for stage in ("load digits", "train cnn encoder", "train lipschitz encoder", "train certified recipe",
                  "train smoothing base", "randomized smoothing", "input-space routes", "plot"):
        assert re.search(rf"{stage}[^|\n]*: \d+\.\d s", text), stage
    # the routes table: every route of an encoder on the same inputs, and auto (the per-input
    # maximum) never below any of them; the CNN's local route certifies what its global route cannot
    routes = {}
    for line in text.splitlines():
        m = re.match(r"^(cnn encoder, LW|lipschitz enc., isotropic|trained Cayley/MaxMin, proto.): (\w+) +(\d+) (.*)$", line)
        if m:
            vals = m.group(4).split()
            routes.setdefault(m.group(1), {})[m.group(2)] = (int(m.group(3)), [float(v) for v in vals[:len(RADII)]])
    assert set(routes) == {"cnn encoder, LW", "lipschitz enc., isotropic", "trained Cayley/MaxMin, proto."}, routes
    for enc, rs in routes.items():
        assert {"lipschitz", "margin", "auto"} <= set(rs), (enc, rs)
        assert len({n for n, _ in rs.values()}) == 1 and 1 <= rs["auto"][0] <= 60, (enc, rs)
        for route in ("lipschitz", "margin"):  # auto takes the per-input maximum
            assert all(a <= b for a, b in zip(rs[route][1], rs["auto"][1])), (enc, route, rs)
        assert "local" in rs, (enc, rs)
    # the CNN: the global route certifies nothing at r=0.1, the local one does
    assert routes["cnn encoder, LW"]["lipschitz"][1][1] == 0 < routes["cnn encoder, LW"]["local"][1][1]
    assert out.exists() and out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Lipschitz encoder's bound is computed, close to 1, and above its estimate
    row = next(line for line in text.splitlines() if line.startswith("gmfast, lipschitz enc., isotropic"))
    bound, est = (float(v) for v in row.split()[4:6])
    assert 0.9 < bound < 1.5 and est <= bound
    # the trained recipe's encoder is 1-Lipschitz by construction: its sound bound is at most ~1
    row = next(line for line in text.splitlines() if line.startswith("gmfast, trained Cayley/MaxMin, proto. "))
    bound, est = (float(v) for v in row.split()[4:6])
    assert bound <= 1.0 + 1e-3 and est <= bound


def _tiny_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(40, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    head = gmfast.fit_head(enc, loader, covariance_type="tied", shrinkage=1.0, progress=False)
    return enc, head, X, y


def test_route_table_rows_match_each_route_run_alone_and_auto_is_never_below_them():
    enc, head, X, y = _tiny_setup()
    rows = route_table({"tiny": (enc, head)}, X, y, budget=0.0, chunk=7)  # budget 0: exactly one chunk
    assert [r["route"] for r in rows] == ["lipschitz", "margin", "local", "auto"]
    assert all(r["inputs"] == 7 and r["ms"] > 0 for r in rows)
    radius = {}
    for route in ("lipschitz", "margin", "local", "auto"):  # each route run alone, on the same 7 inputs
        cert = gmfast.Certifier(enc, head, method=route).certify(X[:7])
        radius[route] = cert.radius
        acc = gmfast.certified_accuracy(cert, y[:7], RADII)
        np.testing.assert_array_equal(next(r for r in rows if r["route"] == route)["accuracy"], acc)
    # auto is the per-input maximum of the routes: never below the global or margin route
    assert (radius["auto"] >= torch.maximum(radius["lipschitz"], radius["margin"])).all()
    assert (radius["local"] > 0).any()
    # an unlimited budget certifies every input, in chunks
    assert {r["inputs"] for r in route_table({"tiny": (enc, head)}, X, y, budget=1e9, chunk=7)} == {40}


def test_routes_table_lines_up_and_reports_skipped_routes():
    acc = np.linspace(1, 0, len(RADII))
    rows = [dict(encoder="enc", route="lipschitz", inputs=20, accuracy=acc, ms=0.01, skipped=None),
            dict(encoder="enc", route="auto", inputs=20, accuracy=acc, ms=12.5,
                 skipped={"local": "node 'x' (module Foo): no linear relaxation"})]
    lines = []
    _print_routes(rows, lines.append, 15.0)
    header = next(ln for ln in lines if ln.startswith("encoder: route"))
    ends = [m.end() for m in re.finditer(r"\S+", header)]
    for ln in lines:
        if ln.startswith("enc: "):
            assert [m.end() for m in re.finditer(r"\S+", ln)][-(len(RADII) + 2):] == ends[-(len(RADII) + 2):], ln
    text = "\n".join(lines)
    assert "in 15 s per encoder" in text and "12.500" in text
    assert "enc: local route skipped: node 'x' (module Foo): no linear relaxation" in text


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
