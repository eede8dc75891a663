"""Certification logs in the randomized-smoothing literature's TSV format, and their summary.

One row per input, tab-separated, with a header (Cohen, Rosenfeld & Kolter 2019,
``certify.py``)::

    idx  label  predict  radius  correct  time

* ``predict`` ``-1`` is an abstention (its ``radius`` is written as ``0.0``);
* ``radius`` is the float64 radius at full precision (Python's shortest round-trip
  ``repr``), never rounded up;
* ``label`` and ``correct`` are ``-1`` when the inputs are unlabelled (deployment data):
  ``-1`` is not a class, and the columns stay integers for every reader;
* ``time`` is the input's share of the computation as ``H:MM:SS.ffffff`` (Cohen logs
  ``str(datetime.timedelta)``; gmfast certifies in batches, so each row gets its batch's
  time divided by the batch's rows).

:func:`write_certification_tsv` writes any certificate (:class:`gmfast.Certificate`,
:class:`gmfast.smoothing.SmoothCertificate`, or a ``(prediction, radius)`` pair);
:func:`read_certification_tsv` and :func:`summarize` give what Cohen's ``analyze.py``
does: certified accuracy at given radii, plus abstention rate.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

HEADER = ("idx", "label", "predict", "radius", "correct", "time")
UNLABELLED = -1


def format_time(seconds: float) -> str:
    """``H:MM:SS.ffffff`` (always six decimals), as ``str(timedelta)`` prints durations."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"time must be a finite number of seconds >= 0; got {seconds!r}")
    us = int(round(seconds * 1e6))
    h, rest = divmod(us, 3_600_000_000)
    m, rest = divmod(rest, 60_000_000)
    s, us = divmod(rest, 1_000_000)
    return f"{h}:{m:02d}:{s:02d}.{us:06d}"


def parse_time(text: str) -> float:
    """Seconds from ``H:MM:SS[.ffffff]`` (or a plain number of seconds, as older logs)."""
    parts = text.split(":")
    if len(parts) == 1:
        return float(parts[0])
    if len(parts) != 3:
        raise ValueError(f"time must be H:MM:SS.ffffff; got {text!r}")
    return int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])


def _column(x, n, name, dtype):
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"{name} must have one entry per row ({n}); got {a.shape[0]}")
    return a.astype(dtype)


def write_certification_tsv(path_or_file, cert, labels=None, *, idx=None, seconds=None) -> None:
    """Write a certificate as the field's TSV (see the module docstring).

    Parameters
    ----------
    path_or_file : str, Path or a text file object (e.g. ``sys.stdout``)
    cert : Certificate, SmoothCertificate or (prediction, radius)
        ``prediction`` (B,) integers, ``-1`` = abstain; ``radius`` (B,) floats.
    labels : (B,) integers, optional
        True classes; omitted for unlabelled data (``label`` and ``correct`` are ``-1``).
    idx : (B,) integers, optional
        Row indices (default ``0..B-1``).
    seconds : float or (B,) floats, optional
        Per-input time in seconds (a float applies to every row); default 0.
    """
    pred, radius = cert
    pred = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred).reshape(-1).astype(np.int64)
    n = pred.shape[0]
    radius = _column(radius, n, "radius", np.float64)
    idx = np.arange(n) if idx is None else _column(idx, n, "idx", np.int64)
    label = np.full(n, UNLABELLED) if labels is None else _column(labels, n, "labels", np.int64)
    if seconds is None or np.ndim(seconds) == 0:
        seconds = np.full(n, 0.0 if seconds is None else float(seconds))
    else:
        seconds = _column(seconds, n, "seconds", np.float64)
    own = isinstance(path_or_file, (str, Path))
    f = open(path_or_file, "w") if own else path_or_file
    try:
        f.write("\t".join(HEADER) + "\n")
        for i, y, p, r, t in zip(idx.tolist(), label.tolist(), pred.tolist(), radius.tolist(), seconds.tolist()):
            r = 0.0 if p < 0 else r
            correct = UNLABELLED if labels is None else int(p == y and p >= 0)
            f.write(f"{i}\t{y}\t{p}\t{r!r}\t{correct}\t{format_time(t)}\n")
    finally:
        if own:
            f.close()


def read_certification_tsv(path) -> dict:
    """Columns of a certification TSV as numpy arrays (``time`` in seconds).

    Accepts gmfast's and Cohen et al.'s logs (same columns; ``time`` as ``H:MM:SS.ffffff``
    or seconds). Raises ValueError naming the line for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such TSV file: {path}")
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        got = lines[0][:80] if lines else "an empty file"
        raise ValueError(f"{path}: the first line must be the header {' '.join(HEADER)!r} (tab-separated); got "
                         f"{got!r}")
    cols = {k: [] for k in HEADER}
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if len(parts) != len(HEADER):
                raise ValueError(f"expected {len(HEADER)} tab-separated fields, got {len(parts)}")
            for k, v in zip(HEADER, parts):
                cols[k].append(parse_time(v) if k == "time" else float(v) if k == "radius" else int(v))
        except ValueError as exc:
            raise ValueError(f"{path}, line {no}: {exc}") from None
    out = {k: np.asarray(v, dtype=np.float64 if k in ("radius", "time") else np.int64) for k, v in cols.items()}
    return out


def summarize(rows: dict, radii) -> dict:
    """What Cohen's ``analyze.py`` reports, from :func:`read_certification_tsv` columns.

    Returns ``n``, ``labelled`` (bool), ``radii``, ``certified_accuracy`` (fraction of rows
    correct with ``radius ≥ r``; NaN when unlabelled), ``certified_fraction`` (fraction
    not abstaining with ``radius ≥ r``, labels not needed), ``abstention_rate``,
    ``clean_accuracy`` (correct predictions, ignoring radii), ``mean_time`` (s/input).
    """
    radii = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    n = int(rows["idx"].shape[0])
    if n == 0:
        raise ValueError("the TSV has no rows to summarise")
    pred, rad = rows["predict"], rows["radius"]
    labelled = bool((rows["label"] != UNLABELLED).all())
    answered = pred >= 0
    at = rad[None, :] >= radii[:, None]
    frac = (answered[None, :] & at).mean(1)
    if labelled:
        correct = rows["correct"] == 1
        ca = (correct[None, :] & at).mean(1)
        clean = float(correct.mean())
    else:
        ca = np.full(radii.shape[0], np.nan)
        clean = math.nan
    return dict(n=n, labelled=labelled, radii=radii, certified_accuracy=ca, certified_fraction=frac,
                abstention_rate=float((~answered).mean()), clean_accuracy=clean,
                mean_time=float(rows["time"].mean()))


def format_summary(s: dict) -> str:
    """The summary as a small text table."""
    lines = [f"{s['n']} rows; abstained {100 * s['abstention_rate']:.1f}%; "
             + (f"correct (any radius) {100 * s['clean_accuracy']:.1f}%" if s["labelled"]
                else "unlabelled (label -1): certified fraction only")
             + f"; mean time {format_time(s['mean_time'])} per input"]
    lines.append(f"{'radius':>10} {'cert. acc.':>11} {'certified':>10}")
    for r, a, f in zip(s["radii"], s["certified_accuracy"], s["certified_fraction"]):
        acc = "-" if math.isnan(a) else f"{100 * a:.1f}%"
        lines.append(f"{r:>10g} {acc:>11} {100 * f:>9.1f}%")
    return "\n".join(lines)
