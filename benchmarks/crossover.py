"""Per-ISA-path tables: ``python benchmarks/crossover.py [--isa avx2] [--reps 5] [--key]``.

For every path of the CPU kernels this machine can run (or the ones named):

* default: every shape of the tied crossover table and every GEMM policy, the tied certify
  time (fp-sound radii, float32) next to the floor, a bare ``torch.addmm`` of the same shape;
* ``--key``: the target cases of ``gmfast bench`` (tied at three shapes, full covariance)
  with their floor and straightforward-torch variants (``gmfast.bench._setup``).

Everything of one shape is timed in the same process, interleaved (floor, then each variant,
per repetition), so that load from other jobs on a shared machine hits all of them alike; the
figure reported is the **minimum** over the repetitions (interference only adds time), the
median is in the JSON. Also each path's register-only FMA peak, and the load average. What
``auto`` picks on each path (``csrc/cpu/microkernel.h``) comes from these tables
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = [(65536, 512, 10), (65536, 512, 32), (65536, 512, 48), (65536, 512, 100), (8192, 2048, 1000),
          (4096, 128, 1000), (16384, 128, 100), (65536, 128, 10), (8192, 32, 10), (400000, 128, 1000)]
POLICIES = ("auto", "lanes", "micro", "portable", "blas")


def fma_peak(C, isa: str, seconds: float = 0.5) -> float:
    """GFLOP/s of the path's register-only FMA loop on all threads (best of 3)."""
    iters = 1_000_000
    flops, t = C.fma_probe(isa, iters)
    iters = max(iters, int(iters * seconds / max(t, 1e-6)))
    best = 0.0
    for _ in range(3):  # timed with the run's clock (--clock), like the cases
        t = _clock()
        f, _ = C.fma_probe(isa, iters)
        best = max(best, f / (_clock() - t))
    return best / 1e9


def tied_case(B, d, K):
    from gmfast import GaussianMixtureHead as Head

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(K, d, generator=g, dtype=torch.float64)
    X = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    head = Head.from_params(mu, X @ X.T + torch.eye(d, dtype=torch.float64), torch.full((K,), 1.0 / K,
                                                                                        dtype=torch.float64), "tied")
    Z = torch.randn(B, d, generator=g)
    head.certify(Z[:2], backend="cpu")
    work = head._work[(Z.device, torch.float32)]
    return head, Z, work.A, work.beta


