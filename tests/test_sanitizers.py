"""The compiled kernels under AddressSanitizer + UndefinedBehaviorSanitizer.

Builds ``gmfast._C`` with ``-DGMFAST_SANITIZE=ON`` into a private copy of the package and runs
``tests/workers/kernels_exercise.py`` (every kernel, both dtypes, both GEMM paths, odd and
strided shapes) with the ASan runtime preloaded. Any invalid access or undefined behaviour
aborts the run. Leak checking is off: the Python interpreter itself "leaks" at exit.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH: cannot build the sanitized module")
    return path


@pytest.mark.slow  # > 10 s: run by .ci/run (pytest -m slow), not by the default pytest
def test_kernels_clean_under_asan_ubsan(tmp_path):
    cmake = _tool("cmake")
    cxx = _tool("g++")
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 is needed to build the sanitized module")
    asan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan) or not os.path.exists(asan):
        pytest.skip(f"the compiler has no libasan.so ({asan!r})")
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DGMFAST_SANITIZE=ON",
                          "-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                          f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    bld = subprocess.run([cmake, "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    so = next(build.glob("_C*.so"))
    pkg = tmp_path / "sanitized"
    shutil.copytree(ROOT / "gmfast", pkg / "gmfast", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy(so, pkg / "gmfast" / so.name)
    env = dict(os.environ, LD_PRELOAD=asan, PYTHONPATH=str(pkg),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "kernels_exercise.py")], cwd=str(pkg),
                         env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout[-3000:] + run.stderr[-5000:]
    assert run.returncode == 0, out
    assert "mismatches: 0" in run.stdout, out
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error:" not in run.stderr, out
