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
    """The smoke check runs every case, says it is not a measurement (no ratios printed),
    reports progress per case on stderr and names the CPU kernel path; with no --out the
    JSON goes where the docstring says: ./gmfast_bench_smoke.json."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "gmfast_bench_smoke.json"
    assert f"wrote {out}" in proc.stdout
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["machine"]["cpu_isa"]
    names = {(r["case"], r["variant"]) for r in data["rows"]}
    assert ("tied-257x33x5", "cpu") in names and ("fit-tied-1000x17x3", "gmfast") in names
    assert all(r["seconds"] > 0 and r["x_floor"] > 0 for r in data["rows"])
    assert "SMOKE CHECK" in proc.stdout and "not a measurement" in proc.stdout
    assert "x floor" not in proc.stdout and "GFLOP/s" not in proc.stdout
    assert f"cpu kernel path: {data['machine']['cpu_isa']}" in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == len({r["case"] for r in data["rows"]})  # one line per case
    assert progress[0].startswith("[1/") and "tied-257x33x5 / floor,torch,reference,cpu" in progress[0]


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_run_py_isa_is_forced_and_checked(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", "tied",
                           "--isa", "portable", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpu kernel path: portable (forced" in proc.stdout
    assert json.loads(out.read_text())["machine"]["cpu_isa"] == "portable"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--isa", "sse9",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "expected 'auto' or one of" in proc.stderr


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_pytest_benchmark_suite_smoke():
    env = dict(os.environ, GMFAST_BENCH_SMOKE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_bench.py"), "-q",
                           "--benchmark-disable", "-p", "no:cacheprovider", "-W", "default"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT / "benchmarks"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
