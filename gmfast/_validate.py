"""Input checks for every public entry point: one place, one message style.

Each error names the argument, what was expected and what came, and where there is a fix,
says it.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np
import torch

from gmfast._fp import U64

# the choices a head accepts (the head, the file reader and the scikit-learn wrapper share them)
COVARIANCE_TYPES = ("tied", "full", "diag", "spherical")
PRIORS = ("empirical", "uniform")
CURVATURES = ("auto", "exact", "weyl")

class NotFittedError(ValueError, AttributeError):
    """Raised when a head is used before ``fit`` / ``finalize``."""


class NonFiniteWarning(UserWarning):
    """Some rows were non-finite (or overflowed) and abstained."""


def check_choice(name: str, value, allowed: Iterable):
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def as_float_matrix(Z, name: str = "Z", *, n_features: int | None = None) -> torch.Tensor:
    """Return ``Z`` as a 2-D floating torch tensor without copying when possible.

    Accepts torch tensors and numpy arrays of any floating dtype, on any device.
    """
    if isinstance(Z, np.ndarray):
        if not np.issubdtype(Z.dtype, np.floating):
            raise TypeError(f"{name} must hold floating-point values; got numpy dtype {Z.dtype}")
        Z = torch.from_numpy(Z)
    elif not isinstance(Z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(Z).__name__}")
    if not Z.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got dtype {Z.dtype} (cast with .float())")
    if Z.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features); got shape {tuple(Z.shape)}")
    if n_features is not None and Z.shape[1] != n_features:
        raise ValueError(
            f"{name} has {Z.shape[1]} features per row, but the head was fitted with {n_features}"
        )
    return Z


_LABEL_REMEDY = ("; map the labels to 0..K-1 (classes, y = np.unique(y, return_inverse=True)) or use "
                 "gmfast.sklearn.GaussianMixtureClassifier, which takes any labels")


def as_labels(y, n: int, name: str = "y") -> torch.Tensor:
    """Return integer labels as a CPU int64 tensor of length ``n``."""
    if isinstance(y, np.ndarray):
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class labels; got numpy dtype {y.dtype}{_LABEL_REMEDY}")
        y = torch.from_numpy(y)
    elif isinstance(y, (list, tuple)):
        y = torch.as_tensor(y)
    elif not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels; got dtype {y.dtype}{_LABEL_REMEDY}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (n_samples,); got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"Z and {name} must have the same length; got {n} rows and {y.shape[0]} labels")
    y = y.to(device="cpu", dtype=torch.int64)
    if n and int(y.min()) < 0:
        raise ValueError(f"{name} must hold labels 0..K-1; got a negative label {int(y.min())}{_LABEL_REMEDY}")
    return y


def nonfinite_mask(Z: torch.Tensor) -> torch.Tensor:
    """Rows of ``Z`` holding a NaN or Inf, as a bool mask (B,).

    Fast path: a row's sum is NaN/Inf whenever one of its entries is (NaN and Inf propagate);
    only rows whose sum is non-finite (which also catches sums that merely overflowed) get
    the exact elementwise check. ``torch.isfinite`` over all of ``Z`` is ~10× slower.
    """
    acc = Z if Z.dtype in (torch.float32, torch.float64) else Z.float()
    bad = ~torch.isfinite(acc.sum(dim=1))
    if bool(bad.any()):
        idx = bad.nonzero().reshape(-1)
        bad[idx] = ~torch.isfinite(Z[idx]).all(dim=1)
    return bad


def check_finite_fit(Z: torch.Tensor, name: str = "Z") -> None:
    bad = nonfinite_mask(Z)
    nbad = int(bad.sum())
    if nbad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} has {nbad} row(s) with NaN or Inf (first: row {first}); fitting needs finite latents"
        )


NORMS = (2, 1, math.inf, "mahalanobis")
_NORM_ALIASES = {
    2: 2, "2": 2, "l2": 2,  # 2.0 hashes like 2 (and 1.0 like 1): one key covers both
    1: 1, "1": 1, "l1": 1,
    math.inf: math.inf, "inf": math.inf, "linf": math.inf,
    "mahalanobis": "mahalanobis",
}


def canonical_norm(norm):
    """Map the accepted spellings of a threat-model norm to ``2 | 1 | inf | 'mahalanobis'``.

    A bool is refused although ``True == 1`` (and would otherwise select the ℓ1 norm): it is
    not a norm, and ``norm=True`` is far more likely a misplaced flag than a request for ℓ1.
    """
    if isinstance(norm, bool) or (isinstance(norm, (np.bool_, torch.Tensor)) and getattr(norm, "dtype", None) in
                                  (np.bool_, torch.bool)):
        raise ValueError(f"norm must be one of 2, 1, float('inf'), 'mahalanobis'; got the bool {norm!r} "
                         "(a bool is not a norm)")
    key = norm.lower() if isinstance(norm, str) else norm
    try:
        return _NORM_ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(f"norm must be one of 2, 1, float('inf'), 'mahalanobis'; got {norm!r}") from None


def as_radii(radii) -> np.ndarray:
    """Radii as a non-empty 1-D float64 array of finite values ``>= 0``."""
    r = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"radii must be a non-empty 1-D sequence of finite values >= 0; got {radii!r}")
    return r


ON_NONFINITE = ("abstain", "raise")


def report_abstentions(Z: torch.Tensor, rows: torch.Tensor, on_nonfinite: str, name: str = "Z") -> None:
    """Explain rows a kernel abstained on: NaN/Inf inputs (warn, or raise per
    ``on_nonfinite``) and finite rows whose logits overflowed (warn)."""
    bad = ~torch.isfinite(Z[rows]).all(dim=1)
    n_nonfinite = int(bad.sum())
    n_overflow = int(rows.numel()) - n_nonfinite
    if n_nonfinite:
        first = int(rows[bad][0])
        if on_nonfinite == "raise":
            raise ValueError(f"{name} has {n_nonfinite} row(s) with NaN or Inf (first: row {first})")
        warnings.warn(f"{name} has {n_nonfinite} row(s) with NaN or Inf (first: row {first}): they abstain "
                      "(prediction -1, radius 0)", NonFiniteWarning, stacklevel=4)
    if n_overflow:
        warnings.warn(f"{n_overflow} row(s) of {name} are so large that their logits overflowed: they abstain "
                      "(prediction -1, radius 0)", NonFiniteWarning, stacklevel=4)


def check_positive_definite(S: torch.Tensor, what: str) -> None:
    """Raise if a (batch of) covariance is singular or numerically so.

    Cholesky can succeed on a rank-deficient matrix whose null space is filled with
    rounding noise; the inverse is then meaningless. The eigenvalue ratio test below
    treats anything within ``64·d·u₆₄`` of singular as singular.
    """
    Sb = S.reshape(-1, S.shape[-1], S.shape[-1])
    ev = torch.linalg.eigvalsh(Sb)
    d = S.shape[-1]
    bad = ~(ev[:, 0] > 64 * d * U64 * ev[:, -1].clamp_min(0)) | ~torch.isfinite(ev).all(1) | (ev[:, -1] <= 0)
    if bool(bad.any()):
        which = int(bad.nonzero()[0, 0])
        where = what if Sb.shape[0] == 1 else f"{what} of class {which}"
        raise ValueError(
            f"the {where} is singular or too ill-conditioned to invert "
            f"(eigenvalues {float(ev[which, 0]):.3g} .. {float(ev[which, -1]):.3g}); "
            "use shrinkage > 0 or shrinkage='ledoit-wolf'"
        )


def covariance_shape(kind: str, K: int, d: int) -> tuple:
    """Shape of a head's ``covariance`` tensor for ``covariance_type=kind``."""
    return {"tied": (d, d), "full": (K, d, d), "diag": (K, d), "spherical": (K,)}[kind]


