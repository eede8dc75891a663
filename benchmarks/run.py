"""Source-checkout entry point of the CPU benchmark table: ``python benchmarks/run.py [--smoke]``.

The benchmark itself lives in :mod:`gmfast.bench` so that ``gmfast bench`` works from an
installed package; see its docstring for what is measured and how.
"""

from gmfast.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
