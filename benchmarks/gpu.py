"""GPU benchmark: tied and full-covariance certify against the cuBLAS floor.

    python benchmarks/gpu.py [--out benchmarks/gpu_results.json] [--reps 20]

For every GPU variant (the ``cuda`` and ``triton`` backends that can run here, each with
cuBLAS's GEMM, the default where it is IEEE, and with its own GEMM kernel: ``<backend>-own``)
it first checks the variant against the pure-PyTorch reference on a small case, then times
it at

* tied, float32, norm 2, fp_sound: (B, d, K) = (65536, 512, 10), (8192, 2048, 1000),
  (65536, 2048, 1000);
* full covariance, float32, fp_sound: (2048, 512, 100);

against the floor, a cuBLAS GEMM of the same shape with TF32 off (``torch.addmm`` of
``B×d`` by ``d×K`` for tied, by ``d×K·d`` for full: the stacked precisions), and prints a
table (variant, shape, ms, ratio to the floor, achieved TFLOP/s of the GEMM part, peak
extra memory) and writes it as JSON with the device and versions. The reference itself is
timed too, for scale. Kernels are called through their backend modules with precomputed
tables, as ``head.certify`` calls them. Without a GPU it says the figures are unmeasured
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys

import torch

TIED_SHAPES = [(65536, 512, 10), (8192, 2048, 1000), (65536, 2048, 1000)]
FULL_SHAPE = (2048, 512, 100)


def _head(kind, d, K, seed=0):
    from gmfast import GaussianMixtureHead as Head

    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, d, generator=g, dtype=torch.float64) * 2 / math.sqrt(d)
    pri = torch.full((K,), 1.0 / K, dtype=torch.float64)
    if kind == "tied":
        X = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        cov = X @ X.T + 0.5 * torch.eye(d, dtype=torch.float64)
    else:
        X = torch.randn(K, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        cov = X @ X.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    return Head.from_params(mu, cov, pri, kind)


class Case:
    """A head, its float32 working copy on the GPU, the tables, and latents."""

    def __init__(self, kind, B, d, K, seed=0):
        from gmfast import params
        from gmfast._fp import perclass_error_model

        self.kind, self.shape = kind, (B, d, K)
        self.head = _head(kind, d, K, seed)
        dev = torch.device("cuda")
        self.p = self.head.classifier_params.to(dev, torch.float32)
        g = torch.Generator(device=dev).manual_seed(seed)
        y = torch.randint(0, K, (B,), device=dev, generator=g)
        means = self.head.means_.to(dev, torch.float32)
        self.Z = means[y] + torch.randn(B, d, device=dev, generator=g) / math.sqrt(d)
        if kind == "tied":
            self.inv = params.tied_denominators(self.p, 2)[1]
            self.fp = params.tied_error_model(self.p, d, torch.float32)
        else:
            self.lam = params.curvature_table(self.p, "auto")[1]
            self.fp = perclass_error_model(d, torch.float32)

    def run(self, variant):
        """``variant``: a backend name, or ``"<backend>-own"``: that backend with its own GEMM
        kernel instead of cuBLAS's (``torch.addmm``), which it uses by default when IEEE."""
        from gmfast.ops import _cuda, kernel_module
        from gmfast.triton import tied as ttied

        backend, own = variant.removesuffix("-own"), variant.endswith("-own")
        mod = kernel_module(backend)  # every backend, the reference included, on one contract
        saved = _cuda._library_gemm, ttied.library_gemm
        if own:
            _cuda._library_gemm = ttied.library_gemm = lambda Z: False
        try:
            if self.kind == "tied":
                return mod.tied_certify(self.Z, self.p.A, self.p.beta, self.inv, self.fp)
            return mod.perclass_certify(self.Z, self.p, self.lam, self.fp)
        finally:
            _cuda._library_gemm, ttied.library_gemm = saved

    def floor(self):
        """The cuBLAS GEMM of the same shape (TF32 off)."""
        if self.kind == "tied":
            A, beta = self.p.A, self.p.beta
            return lambda: torch.addmm(beta, self.Z, A.T)
        B, d, K = self.shape
        P = self.p.prec.reshape(K * d, d)
        bias = -self.p.prec_mu.reshape(K * d)
        return lambda: torch.addmm(bias, self.Z, P.T)

    def flops(self):
        B, d, K = self.shape
        return 2.0 * B * d * K * (d if self.kind == "full" else 1)


