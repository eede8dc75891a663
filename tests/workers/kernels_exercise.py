"""Exercise every compiled kernel on odd shapes; exit 1 on any disagreement with the reference.

Run by tests/test_sanitizers.py against a copy of gmfast whose _C is built with AddressSanitizer
and UndefinedBehaviorSanitizer: any out-of-bounds access or undefined behaviour aborts.
"""

import itertools
import math
import os
import sys

# Import gmfast from the sanitized copy on PYTHONPATH even when a development (editable)
# install registers an import hook that would redirect to the regular build.
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0])

import torch  # noqa: E402

import gmfast  # noqa: E402
from gmfast import GaussianMixtureHead as Head  # noqa: E402
from gmfast.ops import _cpu  # noqa: E402


def head(kind, d, K, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, d, generator=g, dtype=torch.float64)
    pri = torch.full((K,), 1.0 / K, dtype=torch.float64)
    if kind == "tied":
        cov = torch.eye(d, dtype=torch.float64) * 1.3
    elif kind == "full":
        X = torch.randn(K, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        cov = X @ X.transpose(1, 2) + torch.eye(d, dtype=torch.float64)
    elif kind == "diag":
        cov = torch.rand(K, d, generator=g, dtype=torch.float64) + 0.5
    else:
        cov = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    return Head.from_params(mu, cov, pri, kind)


def main():
    if "sanitized" not in gmfast.__file__ or "sanitized" not in _cpu._load().__file__:
        print(f"not the sanitized build: {gmfast.__file__}, {_cpu._load().__file__}", flush=True)
        return 2
    bad = 0
    isas = [name for name, ok in _cpu._load().cpu_isas() if ok]  # every ISA path this CPU runs
    for isa, kind, (B, d, K), dt, policy in itertools.product(
            isas, ("tied", "full", "diag", "spherical"), [(0, 3, 2), (1, 1, 2), (5, 7, 3), (67, 5, 13), (130, 33, 2)],
            (torch.float32, torch.float64), ("portable", "blas", "micro", "lanes", "auto")):
        _cpu.set_cpu_isa(isa)
        _cpu.set_gemm_policy(policy)
        h = head(kind, d, K, seed=B + d)
        wide = torch.randn(B, 2 * d + 1, dtype=dt)
        Z = wide[:, 1:2 * d + 1:2]  # strided, offset view
        for norm in ((2, math.inf, 1, "mahalanobis") if kind == "tied" else (2,)):
            a = h.certify(Z, norm=norm, backend="cpu")
            b = h.certify(Z, norm=norm, backend="reference")
            same = (a.prediction == b.prediction)
            tol = 1e-3 if dt == torch.float32 else 1e-9
            close = ((a.radius.double() - b.radius.double()).abs() <= tol * (1 + b.radius.double().abs()))
            if not bool((same & close).float().mean() >= 0.99) if B else False:
                bad += 1
                print(f"MISMATCH {isa} {kind} B={B} d={d} K={K} {dt} {policy} norm={norm}", flush=True)
        h.predict(Z, backend="cpu")
    _cpu.set_gemm_policy("auto")
    _cpu.set_cpu_isa("auto")
    print(f"kernels exercised on {isas}; mismatches: {bad}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
