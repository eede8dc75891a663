"""Sound upper bounds on the ℓ2→ℓ2 Lipschitz constant of a torch module (DESIGN 1.6).

:func:`lipschitz_bound` traces the module with ``torch.fx`` and runs a dynamic program over
the graph in topological order. Every node carries ``L(node)``, an upper bound on the
Lipschitz constant of the map *input → value of that node* (the input has 1; parameters,
buffers and other constants have 0). Rules:

* an op of one input-dependent tensor with constant parameters: ``L = factor · L(input)``,
  sound because composition is submultiplicative, ``Lip(f∘g) ≤ Lip(f)·Lip(g)``;
* ``a ± b`` of two input-dependent tensors (residual connections): ``L(a) + L(b)``, by the
  triangle inequality; adding a constant changes no difference, so ``L`` is unchanged;
* ``cat``/``stack`` (any dim) and several outputs: ``√(Σ L_i²)``, because
  ``‖(Δa, Δb)‖² = ‖Δa‖² + ‖Δb‖² ≤ (L_a² + L_b²)‖Δx‖²``;
* broadcasting an input-dependent tensor to ``r`` times its size repeats each entry ``r``
  times: a further factor ``√r``.

Per-op factors (each an upper bound that includes its own float64 rounding):

* Linear, ``F.linear``, ``x @ W`` with a constant matrix: the spectral norm ``‖W‖₂`` (SVD).
* Conv1d/2d/3d, any stride, dilation, groups: zero padding is a restriction of a circular
  convolution on a periodic grid (:func:`_conv_grid`), whose norm is the maximum over the
  grid's frequencies of the spectral norm of the kernel's ``c_out × c_in`` DFT matrix
  (Sedghi, Gupta & Long, ICLR 2019); stride subsamples (norm ≤ 1); groups are blocks.
  Circular padding is that circular convolution itself; reflect/replicate padding copies
  each entry at most ``m`` times (factor ``√m``, counted exactly). ``conv_method="gram"``
  replaces the per-frequency SVDs by Gram iteration (Delattre, Barthélemy, Araujo &
  Allauzen, ICML 2023); ``"dense"`` takes the SVD of the dense operator (exact, small inputs).
* BatchNorm in eval: ``max |γ/√(running_var + ε)|``.
* Activations, with their arguments (:mod:`~gmfast.lipschitz.activations`): ReLU, ReLU6,
  Tanh, Hardtanh, Softsign, Softshrink(λ ≥ 0), Tanhshrink, LogSigmoid, CELU(α > 0),
  Threshold(t, v = t): 1; LeakyReLU: ``max(1, |slope|)``; RReLU (eval): that of its mean
  slope; ELU: ``max(1, |α|)``; PReLU: ``max(1, max|a|)``; Sigmoid: ¼; Hardsigmoid: ⅙; GELU
  (exact or tanh): 1.13; SiLU: 1.1; Mish: 1.09; Hardswish: 1.5; SELU: ``λ·α`` (1.7581);
  Softplus: 1 where its switch to the identity is continuous up to rounding. Each is
  ``sup |σ'|`` for those arguments; a discontinuous or non-Lipschitz one is refused.
* Max pooling: ``√m`` with ``m`` the largest number of windows holding one element.
  Average/adaptive-average pooling and nearest/linear interpolation are linear maps with
  nonnegative weights: the Schur test ``‖P‖₂ ≤ √(‖P‖₁‖P‖∞)``, with the row and column sums
  evaluated from the op itself. ``mean``/``sum`` over non-batch dims: ``1/√n``/``√n``.
* Shape and data-movement ops: view/reshape/flatten/permute/transpose/squeeze/contiguous
  and casts that lose nothing (float32 → float64): 1 (narrowing casts and ``view(dtype)``
  are step functions: refused); slicing, indexing, padding, expand/repeat, split: ``√m``
  with ``m`` the largest number of copies of one entry, counted by running the op on an
  index tensor (so a plain slice is 1 and ``x[:, [0, 0]]`` is √2).
* Multiplication/division by a python number or a constant tensor ``c``: ``max|c|`` or
  ``max 1/|c|``. So input normalisation inside the encoder, ``(x − mean)/std`` with
  constant tensors, has the factor ``max 1/|std|``: **radii are in the scale of the
  encoder's own input** (normalisation done before calling the encoder is not included).
* :class:`~gmfast.lipschitz.lipnet_rules.PeriodicConv2d` (a circular convolution by a
  full-size kernel, computed by FFT; e.g. the orthogonal ``gmfast.train.CayleyConv2d``): the
  norm of the circular convolution by the kernel its forward uses, from that kernel's
  per-frequency matrices (as for convolutions, DFT rounding included).
* A submodule with a float attribute ``lipschitz_constant`` is a leaf with that factor (the
  caller vouches for it): the way to wrap a part that has no rule.

Anything else (softmax, layer/group norm, attention, products of two input-dependent
tensors, transposed convolutions, bicubic interpolation, ops on integer or boolean tensors
...) raises :class:`UnsupportedOpError` naming the node and the op: a bound is never guessed.

What the bound does not cover: it is the constant of the exact-arithmetic function
``x ↦ module(x[None])[0]`` with the parameters as stored; the module's own floating-point
error is not bounded (Softplus's switch to the identity is accepted only where its jump is
below that rounding). What the trace cannot show is refused before any rule runs
(:func:`~gmfast.lipschitz.graph.check_trust`): forward hooks, pre-hooks, overridden
``forward``/``__call__`` on modules the trace keeps whole, global module hooks, unknown
parametrizations, compiled calls, and modules whose forward reads the training flag left in
train mode. Samples must be processed independently: the batch dimension is followed
through every op, and any op that mixes samples (a reduction, concatenation, flip or
contraction over it, wherever transposes put it) is refused
(:func:`~gmfast.lipschitz.graph.check_batch`); so are narrowing casts
(:func:`~gmfast.lipschitz.graph.check_casts`). In-place ops are followed only where no
other node can observe the change.

Layout (one traced graph, several analyses over it):

* :mod:`~gmfast.lipschitz.graph`: tracing and the trust checks every analysis relies on
  (the trace shows everything the module does, the trace computes what the module
  computes);
* :mod:`~gmfast.lipschitz.ops`: the op vocabulary, each op's *kind*;
* :mod:`~gmfast.lipschitz.walk`: :class:`~gmfast.lipschitz.walk.Analysis`, the walk that
  dispatches each node to its analysis's ``rule_<kind>``/``module_<kind>``;
* :mod:`~gmfast.lipschitz.global_bound`: the global Lipschitz bound (the rules above);
* :mod:`~gmfast.lipschitz._norms`: certified norms of the linear pieces;
* :mod:`~gmfast.lipschitz.estimate`: the power-iteration lower estimate;
* :mod:`~gmfast.lipschitz.api`: :func:`lipschitz_bound` and its cache.
"""

from gmfast.lipschitz.api import LipschitzBound, clear_cache, lipschitz_bound
from gmfast.lipschitz.errors import UnsupportedOpError

__all__ = ["LipschitzBound", "UnsupportedOpError", "clear_cache", "lipschitz_bound"]
