"""gmfast CPU benchmarks: each shape × {floor GEMM, straightforward torch, reference, cpu}.

    gmfast bench                             # the full table (a few minutes on 2 cores)
    gmfast bench --smoke                     # tiny shapes: checks that every case runs (CI)
    gmfast bench --only tied                 # a subset (case name prefix)
    gmfast bench --isa avx2                  # force a CPU kernel path (GMFAST_CPU_ISA)

(``python benchmarks/run.py`` is the same command from a source checkout.)

``--smoke`` is a smoke check, not a measurement: tiny shapes, one repetition; it prints what
ran and how long it took, no ratios. The table header names the CPU kernel path that ran
(``gmfast.ops.cpu_info()``), that path's register-only FMA peak and the load average; a
progress line per (case, variant) goes to stderr as each finishes.

Every (case, variant) runs in a fresh subprocess, so its peak memory is measured cleanly:
the peak resident set during the first call minus the resident set just before it (the
kernel's peak mark is reset first: ``/proc/self/clear_refs``, Linux). Times are the median of ``--reps`` runs after one
warm-up. Ratios are to the *floor*: a bare GEMM of the same shape (``torch.addmm`` for the
tied logits, ``Z @ P_stackᵀ`` for full covariances, a float64 ``ZᵀZ`` for the fit). The
table is printed and written as JSON to ``--out`` (default: ``gmfast_bench.json`` in the
current directory; ``gmfast_bench_smoke.json`` for ``--smoke``, so a smoke check never
overwrites a measured table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- cases

# the fit has one gmfast path (torch + MKL, float64): "gmfast" is the streaming partial_fit
FIT_VARIANTS = ("floor", "torch", "gmfast")
# end to end: the encoder's own forward is the floor; "gmfast" is Certifier.certify (the
# Lipschitz bound is computed once, outside the timing, as a deployment would)
E2E_VARIANTS = ("floor", "gmfast")

FULL = [
    dict(name="tied-65536x512x10", kind="tied", B=65536, d=512, K=10),
    dict(name="tied-8192x2048x1000", kind="tied", B=8192, d=2048, K=1000),
    dict(name="tied-400000x128x1000", kind="tied", B=400_000, d=128, K=1000, variants=("floor", "cpu")),
    dict(name="full-2048x512x100", kind="full", B=2048, d=512, K=100),
    dict(name="diag-8192x512x100", kind="diag", B=8192, d=512, K=100),
    dict(name="fit-tied-200000x512x10", kind="fit", B=200_000, d=512, K=10, variants=FIT_VARIANTS),
    dict(name="e2e-cnn-3x32x32-b256", kind="e2e", B=256, d=128, K=10, variants=E2E_VARIANTS),
]
SMOKE = [
    dict(name="tied-257x33x5", kind="tied", B=257, d=33, K=5),
    dict(name="full-65x17x4", kind="full", B=65, d=17, K=4),
    dict(name="diag-65x17x4", kind="diag", B=65, d=17, K=4),
    dict(name="fit-tied-1000x17x3", kind="fit", B=1000, d=17, K=3, variants=FIT_VARIANTS),
    dict(name="e2e-cnn-3x32x32-b8", kind="e2e", B=8, d=128, K=10, variants=E2E_VARIANTS),
]
VARIANTS = ("floor", "torch", "reference", "cpu")


def flops(case) -> float:
    B, d, K = case["B"], case["d"], case["K"]
    if case["kind"] == "tied":
        return 2.0 * B * d * K
    if case["kind"] == "full":
        return 2.0 * B * K * d * d
    if case["kind"] == "diag":
        return 2.0 * B * K * d
    if case["kind"] == "e2e":
        return float("nan")  # the encoder's flops are not the point here
    return 2.0 * B * d * d  # fit: the ZᵀZ GEMM


# ----------------------------------------------------------------------------- one run


def _head(case):
    from gmfast import GaussianMixtureHead as Head

    g = torch.Generator().manual_seed(0)
    d, K = case["d"], case["K"]
    mu = torch.randn(K, d, generator=g, dtype=torch.float64)
    pri = torch.full((K,), 1.0 / K, dtype=torch.float64)
    if case["kind"] == "tied":
        X = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        cov = X @ X.T + torch.eye(d, dtype=torch.float64)
    elif case["kind"] == "full":
        X = torch.randn(K, d, d, generator=g, dtype=torch.float64) / d**0.5
        cov = X @ X.transpose(1, 2) + torch.eye(d, dtype=torch.float64)
    else:
        cov = torch.rand(K, d, generator=g, dtype=torch.float64) + 0.5
    return Head.from_params(mu, cov, pri, case["kind"])


def _e2e_encoder(latent: int) -> torch.nn.Module:
    """A small residual CNN for 3×32×32 inputs (CIFAR-sized), BatchNorm in eval mode."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), Block(32), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), Block(64), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, latent))


