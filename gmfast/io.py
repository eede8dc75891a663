"""Head files: safetensors tensors plus JSON metadata, validated, no pickle.

File layout: tensors ``means`` (K, d), ``covariance`` (shape by type), ``priors`` (K,),
``counts`` (K,), ``shrinkage`` (() or (K,)), all float64; safetensors metadata key
``"gmfast"`` holds JSON ``{"format": "gmfast.GaussianMixtureHead", "version": 1,
"covariance_type", "shrinkage", "priors", "n_classes", "n_features", "gmfast_version"}``.
Reading checks every field, shape and value (finite, positive priors and counts,
positive-definite covariances) before anything is built from it.

This module knows the file format only; :meth:`gmfast.GaussianMixtureHead.save` and
:meth:`~gmfast.GaussianMixtureHead.load` build on it (so it never imports a head).
"""

from __future__ import annotations

import json
import os

import torch

from gmfast import __version__
from gmfast._validate import COVARIANCE_TYPES, PRIORS, validated_params

FORMAT = "gmfast.GaussianMixtureHead"
VERSION = 1
TENSORS = ("means", "covariance", "priors", "counts", "shrinkage")


def invalid_file(path, why: str) -> ValueError:
    """The error for a file that is not a valid head file, naming the file and the reason."""
    return ValueError(f"{os.fspath(path)!s} is not a valid gmfast head file: {why}")


def write_head_file(path, params: dict, *, covariance_type: str, shrinkage, priors: str) -> None:
    """Write fitted parameters (the tensors of :data:`TENSORS`) and the head's settings."""
    from safetensors.torch import save_file

    K, d = params["means"].shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "covariance_type": covariance_type,
        "shrinkage": shrinkage,
        "priors": priors,
        "n_classes": int(K),
        "n_features": int(d),
        "gmfast_version": __version__,
    }
    tensors = {k: params[k].detach().to("cpu", torch.float64).contiguous() for k in TENSORS}
    save_file(tensors, os.fspath(path), metadata={"gmfast": json.dumps(meta)})


def read_head_file(path) -> tuple[dict, dict]:
    """Read and validate a head file.

    Returns
    -------
    settings : dict with ``covariance_type``, ``shrinkage``, ``priors``, ``n_classes``,
        ``n_features``
    params : dict of validated float64 tensors (see :func:`gmfast._validate.validated_params`)

    Raises FileNotFoundError for a missing file and ValueError (:func:`invalid_file`) for
    anything else wrong with it.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta_raw = (f.metadata() or {}).get("gmfast")
            keys = set(f.keys())
            if meta_raw is None:
                raise invalid_file(path, "no 'gmfast' metadata (not written by GaussianMixtureHead.save)")
            if keys != set(TENSORS):
                raise invalid_file(path, f"expected tensors {sorted(TENSORS)}, found {sorted(keys)}")
            tensors = {k: f.get_tensor(k) for k in TENSORS}
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise invalid_file(path, f"cannot be read as safetensors ({type(exc).__name__}: {exc})") from None
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as exc:
        raise invalid_file(path, f"metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise invalid_file(path, f"metadata format must be {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise invalid_file(path, f"unsupported version {meta.get('version')!r} "
                                 f"(this gmfast reads version {VERSION})")
    kind, priors, shrink = meta.get("covariance_type"), meta.get("priors"), meta.get("shrinkage")
    K, d = meta.get("n_classes"), meta.get("n_features")
    if kind not in COVARIANCE_TYPES:
        raise invalid_file(path, f"covariance_type must be one of {COVARIANCE_TYPES}, got {kind!r}")
    if priors not in PRIORS:
        raise invalid_file(path, f"priors must be one of {PRIORS}, got {priors!r}")
    if not (shrink in ("auto", "ledoit-wolf") or (isinstance(shrink, (int, float)) and not isinstance(shrink, bool)
                                        and 0.0 <= shrink <= 1.0)):
        raise invalid_file(path, f"shrinkage must be in [0, 1], 'auto' or 'ledoit-wolf', got {shrink!r}")
    for name, v in (("n_classes", K), ("n_features", d)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "n_classes" else 1):
            raise invalid_file(path, f"{name} must be a positive integer, got {v!r}")
    try:
        params = validated_params(tensors, kind, (K, d))
    except ValueError as exc:
        raise invalid_file(path, str(exc)) from None
    settings = dict(covariance_type=kind, shrinkage=shrink, priors=priors, n_classes=K, n_features=d)
    return settings, params
