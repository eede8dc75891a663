"""Blocks of 1-Lipschitz networks that need their own rule: GroupSort (MaxMin).

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
        return torch.sort(groups, dim=2, descending=True).values.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(GroupSort):
    """``GroupSort(2)``: each pair ``(a, b)`` becomes ``(max(a, b), min(a, b))``."""

    def __init__(self):
        super().__init__(2)


#: Leaf modules of this file, by the kind they are dispatched as.
LEAF_KINDS = {GroupSort: "group_sort"}


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
