"""The ``gmfast`` command line: demo, fit, certify, bench, report.

    gmfast demo                               # the main job: digits, two encoders, table + plot
    gmfast fit --latents train.safetensors --out head.safetensors
    gmfast certify --head head.safetensors --latents test.safetensors --out results.tsv
    gmfast bench [--smoke]                    # the CPU benchmark table
    gmfast report --head head.safetensors --latents test.safetensors [--kl 0.1]

Latent files are safetensors (or ``.npz``, read without pickle) holding ``latents`` (n, d)
float and ``labels`` (n,) int. ``certify`` writes the randomized-smoothing literature's TSV
(``idx label predict radius correct time``; abstain is predict -1, radius 0.0, correct 0;
radii are written at full float64 precision, never rounded up). Run ``certify`` under
``torchrun --nproc_per_node=N`` to shard the rows over N processes; rank 0 writes the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def read_latents(path, *, need_labels: bool = True):
    """``(latents (n, d) float tensor, labels (n,) int64 tensor or None)`` from a file.

    safetensors (tensors ``latents`` and ``labels``) or ``.npz`` (same keys; opened with
    ``allow_pickle=False``). Everything is validated; nothing is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such latents file: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data = {k: torch.from_numpy(f[k]) for k in f.files}
        else:
            from safetensors.torch import load_file

            data = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read latents ({type(exc).__name__}: {exc}); expected a safetensors or "
                         ".npz file with 'latents' (n, d) and 'labels' (n,)") from None
    if "latents" not in data:
        raise ValueError(f"{path}: no 'latents' tensor (found {sorted(data)})")
    Z = data["latents"]
    if Z.dim() != 2 or not Z.is_floating_point():
        raise ValueError(f"{path}: 'latents' must be a 2-D float array; got shape {tuple(Z.shape)}, {Z.dtype}")
    y = data.get("labels")
    if y is None and need_labels:
        raise ValueError(f"{path}: no 'labels' tensor (found {sorted(data)})")
    if y is not None:
        if y.dim() != 1 or y.shape[0] != Z.shape[0] or y.is_floating_point():
            raise ValueError(f"{path}: 'labels' must be ({Z.shape[0]},) integers; got shape {tuple(y.shape)}, {y.dtype}")
        y = y.long()
    return Z, y


def write_latents(path, Z, y=None) -> None:
    from safetensors.torch import save_file

    tensors = {"latents": torch.as_tensor(Z).contiguous()}
    if y is not None:
        tensors["labels"] = torch.as_tensor(y).long().contiguous()
    save_file(tensors, str(path))


