"""Triton GPU kernels (DESIGN 2): one module per op, each with private ``@triton.jit``
kernels, a plain launcher and the torch-facing function.

* :func:`tied_certify` (:mod:`.tied`): tied logits, argmax and sound radius, fused.
* :func:`perclass_certify` (:mod:`.perclass`): batched Mahalanobis terms and the sound
  per-class radius (full: GEMM against the stacked precisions; diag/spherical elementwise).
* :func:`smoothing_counts` (:mod:`.smoothing`): argmax of a tied head on noisy latents
  and the per-input class histogram, fused (no N×K logits in memory).

The kernels take CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests
them). Importing this package needs ``triton``; :mod:`gmfast.ops._triton` turns an import
failure into a reason.
"""

from gmfast.triton.perclass import perclass_certify
from gmfast.triton.smoothing import smoothing_counts
from gmfast.triton.tied import tied_certify

__all__ = ["perclass_certify", "smoothing_counts", "tied_certify"]