def _straightforward_perclass(Z, work, make_u):
    """The plain-PyTorch per-class certificate (without curvature or rounding terms): it
    materialises the B×K×d residuals R and gradients U = make_u(R)."""
    mu, kappa = work.mu, work.kappa.float()

    def run():
        R = Z[:, None, :] - mu[None]
        U = make_u(R)
        f = kappa - 0.5 * (R * U).sum(-1)
        c = f.argmax(1)
        G = (U - U[torch.arange(Z.shape[0]), c][:, None]).norm(dim=-1)
        q = f.gather(1, c[:, None]) - f
        return c, (q / G).amin(1)

    return run


def _setup(case, variant):
    """Inputs and a zero-argument callable that runs the variant once."""
    from gmfast import params

    B, d, K = case["B"], case["d"], case["K"]
    g = torch.Generator().manual_seed(1)
    if case["kind"] == "e2e":
        import gmfast

        enc = _e2e_encoder(d).eval()
        X = torch.rand(B, 3, 32, 32, generator=g)
        with torch.no_grad():
            Zfit = enc(torch.rand(512, 3, 32, 32, generator=g))
        head = gmfast.GaussianMixtureHead("tied", shrinkage=0.1).fit(Zfit, torch.arange(512) % K)
        certifier = gmfast.Certifier(enc, head, batch_size=B)
        certifier.certify(X[:2])  # the Lipschitz bound and the head's tables, once
        if variant == "floor":
            def forward():
                with torch.no_grad():
                    return enc(X)
            return forward
        return lambda: certifier.certify(X)
    if case["kind"] == "fit":
        from gmfast import GaussianMixtureHead as Head

        Z = torch.randn(B, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, K, (B,), generator=g)
        bs = 8192
        if variant == "floor":
            return lambda: Z.T @ Z
        if variant == "torch":  # straightforward: per class, a two-pass covariance
            return lambda: sum(torch.cov(Z[y == k].T, correction=0) * (y == k).sum() for k in range(K))

        def fit():
            h = Head("tied")
            for i in range(0, B, bs):
                h.partial_fit(Z[i:i + bs], y[i:i + bs])
            return h.finalize()

        return fit
    head = _head(case)
    Z = torch.randn(B, d, generator=g)
    head.certify(Z[:2])  # tables, curvature and the working copy, outside the timing
    work = head.prepared(Z)[1]
    if case["kind"] == "tied":
        A, beta = work.A, work.beta
        if variant == "floor":
            return lambda: torch.addmm(beta, Z, A.T)
        if variant == "torch":
            inv = params.tied_denominators(work, 2)[0].float()

            def straightforward():  # logits, all margins, all ratios, min: B×K temporaries
                L = torch.addmm(beta, Z, A.T)
                c = L.argmax(1)
                m = L.gather(1, c[:, None]) - L
                r = m * inv[c]
                r.scatter_(1, c[:, None], float("inf"))
                return c, r.amin(1)

            return straightforward
    elif case["kind"] == "full":
        if variant == "floor":
            Pstack = work.prec.reshape(K * d, d)
            return lambda: Z @ Pstack.T
        if variant == "torch":
            P = work.prec
            return _straightforward_perclass(Z, work, lambda R: torch.einsum("kij,bkj->bki", P, R))
    else:  # diag
        if variant == "floor":
            W = work.prec
            return lambda: Z @ W.T
        if variant == "torch":
            p = work.prec
            return _straightforward_perclass(Z, work, lambda R: p[None] * R)
    backend = "reference" if variant == "reference" else "cpu"
    return lambda: head.certify(Z, backend=backend)


