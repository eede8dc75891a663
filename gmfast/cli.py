"""The ``gmfast`` command line: demo, fit, certify, smooth, analyze, bench, report, train.

    gmfast demo                               # the main job: digits, every route, recipe vs smoothing
    gmfast fit --latents train.npz --out head.safetensors
    gmfast certify --head head.safetensors --latents test.npy --out results.tsv   # labels optional
    gmfast smooth --head head.safetensors --latents test.npz --sigma 0.25 --out smooth.tsv
    gmfast analyze results.tsv [--radii 0,0.25,0.5]    # Cohen et al.'s analyze: certified accuracy
    gmfast bench [--smoke]                    # the CPU benchmark table
    gmfast report --head head.safetensors --latents test.safetensors [--kl 0.1]
    gmfast train --data digits|mnist --out DIR    # certified training (gmfast.train)

Latent files, by extension (see :func:`read_latents`): ``.safetensors`` and ``.npz`` (no
pickle) with ``latents`` (n, d) and optionally ``labels`` (n,); ``.npy`` (latents only);
``.csv``/``.tsv`` (numbers; an optional header row whose ``label`` column holds the labels).
``certify`` and ``smooth`` write the randomized-smoothing literature's TSV
(:mod:`gmfast.tsv`: ``idx label predict radius correct time``; abstain is predict -1,
radius 0.0; unlabelled rows have label and correct -1; radii at full float64 precision,
never rounded up; time per input as ``H:MM:SS.ffffff``). Run ``certify`` under
``torchrun --nproc_per_node=N`` to shard the rows over N processes; rank 0 writes the file.

Every error is one line on standard error, saying what to do; exit codes: 0 success,
2 bad input or usage, 130 interrupted, 141 output pipe closed (``| head``), 1 internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

LATENT_EXTENSIONS = (".safetensors", ".npz", ".npy", ".csv", ".tsv")
_LABEL_COLUMNS = ("label", "labels", "y", "target")


class UsageError(ValueError):
    """Bad command-line usage (exit code 2)."""


# ----------------------------------------------------------------------------- files


def read_latents(path, *, need_labels: bool = True):
    """``(latents (n, d) float tensor, labels (n,) int64 tensor or None)`` from a file.

    Chosen by extension:

    * ``.safetensors``: tensors ``latents`` and (optionally) ``labels``;
    * ``.npz``: the same keys, opened with ``allow_pickle=False``;
    * ``.npy``: one 2-D float array, the latents (no labels);
    * ``.csv`` / ``.tsv``: comma / tab separated numbers, one row per sample; if the first
      row is a header, a column named ``label`` (or ``labels``, ``y``, ``target``) holds
      integer labels and the others are the latents; without a header every column is a
      latent.

    Everything is validated; nothing is unpickled. ``need_labels`` makes missing labels an
    error.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in LATENT_EXTENSIONS:
        raise ValueError(f"{path}: unsupported latents file extension {ext or '(none)'!r}; use one of "
                         f"{', '.join(LATENT_EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such latents file: {path}")
    if ext == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: cannot read latents: not a valid safetensors file ({_first_line(exc)}); "
                             "write it with safetensors.torch.save_file({'latents': Z, 'labels': y}, path)") from None
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: torch.from_numpy(np.array(f[k])) for k in f.files}
        except Exception:
            raise ValueError(f"{path}: cannot read latents: not a valid .npz of numeric arrays; write it with "
                             "np.savez(path, latents=Z, labels=y) (object arrays are not accepted)") from None
    elif ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception:
            raise ValueError(f"{path}: cannot read latents: not a valid .npy array of numbers; write it with "
                             "np.save(path, Z)") from None
        data = {"latents": torch.from_numpy(np.array(arr))}
    else:
        data = _read_text_table(path, "\t" if ext == ".tsv" else ",")
    if "latents" not in data:
        raise ValueError(f"{path}: no 'latents' array (found {sorted(data)}); name the (n, d) array 'latents'")
    Z = data["latents"]
    if Z.dim() != 2 or not Z.is_floating_point():
        raise ValueError(f"{path}: 'latents' must be a 2-D float array (n, d); got shape {tuple(Z.shape)}, "
                         f"{Z.dtype}")
    y = data.get("labels")
    if y is None and need_labels:
        raise ValueError(f"{path}: no 'labels' array (found {sorted(data)}); this command needs labels (n,) "
                         "integers 0..K-1 beside the latents")
    if y is not None:
        if y.is_floating_point() and bool((y == y.round()).all()):
            y = y.round()
        if y.dim() != 1 or y.shape[0] != Z.shape[0] or y.is_floating_point():
            raise ValueError(f"{path}: 'labels' must be {Z.shape[0]} integers (one per row of latents); got shape "
                             f"{tuple(y.shape)}, {y.dtype}")
        y = y.long()
    return Z, y


