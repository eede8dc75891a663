"""Blocks of 1-Lipschitz networks that need their own rule: GroupSort (MaxMin), and
circular convolutions with a full-size kernel computed by FFT (:class:`PeriodicConv2d`, the
base of orthogonal convolutions such as :class:`gmfast.train.CayleyConv2d`).

``GroupSort(g)`` splits the feature/channel dimension (dim 1) into contiguous groups of
``g`` entries and sorts each group in descending order (Anil, Lucas & Grosse, ICML 2019);
``g = 2`` is MaxMin, ``(a, b) ↦ (max(a, b), min(a, b))``.

Its rule: the factor is **1** in ℓ2, exactly. Sorting a vector is 1-Lipschitz: for
``a, b ∈ ℝᵍ`` with sorted rearrangements ``a↓, b↓``,
``‖a↓ − b↓‖² = ‖a‖² + ‖b‖² − 2⟨a↓, b↓⟩ ≤ ‖a‖² + ‖b‖² − 2⟨a, b⟩ = ‖a − b‖²`` because
``⟨a↓, b↓⟩ ≥ ⟨a, b⟩`` (the rearrangement inequality: similarly ordered sequences have the
largest inner product). The groups are disjoint, so the squared differences add and the
whole map is 1-Lipschitz; it is attained (a difference within one group that keeps the order
passes unchanged), so the factor is not loose. No rounding is involved: sorting only moves
floating-point numbers.

The module is a leaf of the trace (its forward uses ``torch.sort``, which has no rule of its
own): its class attribute ``lipschitz_constant = 1.0`` (the proven constant) is what makes the
tracer keep it whole. It is then dispatched as the kind ``"group_sort"``, checked before the
``"vouched"`` kind (:func:`gmfast.lipschitz.ops.module_kind`), so each analysis applies its
own rule (the global bound: 1) and an analysis without one refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

from gmfast.lipschitz.errors import ADVICE, UnsupportedOpError


class GroupSort(nn.Module):
    """Sort each contiguous group of ``group_size`` entries along dim 1, descending.

    Input ``(N, C, *)`` with ``C`` a multiple of ``group_size``; output of the same shape.
    ``GroupSort(2)`` is MaxMin. 1-Lipschitz in ℓ2 (module docstring) and norm-preserving
    (a permutation of each input).
    """

    #: Marks the module as a leaf for the tracer; the value is the proven factor.
    lipschitz_constant = 1.0

    def __init__(self, group_size: int = 2):
        super().__init__()
        if not (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 2):
            raise ValueError(f"group_size must be an int >= 2; got {group_size!r}")
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % self.group_size:
            raise ValueError(f"GroupSort({self.group_size}) expects (N, C, ...) with C a multiple of "
                             f"{self.group_size}; got shape {tuple(x.shape)}")
        n, c = x.shape[0], x.shape[1]
        groups = x.reshape(n, c // self.group_size, self.group_size, *x.shape[2:])
        if self.group_size == 2:
            # the same values as the sort, about 2x faster on the CPU (no strided sort of size-2
            # rows); the mask routes each gradient to one entry, a permutation, as the sort does
            a, b = groups[:, :, 0], groups[:, :, 1]
            first = a >= b
            return torch.stack((torch.where(first, a, b), torch.where(first, b, a)), dim=2).reshape(x.shape)
        return torch.sort(groups, dim=2, descending=True).values.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(GroupSort):
    """``GroupSort(2)``: each pair ``(a, b)`` becomes ``(max(a, b), min(a, b))``."""

    def __init__(self):
        super().__init__(2)


class PeriodicConv2d(nn.Module):
    """A 2-D circular convolution of ``size × size`` images with a full-size real kernel
    ``K = self.kernel()`` (c_out, c_in, size, size), computed by FFT:
    ``y[:, o] = Σ_i Σ_m K[o, i, m] x[:, i, (p − m) mod size] + b_o``, i.e.
    ``y = irfft2(rfft2(K) · rfft2(x))`` (the convolution theorem; exact in exact arithmetic
    for a real ``K``). Subclasses define ``kernel()`` (and may build it any way, e.g. as an
    orthogonal map per frequency); they must not override ``forward``.

    Rule (kind ``"periodic_conv"``): the norm of the circular convolution by the kernel the
    forward uses, computed from that kernel (:func:`gmfast.lipschitz._norms.conv_periodic_bound`:
    the largest per-frequency matrix norm, Sedghi et al. 2019, with the DFT's rounding), so it
    never rests on how the subclass meant to build it. The FFT's own rounding in the forward is
    encoder rounding, outside the bound like any convolution algorithm's (package docstring).
    """

    #: Marks the module as a leaf for the tracer; the factor is computed by the rule from
    #: ``kernel()`` (dispatched as ``"periodic_conv"`` before the vouched kind), never read here.
    lipschitz_constant = None

    def __init__(self, in_channels: int, out_channels: int, size: int, bias: bool = True):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("size", size)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        self.in_channels, self.out_channels, self.size = in_channels, out_channels, size
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def kernel(self) -> torch.Tensor:  # pragma: no cover - abstract: subclasses define the kernel
        raise NotImplementedError(f"{type(self).__name__} must define kernel() (c_out, c_in, size, size)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, n, n):
            raise ValueError(f"{type(self).__name__} expects (N, {self.in_channels}, {n}, {n}); got shape "
                             f"{tuple(x.shape)}")
        K = self.kernel()
        if tuple(K.shape) != (self.out_channels, self.in_channels, n, n):
            raise ValueError(f"{type(self).__name__}.kernel() has shape {tuple(K.shape)}; expected "
                             f"{(self.out_channels, self.in_channels, n, n)}")
        # rfft2(K), not a subclass's own spectrum: the operator is the convolution by the real
        # K that the rule bounds (a spectrum built per frequency need not be Hermitian-
        # consistent in floating point, and irfft2's reading of one that is not is the FFT's)
        Y = torch.einsum("oiuv,biuv->bouv", torch.fft.rfft2(K), torch.fft.rfft2(x.to(K.dtype)))
        y = torch.fft.irfft2(Y, s=(n, n))
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, size={self.size}, bias={self.bias is not None}"


#: Leaf modules of this file, by the kind they are dispatched as.
LEAF_KINDS = {GroupSort: "group_sort", PeriodicConv2d: "periodic_conv"}


def leaf_kind(mod: nn.Module):
    """The kind of one of this file's modules, or None."""
    for cls, kind in LEAF_KINDS.items():
        if isinstance(mod, cls):
            return kind
    return None


def group_sort_factor(mod: GroupSort) -> tuple[float, str]:
    """``(1.0, description)``: the ℓ2 Lipschitz factor of GroupSort (module docstring)."""
    if type(mod).forward is not GroupSort.forward:
        raise UnsupportedOpError(f"module {type(mod).__name__} overrides GroupSort.forward, so the sorting rule "
                                 f"does not apply: no Lipschitz rule; {ADVICE}")
    return 1.0, f"GroupSort({mod.group_size}) (sorting is 1-Lipschitz)"


def periodic_conv_factor(mod: PeriodicConv2d, method: str) -> tuple[float, str]:
    """``(factor, description)`` of a :class:`PeriodicConv2d`: the norm of the circular
    convolution by ``mod.kernel()`` (class docstring), by per-frequency SVD (``"fft"``, also
    for ``"dense"``) or Gram bounds (``"gram"``)."""
    from gmfast.lipschitz._norms import conv_periodic_bound

    if type(mod).forward is not PeriodicConv2d.forward:
        raise UnsupportedOpError(f"module {type(mod).__name__} overrides PeriodicConv2d.forward, so the "
                                 f"circular-convolution rule does not apply: no Lipschitz rule; {ADVICE}")
    K = mod.kernel().detach()  # its shape is checked by the forward, which the trace has run
    n = mod.size
    # the same operator as a cross-correlation (conv2d's convention): W[j] = K[−j mod n]
    W = torch.roll(torch.flip(K, (2, 3)), shifts=(1, 1), dims=(2, 3))
    f = conv_periodic_bound(W, (n, n), (1, 1), 1, "gram" if method == "gram" else "fft")
    return f, f"{type(mod).__name__}({mod.in_channels}->{mod.out_channels}, {n}x{n}) circular convolution"