def key_table(C, _cpu, isa, reps, only=""):
    from gmfast import bench

    _cpu.set_cpu_isa(isa)
    load = os.getloadavg()[0]
    print(f"## path {isa} (load average {load:.2f}; peak: the path's register-only FMA loop, timed "
          f"interleaved with the cases)", flush=True)
    print("| case | floor ms | cpu ms | cpu x floor | cpu GFLOP/s | peak GFLOP/s | % of peak | torch ms | torch / cpu "
          "| peak MB cpu / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    # one head per case for all its variants and paths (its tables, e.g. the curvature's
    # eigenvalues, take longer to build than the runs being timed; none depends on the path)
    make_head = getattr(bench._head, "uncached", bench._head)

    def cached(case):
        if case["name"] not in _HEADS:
            _HEADS[case["name"]] = make_head(case)
        return _HEADS[case["name"]]

    cached.uncached = make_head
    bench._head = cached
    flops0, t0 = C.fma_probe(isa, 200_000)
    iters = max(200_000, int(200_000 * 0.2 / max(t0, 1e-6)))
    for case in bench.FULL:
        if case["kind"] not in ("tied", "full") or not case["name"].startswith(only):
            continue
        variants = [v for v in ("floor", "cpu", "torch") if v in case.get("variants", bench.VARIANTS)]
        fns = {v: bench._setup(case, v) for v in variants}
        probe_flops = []
        fns["peak"] = lambda: probe_flops.append(C.fma_probe(isa, iters)[0])
        times = {v: [] for v in fns}
        grow = {}
        for v, f in fns.items():  # warm-up, and the peak resident-set growth of the first call
            reset = bench._reset_peak()
            base, _ = bench._rss_kb()
            f()
            grow[v] = (bench._rss_kb()[1] - base) / 1024.0 if reset else float("nan")
        for _ in range(reps):
            for v, f in fns.items():
                t = _clock()
                f()
                times[v].append(_clock() - t)
        best = {v: min(ts) for v, ts in times.items()}
        peak = probe_flops[0] / best["peak"] / 1e9
        gf = bench.flops(case) / best["cpu"] / 1e9
        if case["kind"] == "full":  # the Cholesky form does about half the flops of the floor's
            gf_note = f"{gf:.0f} (floor-equivalent)"
        else:
            gf_note = f"{gf:.0f}"
        torch_ms = f"{1e3 * best['torch']:.1f}" if "torch" in best else "–"
        torch_x = f"{best['torch'] / best['cpu']:.2f}" if "torch" in best else "–"
        mem = f"{grow['cpu']:.1f} / {grow['torch']:.0f}" if "torch" in grow else f"{grow['cpu']:.1f} / –"
        print(f"| {case['name']} | {1e3 * best['floor']:.1f} | {1e3 * best['cpu']:.1f} | "
              f"{best['cpu'] / best['floor']:.2f} | {gf_note} | {peak:.0f} | {100 * gf / peak:.0f}% | {torch_ms} | "
              f"{torch_x} | {mem} |",
              flush=True)
        rows.append(dict(isa=isa, peak_gflops=peak, case=case["name"], seconds=best, peak_growth_mb=grow,
                         median_seconds={v: statistics.median(ts) for v, ts in times.items()}, load=load))
        del fns
    bench._head = make_head
    return rows


_HEADS: dict = {}
_clock = time.perf_counter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", action="append", help="path(s) to measure (default: every path this CPU runs)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="", help="B,d,K;B,d,K;... (default: the table's)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--key", action="store_true", help="the target cases of gmfast bench instead")
    ap.add_argument("--only", default="", help="with --key: cases whose name starts with this")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and the kernels (default: torch's); on a machine shared with "
                         "other jobs, 1 thread gives stable ratios (no thread waits at a barrier for a "
                         "descheduled sibling)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall: elapsed time; thread: CPU time of the calling thread, with --threads 1 "
                         "all the work of the kernels and of torch (no time spent descheduled: on a "
                         "machine shared with other jobs the ratios are then stable)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "crossover.json"))
    args = ap.parse_args(argv)
    global _clock
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread measures the calling thread only: it needs --threads 1")
        _clock = time.thread_time
    from gmfast.ops import _cpu

    C = _cpu._load()
    if args.threads:
        torch.set_num_threads(args.threads)  # also the kernels' OpenMP threads (one runtime)
    isas = args.isa or [n for n, ok in C.cpu_isas() if ok]
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes else SHAPES
    policies = args.policies.split(",")
    load = os.getloadavg()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, "
          f"load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}, blas: {_cpu.blas_info()}", flush=True)
    rows = []
    if args.key:
        for isa in isas:
            rows += key_table(C, _cpu, isa, args.reps, args.only)
    for isa in [] if args.key else isas:
        _cpu.set_cpu_isa(isa)
        peak = fma_peak(C, isa)
        print(f"## path {isa}: register-only FMA peak {peak:.0f} GFLOP/s", flush=True)
        print("| (B, d, K) | floor ms | " + " | ".join(f"{p} ms (x floor)" for p in policies) + " | auto GFLOP/s |")
        print("|---" * (len(policies) + 3) + "|")
        for B, d, K in shapes:
            head, Z, A, beta = tied_case(B, d, K)
            fns = {"floor": lambda: torch.addmm(beta, Z, A.T)}
            for p in policies:
                fns[p] = (lambda p=p: (_cpu.set_gemm_policy(p), head.certify(Z, backend="cpu")))
            times = {k: [] for k in fns}
            for k, f in fns.items():  # warm-up
                f()
            for _ in range(args.reps):
                for k, f in fns.items():
                    t = _clock()
                    f()
                    times[k].append(_clock() - t)
            _cpu.set_gemm_policy("auto")
            med = {k: min(v) for k, v in times.items()}
            fl = med["floor"]
            gf = 2.0 * B * d * K / med.get("auto", fl) / 1e9
            cells = " | ".join(f"{1e3 * med[p]:.1f} ({med[p] / fl:.2f})" for p in policies)
            print(f"| ({B}, {d}, {K}) | {1e3 * fl:.1f} | {cells} | {gf:.0f} |", flush=True)
            rows.append(dict(isa=isa, peak_gflops=peak, B=B, d=d, K=K, seconds=med,
                             median_seconds={k: statistics.median(v) for k, v in times.items()}))
            del head, Z, A, beta, fns
    _cpu.set_cpu_isa("auto")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(load=load, load_end=os.getloadavg(), clock=args.clock, rows=rows), indent=1))
    print(f"# wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