def _read_text_table(path: Path, sep: str) -> dict:
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: the file is empty; expected one row of numbers per sample")
    first = [c.strip() for c in lines[0].split(sep)]
    try:
        [float(c) for c in first]
        header = None
    except ValueError:
        header = [c.lower() for c in first]
        lines = lines[1:]
    try:
        table = np.array([[float(c) for c in ln.split(sep)] for ln in lines], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: every row after the optional header must hold numbers separated by "
                         f"{'tabs' if sep == chr(9) else 'commas'} ({exc})") from None
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError(f"{path}: expected rows with the same number of {'tab' if sep == chr(9) else 'comma'}-"
                         "separated numbers")
    out = {}
    if header is not None:
        if len(header) != table.shape[1]:
            raise ValueError(f"{path}: the header has {len(header)} columns but the rows have {table.shape[1]}")
        lab = [i for i, h in enumerate(header) if h in _LABEL_COLUMNS]
        if len(lab) > 1:
            raise ValueError(f"{path}: more than one label column ({[header[i] for i in lab]}); keep one")
        if lab:
            y = table[:, lab[0]]
            if not (y == np.round(y)).all():
                raise ValueError(f"{path}: the '{header[lab[0]]}' column must hold integer class labels")
            out["labels"] = torch.from_numpy(y.astype(np.int64))
            table = np.delete(table, lab[0], axis=1)
    out["latents"] = torch.from_numpy(np.ascontiguousarray(table))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def write_latents(path, Z, y=None) -> None:
    from safetensors.torch import save_file

    tensors = {"latents": torch.as_tensor(Z).contiguous()}
    if y is not None:
        tensors["labels"] = torch.as_tensor(y).long().contiguous()
    save_file(tensors, str(path))


def write_tsv(path_or_file, idx, label, pred, radius, seconds) -> None:
    """Columns -> the field's TSV (:func:`gmfast.tsv.write_certification_tsv`); ``label``
    None for unlabelled rows."""
    from gmfast.tsv import write_certification_tsv

    write_certification_tsv(path_or_file, (pred, radius), label, idx=idx, seconds=seconds)


def _check_output(path: str) -> None:
    """Fail before any work when the output cannot be written."""
    if path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name inside it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output folder {parent} does not exist; create it first (mkdir -p {parent})")


def _maybe_init_distributed():
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_available() and dist.is_initialized()


def _radii(text: str):
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--radii must be comma-separated numbers such as 0,0.25,0.5; got {text!r}") from None
    if not radii or any(not np.isfinite(r) or r < 0 for r in radii):
        raise UsageError(f"--radii must be finite numbers >= 0; got {text!r}")
    return radii


# ----------------------------------------------------------------------------- commands


def cmd_demo(args) -> int:
    from gmfast.demo import run_demo

    _check_output(args.out)
    run_demo(quick=args.quick, out=args.out, seed=args.seed, smoothing=not args.no_smoothing)
    return 0


def cmd_fit(args) -> int:
    from gmfast import GaussianMixtureHead
    from gmfast._shrinkage import parse_shrinkage

    shrink = parse_shrinkage(args.shrinkage)  # a typo fails before the file is read
    _check_output(args.out)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {args.batch_size}")
    Z, y = read_latents(args.latents)
    head = GaussianMixtureHead(args.covariance_type, shrinkage=shrink, priors=args.priors)
    for i in range(0, Z.shape[0], args.batch_size):
        head.partial_fit(Z[i:i + args.batch_size], y[i:i + args.batch_size])
    head.finalize()
    head.save(args.out)
    lam = head.shrinkage_
    lam = f"{lam:.4g}" if isinstance(lam, float) else f"{float(lam.min()):.4g}..{float(lam.max()):.4g}"
    print(f"fitted {args.covariance_type} head: {head.n_classes_} classes, {head.n_features_in_} features, "
          f"{Z.shape[0]} samples, shrinkage {args.shrinkage} -> {lam} -> {args.out}")
    return 0


