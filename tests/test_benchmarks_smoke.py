"""The benchmarks run (tiny shapes), so they cannot rot. Timings are not checked here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_run_py_smoke(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    names = {(r["case"], r["variant"]) for r in data["rows"]}
    assert ("tied-257x33x5", "cpu") in names and ("fit-tied-1000x17x3", "gmfast") in names
    assert all(r["seconds"] > 0 and r["x_floor"] > 0 for r in data["rows"])
    assert "x floor" in proc.stdout


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_pytest_benchmark_suite_smoke():
    env = dict(os.environ, GMFAST_BENCH_SMOKE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_bench.py"), "-q",
                           "--benchmark-disable", "-p", "no:cacheprovider", "-W", "default"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT / "benchmarks"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
