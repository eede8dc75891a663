"""pytest-benchmark suite: ``pytest benchmarks/test_bench.py`` (``--benchmark-only`` to time).

The same cases and variants as ``gmfast bench`` (``benchmarks/run.py``) (which also measures peak memory and
prints the comparison table). ``GMFAST_BENCH_SMOKE=1`` selects tiny shapes, as CI does.
"""

import os

import pytest

from gmfast import bench as run

CASES = run.SMOKE if os.environ.get("GMFAST_BENCH_SMOKE") == "1" else run.FULL[:2] + run.FULL[3:]
PARAMS = [(c, v) for c in CASES for v in c.get("variants", run.VARIANTS)]


@pytest.mark.parametrize("case,variant", PARAMS, ids=[f"{c['name']}-{v}" for c, v in PARAMS])
def test_bench(benchmark, case, variant):
    benchmark(run._setup(case, variant))
