"""Triton backend: the kernels of :mod:`gmfast.triton` behind the certify contracts.

Thin by design: the launchers in :mod:`gmfast.triton` check devices and dtypes, take any
row stride, allocate the outputs and launch. ``available()`` needs ``triton`` and a CUDA
device visible to torch (the dispatcher only routes CUDA tensors here); the kernels also
run on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests them.
"""

from __future__ import annotations

import torch


def available():
    try:
        import triton  # noqa: F401

        import gmfast.triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable ({exc}); install gmfast[gpu]"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, "ok"


def tied_certify(Z, A, beta, inv, fp):
    from gmfast.triton.tied import tied_certify as run

    return run(Z, A, beta, inv, fp)


def perclass_certify(Z, p, lam, fp):
    from gmfast.triton.perclass import perclass_certify as run

    return run(Z, p, lam, fp)


def smoothing_counts(Z, owner, num_inputs, A, beta, counts=None):
    """Per-input class histogram (num_inputs, K) int64 of the tied head ``argmax(Z Aᵀ + β)``
    on noisy latents; see :func:`gmfast.triton.smoothing.smoothing_counts`."""
    from gmfast.triton.smoothing import smoothing_counts as run

    return run(Z, owner, num_inputs, A, beta, counts)