def validated_params(tensors: dict, kind: str, expected: tuple | None = None) -> dict:
    """Check fitted parameters (shapes, dtype, finiteness, priors, positive definiteness).

    ``tensors`` holds ``means`` (K, d), ``covariance`` (shape by ``kind``), ``priors`` (K,),
    ``counts`` (K,) and ``shrinkage`` (() tied, (K,) otherwise), float64. ``expected`` is
    (K, d) when known (from a file's metadata), else read off ``means``. Returns a new dict
    with ``n_features`` added; raises ValueError naming the offending tensor.
    """
    means = tensors["means"]
    if means.dim() != 2 or means.shape[0] < 2 or means.shape[1] < 1:
        raise ValueError(f"means must have shape (K >= 2, d >= 1); got {tuple(means.shape)}")
    K, d = expected if expected is not None else tuple(means.shape)
    shapes = {"means": (K, d), "covariance": covariance_shape(kind, K, d), "priors": (K,), "counts": (K,),
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
        check_positive_definite(cov, "covariance")
    elif bool((cov <= 0).any()):
        raise ValueError("variances must be positive")
    params = dict(tensors)
    params["n_features"] = d
    return params


# Module types whose forward reads ``self.training`` (checked once per class, below); listed
# so the common ones need no source inspection and stay recognised if torch rewrites them.
_MODE_DEPENDENT_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,  # batch statistics and running-stat updates
    torch.nn.modules.instancenorm._InstanceNorm,  # running statistics, when tracked
    torch.nn.modules.dropout._DropoutNd,  # Dropout*, AlphaDropout, FeatureAlphaDropout
    torch.nn.RReLU,  # random slopes
    torch.nn.MultiheadAttention,  # attention dropout
)
_SOURCE_CACHE: dict = {}


