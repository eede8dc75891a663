"""``gmfast train``: train the recipe of a bundled data set and write the model directory.

    gmfast train --data digits --out runs/digits [--time-budget 120] [--seed 0] [--device cpu]

writes ``encoder.safetensors`` + ``encoder.json`` (weights and the architecture that rebuilds
them; no pickle), ``head.safetensors`` (the tied head: refitted, or the trained prototypes
with ``refit="prototypes"``, the MNIST recipe's), ``certificates.tsv`` (input
certificates of the held-out split, ``idx label predict radius correct time``) and
``checkpoint.safetensors`` (the last epoch's weights). ``gmfast.train.load(DIR)`` returns
``(encoder, head)``.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    """Register the ``train`` subcommand on an argparse subparsers object."""
    from gmfast.train.data import DATASETS
    from gmfast.train.loss import COVARIANCES
    from gmfast.train.recipe import REFITS

    p = sub.add_parser("train", help="train a 1-Lipschitz encoder + Gaussian-mixture head for certified radii",
                       description="Train the recipe for a bundled data set (1-Lipschitz Cayley/MaxMin encoder, tied "
                                   "Gaussian-mixture head, loss on the normalised margin), refit the head, certify "
                                   "the held-out split in input space and write the model directory.")
    p.add_argument("--data", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training (epochs are cut to fit)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--target", type=float, default=None, help="target radius of the margin loss")
    p.add_argument("--covariance", choices=COVARIANCES, default=None, help="training covariance")
    p.add_argument("--augment", type=int, default=None,
                   help="random translation of training images, at most this many pixels (default: the recipe's)")
    p.add_argument("--ema", type=float, default=None,
                   help="decay of an exponential moving average of the weights, the model kept (default: the recipe's)")
    p.add_argument("--refit", choices=REFITS, default=None,
                   help="the certified head: refitted by fit_head, or the trained prototypes (default: the recipe's)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint.safetensors of the same recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    from gmfast.train.recipe import run

    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 seconds; got {args.time_budget}")
    overrides = dict(seed=args.seed)
    for name in ("epochs", "target", "covariance", "refit", "augment", "ema"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.covariance == "learned":
        overrides["shrinkage"] = "ledoit-wolf"
    run(args.data, args.out, time_budget=args.time_budget, device=args.device, progress=not args.no_progress,
        resume=args.resume, **overrides)
    return 0