def check(variant, kind):
    """Variant vs reference on a small odd case: predictions equal away from near-ties,
    radii within a few times the reference's own rounding correction."""
    case = Case(kind, 1031, 67, 13 if kind == "full" else 37, seed=1)
    pa, ra = case.run(variant)
    pb, rb = case.run("reference")
    from gmfast.ops import _reference as oracle

    if kind == "tied":
        plain = oracle.tied_oracle(case.Z, case.p, 2, fp_sound=False)[1]
    else:
        plain = oracle.perclass_oracle(case.Z, case.p, fp_sound=False)[1]
    tol = 3.0 * (plain - rb).abs() + 1e-6 * (1 + rb.abs())
    same = pa == pb
    mism = int((~same).sum())
    bad = int((same & ((ra - rb).abs() > tol)).sum())
    return mism <= 2 and bad == 0, f"{mism} prediction mismatches (near-ties allowed: ≤ 2), {bad} radii off"


def timed(fn, reps):
    """Median and quartiles in ms over ``reps`` runs, CUDA events, after 3 warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return statistics.median(ts), q[0], q[2]


def peak_extra_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "gpu_results.json"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-reference", action="store_true", help="do not time the pure-PyTorch reference")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA GPU (torch.cuda.is_available() is False): GPU figures are unmeasured")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 runs Triton on the CPU interpreter; unset it to benchmark", file=sys.stderr)
        return 2
    # The error bounds assume IEEE float32 products, and so does the floor we compare with.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    from gmfast import ops

    variants = []
    for name in ("cuda", "triton"):
        ok, why = ops._probe(name)
        print(f"{name:9s} {'available' if ok else 'unavailable: ' + why}")
        if ok:
            variants += [name, name + "-own"]
    checks = {}
    for v in variants:
        for kind in ("tied", "full"):
            ok, msg = check(v, kind)
            checks[f"{v}/{kind}"] = {"ok": ok, "detail": msg}
            print(f"check {v:7s} {kind:5s} {'PASS' if ok else 'FAIL'}: {msg}")
    timed_variants = [v for v in variants if all(checks[f"{v}/{k}"]["ok"] for k in ("tied", "full"))]
    if not args.skip_reference:
        timed_variants.append("reference")

    rows = []
    cases = [("tied", s) for s in TIED_SHAPES] + [("full", FULL_SHAPE)]
    for kind, shape in cases:
        case = Case(kind, *shape)
        floor = case.floor()
        f_ms, f_lo, f_hi = timed(floor, args.reps)
        entries = [("floor (cuBLAS addmm)", floor)] + [(v, (lambda v=v, c=case: c.run(v))) for v in timed_variants]
        for name, fn in entries:
            ms, lo, hi = (f_ms, f_lo, f_hi) if fn is floor else timed(fn, args.reps)
            rows.append(dict(variant=name, kind=kind, B=shape[0], d=shape[1], K=shape[2], ms=ms, ms_q1=lo, ms_q3=hi,
                             ratio_to_floor=ms / f_ms, tflops=case.flops() / (ms * 1e-3) / 1e12,
                             peak_extra_mib=peak_extra_mb(fn)))
        del case
        torch.cuda.empty_cache()

    dev = torch.cuda.get_device_name()
    print(f"\n{dev}, torch {torch.__version__}, float32, TF32 off, median of {args.reps}")
    hdr = (f"{'variant':22s} {'kind':5s} {'B':>6s} {'d':>5s} {'K':>5s} {'ms':>9s} {'x floor':>8s} "
           f"{'TFLOP/s':>8s} {'MiB':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['variant']:22s} {r['kind']:5s} {r['B']:6d} {r['d']:5d} {r['K']:5d} {r['ms']:9.3f} "
              f"{r['ratio_to_floor']:8.2f} {r['tflops']:8.2f} {r['peak_extra_mib']:8.1f}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = dict(device=dev, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
               python=platform.python_version(), reps=args.reps, checks=checks, rows=rows)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
