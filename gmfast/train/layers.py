"""1-Lipschitz building blocks and the JSON architecture description that rebuilds them.

AOL layers (Prach & Lampert, *Almost-Orthogonal Layers for Efficient General-Purpose
Lipschitz Networks*, ECCV 2022): a free parameter ``W`` is rescaled column by column,

    W_eff = W · diag(d)^{-1/2},   d_i = Σ_j |WᵀW|_ij,

and ``‖W_eff‖₂ ≤ 1`` (their Theorem 1: ``D^{-1/2} WᵀW D^{-1/2} ⪯ I`` by Gershgorin on the
rescaled Gram matrix). For a convolution ``WᵀW`` is the operator's Gram matrix, whose row
sums are those of the kernel's channel-by-channel autocorrelation (all shifts), so the same
rescaling of the input channels makes the convolution 1-Lipschitz.

Cayley layers (:class:`CayleyLinear`; the Cayley transform as an orthogonal
parametrisation, used for Lipschitz networks by Trockman & Kolter, *Orthogonalizing
Convolutional Layers with the Cayley Transform*, ICLR 2021): exactly orthogonal rows or
columns, so no singular value is lost below 1. On MNIST and digits validation they certify
more than AOL at the larger radii (``benchmarks/RESULTS.md``, issue 17, round 6).
:class:`CayleyConv2d` is their convolution (Trockman & Kolter's construction): a circular
convolution that is orthogonal at every frequency, computed by FFT
(:class:`~gmfast.lipschitz.lipnet_rules.PeriodicConv2d`, whose rule bounds the norm of the
full-size kernel the forward uses).

**The certificates never rely on either construction.** Each layer's ``forward`` computes
``W_eff`` from its parameters and calls ``F.linear`` / ``F.conv2d`` with it; in the
``torch.fx`` trace that :func:`gmfast.lipschitz_bound` runs, the weight computation depends
on no input, so it is a constant node whose value is the stored effective weight, and the
exact rules (spectral norm by SVD, per-frequency conv norm) apply to that very matrix. A
layer that is only approximately 1-Lipschitz in floating point gets its exact constant.

Also here: :class:`~gmfast.lipschitz.lipnet_rules.MaxMin`/``GroupSort`` activations (their
rule lives in :mod:`gmfast.lipschitz.lipnet_rules`) and ``nn.PixelUnshuffle`` as the
pooling that keeps the constant (a permutation of the entries: an isometry, factor 1).

Why not a library: ``deel-torchlip`` (1.0.5) and ``orthogonium`` (0.0.4) both fit torch's
version, but their layers constrain weights with their own ``parametrize`` parametrizations
(Björck, spectral, orthogonal reparametrisers), which the Lipschitz tracer rightly refuses
to trust without vetting each one, and they would become a runtime dependency for ~100
lines of layers. Here the effective weight is visible in the trace, so no trust is needed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gmfast.lipschitz.lipnet_rules import GroupSort, MaxMin, PeriodicConv2d

__all__ = ["AOLConv2d", "AOLLinear", "CayleyConv2d", "CayleyLinear", "GroupSort", "MaxMin", "build_encoder",
           "check_architecture"]

#: Floor of the AOL row sums: keeps the rescaling finite for an all-zero column (that
#: column then maps to 0, still within the bound).
_EPS = 1e-12


class AOLLinear(nn.Module):
    """``y = W_eff x + b`` with ``W_eff = W diag(Σ_j |WᵀW|_ij)^{-1/2}`` (``‖W_eff‖₂ ≤ 1``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.orthogonal_(self.weight)

    def effective_weight(self) -> torch.Tensor:
        W = self.weight
        d = (W.t() @ W).abs().sum(dim=1)
        return W * torch.rsqrt(d.clamp_min(_EPS))[None, :]

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, bias={self.bias is not None}"


class AOLConv2d(nn.Module):
    """Stride-1 'same' convolution with AOL-rescaled input channels (``‖conv‖₂ ≤ 1``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd ('same' padding); got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # a centred orthogonal map: the layer starts as a 1x1 orthogonal convolution
        w = torch.empty(out_channels, in_channels)
        nn.init.orthogonal_(w)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, kernel_size // 2, kernel_size // 2] = w
            self.weight.add_(0.01 * torch.randn_like(self.weight))

    def effective_weight(self) -> torch.Tensor:
        k = self.kernel_size
        Wt = self.weight.transpose(0, 1)  # (c_in, c_out, k, k)
        # channel-by-channel autocorrelation over every shift: the rows of the Gram operator
        gram = F.conv2d(Wt, Wt, padding=k - 1)  # (c_in, c_in, 2k-1, 2k-1)
        d = gram.abs().sum(dim=(1, 2, 3))
        return self.weight * torch.rsqrt(d.clamp_min(_EPS))[None, :, None, None]

    def forward(self, x):
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.kernel_size // 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, bias={self.bias is not None}"


class CayleyLinear(nn.Module):
    """``y = W x + b`` with ``W`` (out × in) a block of an orthogonal matrix: its rows
    (``out ≤ in``) or columns (``out > in``) are orthonormal, so ``‖W‖₂ = 1`` and, unlike
    AOL, every singular value is 1 (with MaxMin the network preserves gradient norms,
    Anil et al. 2019, *Sorting out Lipschitz function approximation*).

    ``n = max(in, out)``; ``Q = Q₀ C`` with ``Q₀`` a random orthogonal buffer (the
    initialisation) and ``C = (I + A)⁻¹(I − A)`` the Cayley transform of the skew-symmetric
    ``A = V − Vᵀ`` (``V`` the parameter, zero at the start; Trockman & Kolter 2021 use the
    Cayley transform for orthogonal layers). ``W`` is the top ``out × in`` block of ``Q``.
    Computed without forming ``Q``: for ``out ≤ in``, ``W = Y (I − A)`` with
    ``Yᵀ = (I − A)⁻¹ Q₀[:out]ᵀ`` (``(I + A)ᵀ = I − A``); for ``out > in``,
    ``W = Q₀ (I + A)⁻¹ (I − A)[:, :in]``. ``I ± A`` is invertible for every skew ``A`` (its
    eigenvalues are ``1 ± iλ``, ``λ`` real), so no parameter value makes the solve singular.

    As for AOL, the certificates never rest on the orthogonality: the forward computes ``W``
    from the parameters and calls ``F.linear``, a constant weight in the Lipschitz tracer's
    graph whose exact spectral norm (rounding of the solve included) is what the bound uses.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n = max(in_features, out_features)
        self.skew = nn.Parameter(torch.zeros(n, n))
        q0 = torch.empty(n, n)
        nn.init.orthogonal_(q0)
        self.register_buffer("q0", q0)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def effective_weight(self) -> torch.Tensor:
        A = self.skew - self.skew.t()
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        if self.out_features <= self.in_features:
            Y = torch.linalg.solve(eye - A, self.q0[:self.out_features].t()).t()
            return Y @ (eye - A)
        return self.q0 @ torch.linalg.solve(eye + A, (eye - A)[:, :self.in_features])

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, bias={self.bias is not None}"


class CayleyConv2d(PeriodicConv2d):
    """Orthogonal circular convolution of ``size × size`` images (Trockman & Kolter 2021).

    ``c = max(in, out)``; the parameter ``V`` (c, c, k, k) is a small kernel. At every
    frequency ``ω`` of the ``size × size`` grid, ``V̂(ω)`` (its zero-padded 2-D DFT, c × c) gives
    the skew-Hermitian ``A(ω) = V̂(ω) − V̂(ω)ᴴ`` and the unitary Cayley transform
    ``Q(ω) = (I + A)⁻¹(I − A)`` (``I + A`` is invertible: ``A``'s eigenvalues are imaginary).
    The layer's kernel ``K`` (out, in, size, size) is the inverse real DFT of the top-left
    ``out × in`` blocks of ``Q``, and the forward is the circular convolution by ``K``
    (:class:`PeriodicConv2d`): orthonormal output channels per frequency (``out ≤ in``) or
    input channels (``out > in``), so ``‖conv‖₂ = 1`` and, with ``out = in``, the map is
    orthogonal. Unlike a local convolution, ``K`` spans the whole grid.

    The bound is read from ``K`` (the tracer's ``periodic_conv`` rule), so it never rests on
    the transform's rounding or on ``K`` being exactly orthogonal.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, kernel_size: int = 3, bias: bool = True):
        super().__init__(in_channels, out_channels, size, bias)
        if not (isinstance(kernel_size, int) and 1 <= kernel_size <= size):
            raise ValueError(f"kernel_size must be an int in [1, size={size}]; got {kernel_size!r}")
        c = max(in_channels, out_channels)
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(c, c, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv2d's initialisation

    def kernel(self) -> torch.Tensor:
        n = self.size
        Vf = torch.fft.rfft2(self.weight, s=(n, n)).permute(2, 3, 0, 1)  # (n, n//2 + 1, c, c)
        A = Vf - Vf.conj().transpose(-2, -1)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        Q = torch.linalg.solve(eye + A, eye - A)[..., :self.out_channels, :self.in_channels]
        return torch.fft.irfft2(Q.permute(2, 3, 0, 1), s=(n, n))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.kernel_size}"


# ----------------------------------------------------------------------------- architecture

_LAYERS = {
    "aol_linear": (AOLLinear, ("in", "out")),
    "aol_conv2d": (AOLConv2d, ("in", "out", "k")),
    "cayley_linear": (CayleyLinear, ("in", "out")),
    "cayley_conv2d": (CayleyConv2d, ("in", "out", "size", "k")),
    "maxmin": (MaxMin, ()),
    "groupsort": (GroupSort, ("group",)),
    "flatten": (nn.Flatten, ()),
    "pixel_unshuffle": (nn.PixelUnshuffle, ("factor",)),
}


def check_architecture(spec) -> list:
    """Validate a JSON architecture (a list of ``{"type": ..., <int fields>}``); returns it."""
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"an architecture is a non-empty list of layers; got {type(spec).__name__}")
    for i, layer in enumerate(spec):
        if not isinstance(layer, dict) or layer.get("type") not in _LAYERS:
            raise ValueError(f"layer {i}: expected a dict with 'type' in {sorted(_LAYERS)}; got {layer!r}")
        fields = _LAYERS[layer["type"]][1]
        if set(layer) != {"type", *fields}:
            raise ValueError(f"layer {i} ({layer['type']}): expected fields {sorted(fields)}; got "
                             f"{sorted(set(layer) - {'type'})}")
        for f in fields:
            v = layer[f]
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"layer {i} ({layer['type']}): {f!r} must be a positive int; got {v!r}")
    return spec


def build_encoder(spec) -> nn.Sequential:
    """The ``nn.Sequential`` an architecture describes (freshly initialised)."""
    layers = []
    for layer in check_architecture(spec):
        cls, fields = _LAYERS[layer["type"]]
        layers.append(cls(*(layer[f] for f in fields)))
    return nn.Sequential(*layers)


def mlp_architecture(in_features: int, widths, latent: int, linear: str = "aol_linear") -> list:
    """Flatten, then linear layers of type ``linear`` (``"aol_linear"`` or
    ``"cayley_linear"``) with MaxMin between them, ending in ``latent``."""
    if linear not in ("aol_linear", "cayley_linear"):
        raise ValueError(f"linear must be 'aol_linear' or 'cayley_linear'; got {linear!r}")
    spec, prev = [{"type": "flatten"}], in_features
    for w in widths:
        spec += [{"type": linear, "in": prev, "out": w}, {"type": "maxmin"}]
        prev = w
    return spec + [{"type": linear, "in": prev, "out": latent}]


def conv_architecture(in_channels: int, size: int, channels, latent: int, width: int,
                      reduce: int | None = None, conv: str = "aol_conv2d", linear: str = "aol_linear") -> list:
    """Convolutions of type ``conv`` (``"aol_conv2d"``, 'same' zero padding, or
    ``"cayley_conv2d"``, circular) + MaxMin, each stage followed by a 2x PixelUnshuffle (an
    isometric downsampling), then linear layers of type ``linear``: a small
    LipConvNet-style encoder.

    ``reduce``: one more convolution + MaxMin after the stages, to ``reduce`` channels,
    before flattening. It keeps the first linear layer narrow: AOL rescales by the row sums
    of ``|WᵀW|``, an ``in × in`` Gram matrix formed at every step, and a Cayley layer solves
    an ``in × in`` system (on MNIST, ``[16, 32]`` ends in 128 × 7 × 7 = 6,272 features;
    ``reduce=32`` makes it 1,568).
    """
    if conv not in ("aol_conv2d", "cayley_conv2d"):
        raise ValueError(f"conv must be 'aol_conv2d' or 'cayley_conv2d'; got {conv!r}")

    def layer(c_in, c_out, s):
        return {"type": conv, "in": c_in, "out": c_out, "k": 3} | ({"size": s} if conv == "cayley_conv2d" else {})

    spec, c, s = [], in_channels, size
    for ch in channels:
        if s % 2:
            raise ValueError(f"conv_architecture: a 2x PixelUnshuffle needs an even size; stage {ch} gets {s}")
        spec += [layer(c, ch, s), {"type": "maxmin"}, {"type": "pixel_unshuffle", "factor": 2}]
        c, s = 4 * ch, s // 2
    if reduce is not None:
        spec += [layer(c, reduce, s), {"type": "maxmin"}]
        c = reduce
    spec.append({"type": "flatten"})
    return spec + mlp_architecture(c * s * s, [width], latent, linear)[1:]