def _forward_reads_training(cls) -> bool:
    import inspect

    if cls not in _SOURCE_CACHE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _SOURCE_CACHE[cls] = "self.training" in src or ".training" in src
    return _SOURCE_CACHE[cls]


def _has_no_effect(m: torch.nn.Module) -> bool:
    """Mode-dependent in principle, identical in both modes with these settings."""
    if isinstance(m, torch.nn.modules.dropout._DropoutNd) or isinstance(m, torch.nn.MultiheadAttention):
        return float(getattr(m, "p", getattr(m, "dropout", 1.0))) == 0.0
    if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
        return not m.track_running_stats  # uses the input's statistics in both modes
    return False


def mode_dependent_modules(module: torch.nn.Module) -> list:
    """Submodules whose output depends on ``training`` (train vs eval mode).

    A module is mode-dependent when its forward (or a hook/parametrisation it runs) reads
    ``self.training``: BatchNorm (batch statistics, running-stat updates), Dropout and its
    variants with ``p > 0``, RReLU (random slopes), MultiheadAttention with dropout, RNNs
    with inter-layer dropout, spectral normalisation (a power-iteration step per call in
    training), and any user module whose ``forward`` reads ``.training`` (found from its
    source). InstanceNorm without running statistics and dropout with ``p = 0`` are
    identical in both modes and are not listed; neither are Linear, Conv, ReLU and the other
    stateless layers, whatever their ``training`` flag says.

    Certificates (randomized smoothing, Lipschitz bounds) need a fixed function: refuse a
    module when any of these is in training mode, and only then.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    list of (name, submodule)
        In ``named_modules`` order (``""`` is ``module`` itself); whatever their current mode.
    """
    out = []
    for name, m in module.named_modules():
        if _has_no_effect(m):
            continue
        dependent = isinstance(m, _MODE_DEPENDENT_TYPES)
        if not dependent and isinstance(m, torch.nn.RNNBase):
            dependent = float(m.dropout) > 0 and m.num_layers > 1
        elif not dependent and not isinstance(m, torch.nn.RNNBase):
            dependent = _forward_reads_training(type(m))
        if not dependent:
            # the legacy torch.nn.utils.spectral_norm runs its power iteration in a pre-hook
            dependent = any(type(h).__name__ == "SpectralNorm" for h in m._forward_pre_hooks.values())
        if dependent:
            out.append((name, m))
    return out