def cmd_certify(args) -> int:
    from gmfast import GaussianMixtureHead, certified_accuracy
    from gmfast.certifier import gather_rows

    _check_output(args.out)
    head = GaussianMixtureHead.load(args.head)
    Z, y = read_latents(args.latents, need_labels=False)
    distributed = _maybe_init_distributed()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    idx = torch.arange(rank, Z.shape[0], world)  # this rank's shard, as a DistributedSampler
    t = time.perf_counter()
    cert = head.certify(Z[idx], norm=_norm(args.norm), backend=args.backend)
    per = (time.perf_counter() - t) / max(len(idx), 1)
    labels = y[idx] if y is not None else torch.full((len(idx),), -1, dtype=torch.int64)
    cols = gather_rows(idx, labels, cert.prediction, cert.radius.double(), torch.full((len(idx),), per))
    if rank == 0:
        order = torch.argsort(cols[0])
        idx_, lab, pred, rad, sec = (c[order] for c in cols)
        lab = lab if y is not None else None
        write_tsv(sys.stdout if args.out == "-" else args.out, idx_, lab, pred, rad, sec)
        if args.out != "-":
            if y is None:
                what = f"{100 * float(((pred >= 0) & (rad > 0)).double().mean()):.2f}% certified at r > 0; no labels"
            else:
                what = f"clean accuracy {100 * certified_accuracy((pred, rad), lab, [0.0])[0]:.2f}%"
            print(f"certified {len(idx_)} rows (norm={args.norm}; {what}) -> {args.out}")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def cmd_smooth(args) -> int:
    from gmfast import GaussianMixtureHead
    from gmfast.smoothing import Smooth
    from gmfast.tsv import write_certification_tsv

    _check_output(args.out)
    head = GaussianMixtureHead.load(args.head)
    Z, y = read_latents(args.latents, need_labels=False)
    Z = Z.to(torch.float64) if args.float64 else Z.to(torch.float32)
    sm = Smooth(head, num_classes=head.n_classes_, sigma=args.sigma, seed=args.seed, progress=args.progress)
    t = time.perf_counter()
    cert = sm.certify_batch(Z, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size)
    per = (time.perf_counter() - t) / max(Z.shape[0], 1)
    write_certification_tsv(sys.stdout if args.out == "-" else args.out, cert, y, seconds=per)
    if args.out != "-":
        print(f"smoothed {Z.shape[0]} rows in latent space (sigma={args.sigma}, n0={args.n0}, n={args.n}, "
              f"alpha={args.alpha}; abstained {100 * float((cert.prediction < 0).double().mean()):.1f}%) -> {args.out}")
    return 0


def cmd_analyze(args) -> int:
    from gmfast.tsv import format_summary, read_certification_tsv, summarize

    radii = _radii(args.radii)
    print(format_summary(summarize(read_certification_tsv(args.tsv), radii)))
    return 0


def cmd_bench(args) -> int:
    from gmfast.bench import run

    return run(args)


def cmd_report(args) -> int:
    from gmfast import GaussianMixtureHead
    from gmfast.bounds import format_report, report

    head = GaussianMixtureHead.load(args.head)
    Z, y = read_latents(args.latents)
    res = report(head, Z, y, _radii(args.radii), kl=args.kl, out_dir=args.out_dir)
    print(format_report(res))
    return 0


def _norm(s: str):
    return {"2": 2, "1": 1, "inf": float("inf"), "mahalanobis": "mahalanobis"}[s]


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors that point at ``--help``."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    import gmfast

    return f"gmfast {gmfast.__version__} (torch {torch.__version__}, numpy {np.__version__})"