def write_tsv(path_or_file, idx, label, pred, radius, seconds) -> None:
    """The field's certification log: ``idx label predict radius correct time`` per row.

    ``repr`` of a float64 is its shortest exact round-trip: the radius is never rounded up.
    """
    own = isinstance(path_or_file, (str, Path))
    f = open(path_or_file, "w") if own else path_or_file
    try:
        f.write("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
        for i, yy, p, r, t in zip(idx.tolist(), label.tolist(), pred.tolist(), radius.tolist(), seconds.tolist()):
            r = 0.0 if p < 0 else r
            f.write(f"{i}\t{yy}\t{p}\t{r!r}\t{int(p == yy and p >= 0)}\t{t:.6g}\n")
    finally:
        if own:
            f.close()


def _maybe_init_distributed():
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- commands


def cmd_demo(args) -> int:
    from gmfast.demo import run_demo

    run_demo(quick=args.quick, out=args.out, seed=args.seed, smoothing=not args.no_smoothing)
    return 0


def cmd_fit(args) -> int:
    from gmfast import GaussianMixtureHead

    Z, y = read_latents(args.latents)
    shrink = args.shrinkage if args.shrinkage == "ledoit-wolf" else float(args.shrinkage)
    head = GaussianMixtureHead(args.covariance_type, shrinkage=shrink, priors=args.priors)
    for i in range(0, Z.shape[0], args.batch_size):
        head.partial_fit(Z[i:i + args.batch_size], y[i:i + args.batch_size])
    head.finalize()
    head.save(args.out)
    print(f"fitted {args.covariance_type} head: {head.n_classes_} classes, {head.n_features_in_} features, "
          f"{Z.shape[0]} samples -> {args.out}")
    return 0


def cmd_certify(args) -> int:
    from gmfast import GaussianMixtureHead, certified_accuracy
    from gmfast.certifier import gather_rows

    distributed = _maybe_init_distributed()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    head = GaussianMixtureHead.load(args.head)
    Z, y = read_latents(args.latents)
    idx = torch.arange(rank, Z.shape[0], world)  # this rank's shard, as a DistributedSampler
    t = time.perf_counter()
    cert = head.certify(Z[idx], norm=_norm(args.norm), backend=args.backend)
    per = (time.perf_counter() - t) / max(len(idx), 1)
    cols = gather_rows(idx, y[idx], cert.prediction, cert.radius.double(), torch.full((len(idx),), per))
    if rank == 0:
        order = torch.argsort(cols[0])
        cols = [c[order] for c in cols]
        if args.out == "-":
            write_tsv(sys.stdout, *cols)
        else:
            write_tsv(args.out, *cols)
            ca = certified_accuracy((cols[2], cols[3]), cols[1], [0.0])
            print(f"certified {len(cols[0])} rows (norm={args.norm}; clean accuracy {100 * ca[0]:.2f}%) -> {args.out}")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def cmd_bench(args) -> int:
    from gmfast.bench import run

    return run(args)


def cmd_report(args) -> int:
    from gmfast import GaussianMixtureHead
    from gmfast.bounds import format_report, report

    head = GaussianMixtureHead.load(args.head)
    Z, y = read_latents(args.latents)
    radii = [float(r) for r in args.radii.split(",")]
    res = report(head, Z, y, radii, kl=args.kl, out_dir=args.out_dir)
    print(format_report(res))
    return 0


def _norm(s: str):
    return {"2": 2, "1": 1, "inf": float("inf"), "mahalanobis": "mahalanobis"}[s]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gmfast", description="gmfast: fast, sound certified robustness for "
                                 "Gaussian-mixture heads on torch encoders.",
                                 epilog="Run `gmfast <command> --help` for a command's options.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("demo", help="the main job: certify digits with two encoders and randomized smoothing",
                       description="Train two small encoders on scikit-learn's digits, fit Gaussian-mixture heads, "
                                   "certify the test split in input space (and with randomized smoothing), print "
                                   "the table and write the certified-accuracy plot.")
    p.add_argument("--quick", action="store_true", help="fewer epochs and smoothing samples (CI)")
    p.add_argument("--out", default="gmfast_demo.png", help="where to write the plot (PNG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-smoothing", action="store_true", help="skip the randomized-smoothing baseline")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("fit", help="fit a head on a latents file and save it",
                       description="Fit a GaussianMixtureHead on latents (safetensors/npz with 'latents', "
                                   "'labels'), streaming in batches, and save it as safetensors.")
    p.add_argument("--latents", required=True, help="training latents file")
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--covariance-type", default="tied", choices=["tied", "full", "diag", "spherical"])
    p.add_argument("--shrinkage", default="0.0", help="a float in [0, 1] or 'ledoit-wolf'")
    p.add_argument("--priors", default="empirical", choices=["empirical", "uniform"])
    p.add_argument("--batch-size", type=int, default=65536)
    p.set_defaults(fn=cmd_fit)

    p = sub.add_parser("certify", help="certify a latents file; write the field's TSV",
                       description="Certify latents with a saved head and write 'idx label predict radius "
                                   "correct time' rows. Under torchrun, rows are sharded across ranks.")
    p.add_argument("--head", required=True)
    p.add_argument("--latents", required=True)
    p.add_argument("--out", default="-", help="TSV path, or - for standard output")
    p.add_argument("--norm", default="2", choices=["2", "1", "inf", "mahalanobis"])
    p.add_argument("--backend", default=None, choices=["auto", "reference", "cpu", "triton", "cuda"])
    p.set_defaults(fn=cmd_certify)

    from gmfast.bench import add_arguments

    p = sub.add_parser("bench", help="the CPU benchmark table (kernels vs GEMM floor vs plain torch)",
                       description="Time each shape x {floor GEMM, straightforward torch, reference, cpu kernel}; "
                                   "print the table with ratios, GFLOP/s and peak memory; write JSON.")
    add_arguments(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("report", help="distributional guarantee: CA of the mixture and the KL lower bound",
                       description="Empirical certified accuracy, the fitted mixture's certified accuracy CA_Q "
                                   "and the lower bound CA_Q - TV(KL) per radius, with plots.")
    p.add_argument("--head", required=True)
    p.add_argument("--latents", required=True, help="test latents with labels")
    p.add_argument("--radii", default="0,0.25,0.5,1.0", help="comma-separated radii")
    p.add_argument("--kl", type=float, default=None, help="KL(P||Q) bound; default: a k-NN estimate (labelled)")
    p.add_argument("--out-dir", default=None, help="where to write the plots")
    p.set_defaults(fn=cmd_report)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"gmfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
