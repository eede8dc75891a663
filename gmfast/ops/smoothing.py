"""The smoothing-counts contract (DESIGN 2, kernel 4), dispatched by backend name.

``smoothing_counts(Z, owner, num_inputs, A, beta, counts) -> counts``
    For noisy latents ``Z`` (N, d) in the working dtype T and a tied head's linear logits
    ``ℓ = Z Aᵀ + β`` (A (K, d), beta (K,) in T), add one count per row to
    ``counts[owner[n], argmax_k ℓ_k]`` (lowest index on ties), ``counts`` (num_inputs, K)
    int64 on Z's device, and return it. A row with a non-finite logit, or whose owner is
    out of range, is not counted (``head.predict`` gives it -1). Counting needs no error
    bound: the smoothing certificate is statistical.

Backends: ``triton`` fuses the argmax with the histogram (logits only in registers,
:func:`gmfast.triton.smoothing.smoothing_counts`); ``reference`` materialises the logits.
:mod:`gmfast.smoothing` asks :func:`fused_backend` whether a fused kernel can run and
calls :func:`smoothing_counts`; it never imports a backend itself.
"""

from __future__ import annotations

import os

import torch

from gmfast.ops import _probe, kernel_module

#: backends with a fused counting kernel
FUSED = ("triton",)


def fused_backend(device: torch.device, *, allow_interpreter: bool = False) -> str | None:
    """The backend that fuses argmax and counting for tensors on ``device``, or None.

    ``triton`` on a CUDA device when Triton can run there; on the CPU only when
    ``allow_interpreter`` and ``TRITON_INTERPRET=1`` (how the kernel is tested without a GPU).
    """
    if device.type == "cuda":
        return "triton" if _probe("triton")[0] else None
    if allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return None


def smoothing_counts(Z: torch.Tensor, owner: torch.Tensor, num_inputs: int, A: torch.Tensor, beta: torch.Tensor,
                     counts: torch.Tensor | None = None, *, backend: str) -> torch.Tensor:
    """Per-input class histogram of a tied head's argmax on noisy latents (see the module
    docstring); ``backend`` is ``"reference"`` or one of :data:`FUSED`."""
    if counts is None:
        counts = torch.zeros(num_inputs, A.shape[0], dtype=torch.int64, device=Z.device)
    if backend == "reference":
        return _reference_counts(Z, owner, num_inputs, A, beta, counts)
    if backend not in FUSED:
        raise ValueError(f"backend must be 'reference' or one of {FUSED} for smoothing counts; got {backend!r}")
    return kernel_module(backend).smoothing_counts(Z, owner, num_inputs, A, beta, counts)


def _reference_counts(Z, owner, num_inputs, A, beta, counts):
    logits = torch.addmm(beta, Z, A.T)
    cls = logits.argmax(1)
    ok = torch.isfinite(logits).all(1) & (owner >= 0) & (owner < num_inputs)
    counts.index_put_((owner[ok], cls[ok]), torch.ones_like(cls[ok]), accumulate=True)
    return counts