def build_parser() -> argparse.ArgumentParser:
    from gmfast._shrinkage import SHRINKAGE_HELP

    ap = _Parser(prog="gmfast", description="gmfast: fast, sound certified robustness for "
                 "Gaussian-mixture heads on torch encoders.",
                 epilog="Run `gmfast <command> --help` for a command's options.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)
    latents_help = "latents file: .safetensors/.npz ('latents', 'labels'), .npy, or .csv/.tsv (see gmfast.cli)"

    p = sub.add_parser("demo", help="the main job: certify digits on every input-space route, the trained recipe against smoothing",
                       description="Train two small encoders and the certified-training recipe on scikit-learn's digits, "
                                   "fit Gaussian-mixture heads, certify the test split in input space on every route "
                                   "(and with randomized smoothing on a base of the recipe's architecture), print "
                                   "the tables and write the certified-accuracy plot.")
    p.add_argument("--quick", action="store_true", help="fewer epochs and smoothing samples (CI)")
    p.add_argument("--out", default="gmfast_demo.png", help="where to write the plot (PNG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-smoothing", action="store_true", help="skip the randomized-smoothing baseline")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("fit", help="fit a head on a latents file and save it",
                       description="Fit a GaussianMixtureHead on labelled latents, streaming in batches, and save "
                                   "it as safetensors.")
    p.add_argument("--latents", required=True, help="training " + latents_help + "; labels required")
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--covariance-type", default="tied", choices=["tied", "full", "diag", "spherical"])
    p.add_argument("--shrinkage", default="auto", help=SHRINKAGE_HELP + " (default: auto, which fits "
                   "rank-deficient latents)")
    p.add_argument("--priors", default="empirical", choices=["empirical", "uniform"])
    p.add_argument("--batch-size", type=int, default=65536)
    p.set_defaults(fn=cmd_fit)

    p = sub.add_parser("certify", help="certify a latents file; write the field's TSV",
                       description="Certify latents with a saved head and write 'idx label predict radius "
                                   "correct time' rows (label and correct are -1 without labels). Under "
                                   "torchrun, rows are sharded across ranks.")
    p.add_argument("--head", required=True)
    p.add_argument("--latents", required=True, help=latents_help + "; labels optional")
    p.add_argument("--out", default="-", help="TSV path, or - for standard output")
    p.add_argument("--norm", default="2", choices=["2", "1", "inf", "mahalanobis"])
    p.add_argument("--backend", default=None, choices=["auto", "reference", "cpu", "triton", "cuda"])
    p.set_defaults(fn=cmd_certify)

    p = sub.add_parser("smooth", help="randomized smoothing of a head in latent space; write the field's TSV",
                       description="Cohen et al.'s CERTIFY for the smoothed head g(z) = argmax P(head(z + d) = k), "
                                   "d ~ N(0, sigma^2 I), on each latent row; writes the same TSV as certify. "
                                   "The radius holds with probability 1 - alpha per row.")
    p.add_argument("--head", required=True)
    p.add_argument("--latents", required=True, help=latents_help + "; labels optional")
    p.add_argument("--sigma", type=float, required=True, help="noise standard deviation, latent units")
    p.add_argument("--out", default="-", help="TSV path, or - for standard output")
    p.add_argument("--n0", type=int, default=100, help="selection samples per row")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples per row")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability per row")
    p.add_argument("--batch-size", type=int, default=100_000, help="noisy copies per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float64", action="store_true", help="sample and classify in float64")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(fn=cmd_smooth)

    p = sub.add_parser("analyze", help="summarise a certification TSV (certified accuracy at radii)",
                       description="Read a TSV written by gmfast certify/smooth or by Cohen et al.'s certify.py "
                                   "and print certified accuracy and the certified fraction at each radius, "
                                   "and the abstention rate.")
    p.add_argument("tsv", help="the TSV file")
    p.add_argument("--radii", default="0,0.25,0.5,0.75,1.0", help="comma-separated radii")
    p.set_defaults(fn=cmd_analyze)

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
    p.add_argument("--latents", required=True, help="test " + latents_help + "; labels required")
    p.add_argument("--radii", default="0,0.25,0.5,1.0", help="comma-separated radii")
    p.add_argument("--kl", type=float, default=None, help="KL(P||Q) bound; default: a k-NN estimate (labelled)")
    p.add_argument("--out-dir", default=None, help="where to write the plots")
    p.set_defaults(fn=cmd_report)

    from gmfast.train.cli import add_parser as add_train_parser  # certified training (gmfast.train)

    add_train_parser(sub)
    return ap


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    print(f"gmfast: warning: {text}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    """Run the command line; returns the exit code (every error is one line on stderr)."""
    command = "gmfast"
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            args = build_parser().parse_args(argv)
            command = f"gmfast {args.command}"
            return args.fn(args)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        except BrokenPipeError:
            # the reader went away (`| head`): stop quietly, as other Unix tools do
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 141
        except KeyboardInterrupt:
            print(f"{command}: interrupted", file=sys.stderr)
            return 130
        except (ValueError, TypeError, OSError, RuntimeError, Warning) as exc:
            print(f"{command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except Exception as exc:  # a bug: still one line, with how to get the traceback
            if os.environ.get("GMFAST_DEBUG"):
                raise
            print(f"{command}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (please "
                  "report it; set GMFAST_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
