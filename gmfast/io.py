"""Saving and loading heads: safetensors tensors plus JSON metadata, validated, no pickle.

File layout: tensors ``means`` (K, d), ``covariance`` (shape by type), ``priors`` (K,),
``counts`` (K,), ``shrinkage`` (() or (K,)), all float64; safetensors metadata key
``"gmfast"`` holds JSON ``{"format": "gmfast.GaussianMixtureHead", "version": 1,
"covariance_type", "shrinkage", "priors", "n_classes", "n_features", "gmfast_version"}``.
Loading checks every field, shape and value (finite, positive priors and counts,
positive-definite covariances) before anything is built from it.
"""

from __future__ import annotations

import json
import os

import torch

FORMAT = "gmfast.GaussianMixtureHead"
VERSION = 1
_TENSORS = ("means", "covariance", "priors", "counts", "shrinkage")


def _cov_shape(kind: str, K: int, d: int) -> tuple:
    return {"tied": (d, d), "full": (K, d, d), "diag": (K, d), "spherical": (K,)}[kind]


def save_head(head, path) -> None:
    from safetensors.torch import save_file

    import gmfast

    params = head._fitted()
    K, d = params["means"].shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "covariance_type": head.covariance_type,
        "shrinkage": head.shrinkage,
        "priors": head.priors,
        "n_classes": int(K),
        "n_features": int(d),
        "gmfast_version": gmfast.__version__,
    }
    tensors = {k: params[k].detach().to("cpu", torch.float64).contiguous() for k in _TENSORS}
    save_file(tensors, os.fspath(path), metadata={"gmfast": json.dumps(meta)})


def _bad(path, why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)!s} is not a valid gmfast head file: {why}")


def load_head(path, *, backend: str = "auto"):
    from safetensors import safe_open

    from gmfast.head import COVARIANCE_TYPES, PRIORS, GaussianMixtureHead

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta_raw = (f.metadata() or {}).get("gmfast")
            keys = set(f.keys())
            if meta_raw is None:
                raise _bad(path, "no 'gmfast' metadata (not written by GaussianMixtureHead.save)")
            if keys != set(_TENSORS):
                raise _bad(path, f"expected tensors {sorted(_TENSORS)}, found {sorted(keys)}")
            tensors = {k: f.get_tensor(k) for k in _TENSORS}
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise _bad(path, f"cannot be read as safetensors ({type(exc).__name__}: {exc})") from None
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as exc:
        raise _bad(path, f"metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, f"metadata format must be {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise _bad(path, f"unsupported version {meta.get('version')!r} (this gmfast reads version {VERSION})")
    kind, priors, shrink = meta.get("covariance_type"), meta.get("priors"), meta.get("shrinkage")
    K, d = meta.get("n_classes"), meta.get("n_features")
    if kind not in COVARIANCE_TYPES:
        raise _bad(path, f"covariance_type must be one of {COVARIANCE_TYPES}, got {kind!r}")
    if priors not in PRIORS:
        raise _bad(path, f"priors must be one of {PRIORS}, got {priors!r}")
    if not (shrink == "ledoit-wolf" or (isinstance(shrink, (int, float)) and not isinstance(shrink, bool)
                                        and 0.0 <= shrink <= 1.0)):
        raise _bad(path, f"shrinkage must be in [0, 1] or 'ledoit-wolf', got {shrink!r}")
    for name, v in (("n_classes", K), ("n_features", d)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "n_classes" else 1):
            raise _bad(path, f"{name} must be a positive integer, got {v!r}")
    try:
        params = validated_params(tensors, kind, (K, d))
    except ValueError as exc:
        raise _bad(path, str(exc)) from None
    head = GaussianMixtureHead(kind, shrinkage=shrink, priors=priors, num_classes=K, backend=backend)
    try:
        head._set_params(params)
    except ValueError as exc:
        raise _bad(path, str(exc)) from None
    return head


def validated_params(tensors: dict, kind: str, expected: tuple | None = None) -> dict:
    """Check fitted parameters (shapes, dtype, finiteness, priors, positive definiteness).

    ``expected`` is (K, d) when known (from a file's metadata), else read off ``means``.
    Raises ValueError naming the offending tensor.
    """
    from gmfast import _reference as ref

    means = tensors["means"]
    if means.dim() != 2 or means.shape[0] < 2 or means.shape[1] < 1:
        raise ValueError(f"means must have shape (K >= 2, d >= 1); got {tuple(means.shape)}")
    K, d = expected if expected is not None else tuple(means.shape)
    shapes = {"means": (K, d), "covariance": _cov_shape(kind, K, d), "priors": (K,), "counts": (K,),
              "shrinkage": () if kind == "tied" else (K,)}
    for k, t in tensors.items():
        if t.dtype != torch.float64:
            raise ValueError(f"tensor {k!r} must be float64, got {t.dtype}")
        if tuple(t.shape) != shapes[k]:
            raise ValueError(f"{k} must have shape {shapes[k]} for covariance_type={kind!r}; got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {k!r} has NaN or Inf")
    pri = tensors["priors"]
    if bool((pri <= 0).any()) or abs(float(pri.sum()) - 1.0) > 1e-9:
        raise ValueError("priors must be positive and sum to 1")
    if bool((tensors["counts"] <= 0).any()):
        raise ValueError("counts must be positive")
    lam = tensors["shrinkage"]
    if bool(((lam < 0) | (lam > 1)).any()):
        raise ValueError("shrinkage intensities must lie in [0, 1]")
    cov = tensors["covariance"]
    if kind in ("tied", "full"):
        if not bool(torch.equal(cov, cov.transpose(-1, -2))):
            raise ValueError("covariance is not symmetric")
        ref._check_positive_definite(cov, "covariance")
    elif bool((cov <= 0).any()):
        raise ValueError("variances must be positive")
    params = dict(tensors)
    params["n_features"] = d
    return params