def _rss_kb() -> tuple[int, int]:
    """(current, peak) resident set of this process in KiB, peak since the last reset."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_pair(case, reps) -> list:
    """End to end: the encoder alone and Certifier.certify, timed interleaved in one process
    (separate processes differ by more than the few percent being measured)."""
    fns = {v: _setup(case, v) for v in ("floor", "gmfast")}
    times = {v: [] for v in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for v, f in fns.items():
            t = time.perf_counter()
            f()
            times[v].append(time.perf_counter() - t)
    return [dict(case=case["name"], variant=v, seconds=statistics.median(ts), min_seconds=min(ts),
                 peak_growth_mb=float("nan"), reps=reps) for v, ts in times.items()]


def run_one(case, variant, reps) -> dict:
    torch.manual_seed(0)
    fn = _setup(case, variant)
    if _reset_peak():  # the call's own peak, however high the setup's was
        base, _ = _rss_kb()
        fn()  # warm-up, and the peak-memory measurement
        _, peak = _rss_kb()
    else:  # elsewhere: growth of the lifetime maximum (misses peaks below the setup's)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return dict(case=case["name"], variant=variant, seconds=statistics.median(times), min_seconds=min(times),
                peak_growth_mb=max(0, peak - base) / 1024.0, reps=reps)


# ----------------------------------------------------------------------------- driver


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import gmfast
    from gmfast.ops import _cpu

    info = _cpu.cpu_info()
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                gmfast=gmfast.__version__, python=platform.python_version(), blas=_cpu.blas_info(),
                cpu_isa=info["isa"], cpu_isa_reason=info["reason"], cpu_features=info["cpu_features"])


def fma_peak_gflops(isa: str, seconds: float = 0.3) -> float:
    """The register-only FMA loop of that kernel path on all threads, GFLOP/s (best of 3)."""
    from gmfast.ops import _cpu

    C = _cpu.extension()
    flops, t = C.fma_probe(isa, 100_000)
    iters = max(100_000, int(100_000 * seconds / max(t, 1e-6)))
    return max(f / t for f, t in (C.fma_probe(isa, iters) for _ in range(3))) / 1e9


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, one repetition: checks that every case runs (CI); not a measurement")
    ap.add_argument("--only", default="", help="run cases whose name starts with this")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    ap.add_argument("--isa", default=None,
                    help="force the CPU kernel path (auto, avx512, avx2, portable, ...; sets GMFAST_CPU_ISA)")
    ap.add_argument("--out", default=None,
                    help="where to write the JSON results (default: ./gmfast_bench.json; "
                         "./gmfast_bench_smoke.json with --smoke)")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gmfast bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def _variants(case):
    return ("pair",) if case["kind"] == "e2e" else case.get("variants", VARIANTS)


def run(args) -> int:
    cases = SMOKE if args.smoke else FULL
    reps = args.reps or (1 if args.smoke else 5)
    if args.isa:
        from gmfast.ops import _cpu

        _cpu.set_cpu_isa(args.isa)  # here (refused now if this CPU cannot run it) and in every subprocess
        os.environ[_cpu.ISA_ENV] = args.isa
    if args.one:
        case = next(c for c in SMOKE + FULL if c["name"] == args.one[0])
        for variant in args.one[1].split(","):  # several: the smoke check's one process per case
            if variant == "pair":
                for row in run_pair(case, max(reps, 10)):
                    print(json.dumps(row), flush=True)
            else:
                print(json.dumps(run_one(case, variant, reps)), flush=True)
        return 0
    info = machine()
    load = os.getloadavg()
    info["load_average"] = list(load)
    # one process per (case, variant), so each peak is measured cleanly; the smoke check
    # measures nothing and runs each case's variants in one process (5 starts, not 20)
    jobs = [(c, v) for c in cases if c["name"].startswith(args.only)
            for v in ([",".join(_variants(c))] if args.smoke else _variants(c))]
    if args.smoke:
        print("SMOKE CHECK: tiny shapes, one repetition each. This checks that every case runs; the times "
              "below are noise, not measurements (run `gmfast bench` for the table).")
    else:
        info["fma_peak_gflops"] = fma_peak_gflops(info["cpu_isa"])
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"gmfast {info['gmfast']}, kernel GEMM: {info['blas']}")
    print(f"cpu kernel path: {info['cpu_isa']} ({info['cpu_isa_reason']})")
    peak = f"; register-only FMA peak of this path: {info['fma_peak_gflops']:.0f} GFLOP/s" if not args.smoke else ""
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{peak}", flush=True)
    rows = []
    for n, (case, variant) in enumerate(jobs, 1):
        cmd = [sys.executable, "-m", "gmfast.bench", "--one", case["name"], variant, "--reps", str(reps)]
        t0 = time.perf_counter()
        # run from the directory holding *this* gmfast, so `-m` (which puts the working
        # directory first on sys.path) cannot pick up another copy, e.g. a source tree
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"benchmark {case['name']} / {variant} failed")
        got = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        for row in got:
            row["gflops"] = flops(case) / row["seconds"] / 1e9
            rows.append(row)
        times = ", ".join(f"{r['variant']} {1e3 * r['seconds']:.1f} ms" for r in got)
        print(f"[{n}/{len(jobs)}] {case['name']} / {variant}: {times} ({time.perf_counter() - t0:.0f} s with set-up)",
              file=sys.stderr, flush=True)
    for case in cases:
        floor = next((r["seconds"] for r in rows if r["case"] == case["name"] and r["variant"] == "floor"), None)
        for r in rows:
            if r["case"] == case["name"]:
                r["x_floor"] = r["seconds"] / floor if floor else float("nan")
    if args.smoke:
        head = f"{'case':<24} {'variant':<10} {'ms (1 run)':>11}  status"
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['case']:<24} {r['variant']:<10} {1e3 * r['seconds']:>11.2f}  ran")
    else:
        head = f"{'case':<24} {'variant':<10} {'ms':>10} {'x floor':>8} {'GFLOP/s':>9} {'peak MB':>9}"
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['case']:<24} {r['variant']:<10} {1e3 * r['seconds']:>10.2f} {r['x_floor']:>8.2f} "
                  f"{r['gflops']:>9.1f} {r['peak_growth_mb']:>9.1f}")
    out = Path(args.out or ("gmfast_bench_smoke.json" if args.smoke else "gmfast_bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(smoke=bool(args.smoke), machine=info, rows=rows), indent=2))
    print(f"wrote {out.resolve()}" + (" (smoke check: not a measurement)" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
