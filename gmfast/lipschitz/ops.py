"""The op vocabulary shared by every analysis: which torch module classes, functions and
tensor methods the package understands, and the *kind* each one is dispatched as.

An analysis (:class:`gmfast.lipschitz.walk.Analysis`) implements one method per kind:
``module_<kind>(node, mod)`` for a ``call_module`` node and ``rule_<kind>(node)`` for a
function or method call. Anything :func:`module_kind` / :func:`function_kind` do not
recognise is refused by the walk, so a new op needs an entry here *and* a rule in every
analysis.
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from gmfast.lipschitz import activations
from gmfast.lipschitz.lipnet_rules import leaf_kind


#: Elementwise functions (the names of ``rule_activation``; their arguments are read by
#: :mod:`gmfast.lipschitz.activations`).
ACTIVATION_NAMES = set(activations.FIXED) | set(activations.SIGNATURES)
#: Activation module classes → their names.
ACTIVATION_MODULES = {cls: name for cls, (name, _) in activations.MODULES.items()}
#: Modules that compute the identity in eval mode (or only reshape).
IDENTITY_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
CONSTANT_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
COPY_PADS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
              nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)
MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
LINEAR_INTERPOLATION = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")


#: call_function targets, by the name of their rule (in-place forms end in "_").
FUNCTION_NAMES = {
    operator.add: "add", operator.iadd: "add_", operator.sub: "sub", operator.isub: "sub_", operator.mul: "mul",
    operator.imul: "mul_", operator.truediv: "div", operator.itruediv: "div_", operator.neg: "neg",
    operator.pos: "pos", operator.getitem: "getitem", operator.matmul: "matmul", builtins.getattr: "getattr",
    torch.add: "add", torch.sub: "sub", torch.subtract: "sub", torch.mul: "mul", torch.multiply: "mul",
    torch.div: "div", torch.divide: "div", torch.true_divide: "div", torch.neg: "neg", torch.negative: "neg",
    torch.positive: "pos", torch.abs: "abs", torch.matmul: "matmul", torch.mm: "matmul",
    torch.relu: "relu", torch.relu_: "relu_", F.relu: "relu", F.relu_: "relu_", F.relu6: "relu6",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardtanh: "hardtanh",
    F.softsign: "softsign", F.tanhshrink: "tanhshrink", F.logsigmoid: "logsigmoid", F.softshrink: "softshrink",
    F.softplus: "softplus", F.hardsigmoid: "hardsigmoid", F.gelu: "gelu", F.silu: "silu", F.mish: "mish",
    F.hardswish: "hardswish", F.selu: "selu", torch.selu: "selu", F.leaky_relu: "leaky_relu", F.elu: "elu",
    F.celu: "celu", F.elu_: "elu_", F.celu_: "celu_", torch.celu: "celu", torch.celu_: "celu_",
    F.hardtanh_: "hardtanh_",
    F.leaky_relu_: "leaky_relu_", torch.selu_: "selu_", F.threshold: "threshold", F.threshold_: "threshold_",
    torch.threshold: "threshold", torch.threshold_: "threshold_", F.rrelu: "rrelu", F.rrelu_: "rrelu_",
    torch.rrelu: "rrelu", torch.rrelu_: "rrelu_", torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp",
    torch.clamp_max: "clamp",
    F.dropout: "dropout", F.dropout1d: "dropout", F.dropout2d: "dropout", F.dropout3d: "dropout",
    F.alpha_dropout: "dropout", F.feature_alpha_dropout: "dropout",
    F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.batch_norm: "batch_norm",
    F.pad: "pad", F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool", F.adaptive_avg_pool3d: "avg_pool",
    F.adaptive_max_pool1d: "adaptive_max_pool", F.adaptive_max_pool2d: "adaptive_max_pool",
    F.adaptive_max_pool3d: "adaptive_max_pool", F.interpolate: "interpolate",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat", torch.stack: "cat",
    torch.mean: "mean", torch.sum: "sum", torch.amax: "amax",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.permute: "reshape", torch.transpose: "reshape",
    torch.swapaxes: "reshape", torch.swapdims: "reshape", torch.movedim: "reshape", torch.moveaxis: "reshape",
    torch.squeeze: "reshape", torch.unsqueeze: "reshape", torch.t: "reshape", torch.clone: "reshape",
    torch.detach: "reshape", torch.flip: "reshape", torch.roll: "reshape", F.pixel_shuffle: "reshape",
    F.pixel_unshuffle: "reshape", torch.narrow: "copy", torch.select: "copy", torch.split: "copy",
    torch.chunk: "copy", torch.unbind: "copy", torch.tensor_split: "copy", torch.broadcast_to: "copy",
    torch.tile: "copy",
    # transformer ops: no global rule (refused there); the local route relaxes them
    torch.bmm: "matmul", F.layer_norm: "layer_norm", F.softmax: "softmax", torch.softmax: "softmax",
    torch.exp: "exp", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.reciprocal: "reciprocal",
    torch.square: "square", torch.pow: "pow", operator.pow: "pow",
    F.scaled_dot_product_attention: "attention",
}
#: Tensor methods that only reshape/permute (factor 1); the value is a bijection of entries.
RESHAPE_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
                    "swapaxes", "swapdims", "movedim", "moveaxis", "t", "squeeze", "unsqueeze", "contiguous",
                    "clone", "detach", "flip", "roll", "to", "float", "double", "half", "bfloat16", "type",
                    "type_as", "cpu", "cuda"}
#: Tensor methods that copy or drop entries: factor √(largest multiplicity), counted.
COPY_METHODS = {"narrow", "select", "split", "chunk", "unbind", "tensor_split", "expand", "expand_as", "repeat",
                 "tile", "broadcast_to"}
ARITH_METHODS = {"add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "matmul", "mm",
                  "mean", "sum", "amax", "clamp", "clip", "clamp_min", "clamp_max", "abs", "neg", "negative",
                  "relu", "sigmoid", "tanh", "bmm", "softmax", "exp", "sqrt", "rsqrt", "reciprocal", "square",
                  "pow"}
#: Results that depend on the input's shape/dtype/device only, not on its values.
META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
                 "is_contiguous", "is_complex", "element_size", "stride", "new_zeros", "new_ones", "new_full"}
META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
#: Results that may share memory with their first argument.
ALIASING = RESHAPE_METHODS | COPY_METHODS | {"getitem", "reshape", "copy", "getattr", "dropout"}


def is_meta(node) -> bool:
    if node.op == "call_method":
        return node.target in META_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return node.args[1] in META_ATTRS
        return node.target in (builtins.len, torch.numel, torch.is_floating_point, torch.zeros_like,
                               torch.ones_like, torch.full_like)
    return False


def shape_of(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def arg(node, i: int, key: str, default=None):
    if key in node.kwargs:
        return node.kwargs[key]
    return node.args[i] if len(node.args) > i else default


#: Names that are synonyms of one rule.
_SYNONYMS = {"subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div", "negative": "neg",
             "clip": "clamp", "clamp_min": "clamp", "clamp_max": "clamp", "mm": "matmul", "bmm": "matmul"}


def function_kind(node):
    """``(kind, inplace)`` of a ``call_function``/``call_method`` node, or ``(None, what)``
    with a description of the op when it is not in the vocabulary."""
    if node.op == "call_method":
        name = node.target
        inplace = name.endswith("_") and not name.startswith("_")
        base = name[:-1] if inplace else name
        if base in RESHAPE_METHODS:
            base = "reshape"
        elif base in COPY_METHODS:
            base = "copy"
        elif base not in ARITH_METHODS:
            return None, f"method .{name}()"
    else:
        base = FUNCTION_NAMES.get(node.target)
        if base is None:
            return None, f"function {op_name(node)}"
        inplace = base.endswith("_") or bool(node.kwargs.get("inplace", False))
        base = base.rstrip("_")
        if base in ACTIVATION_NAMES:  # `inplace` may be passed positionally
            inplace = inplace or any(a is True for a in node.args[1:])
    base = _SYNONYMS.get(base, base)
    if base in ACTIVATION_NAMES:
        base = "activation"
    return base, inplace


def module_kind(mod: nn.Module):
    """The kind of a leaf module (``None`` when it has no rule), looking through a
    ``parametrize`` subclass to the class it was generated from."""
    if leaf_kind(mod) is not None:  # 1-Lipschitz-network blocks with proven rules
        return leaf_kind(mod)
    if hasattr(mod, "lipschitz_constant"):
        return "vouched"
    t = type(mod)
    if parametrize.is_parametrized(mod):
        # e.g. spectral_norm: a generated subclass whose parametrised tensors (read through
        # the same attributes) are what forward uses; the rule is the base class's
        t = t.__bases__[0]
    if t in activations.MODULES:
        return "activation"
    kinds = {nn.PReLU: "prelu", nn.Linear: "linear", nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm",
             nn.BatchNorm3d: "batch_norm", nn.Upsample: "upsample", nn.LayerNorm: "layer_norm",
             nn.Softmax: "softmax"}
    if t in kinds:
        return kinds[t]
    if t in IDENTITY_MODULES or isinstance(mod, CONSTANT_PADS):
        return "identity"
    if t in CONVS:
        return "conv"
    if t in MAX_POOLS:
        return "max_pool"
    if isinstance(mod, AVG_POOLS):
        return "avg_pool"
    if isinstance(mod, ADAPTIVE_MAX_POOLS):
        return "adaptive_max_pool"
    if isinstance(mod, nn.Upsample):
        return "upsample"
    if isinstance(mod, COPY_PADS):
        return "copy_pad"
    return None


def rule_class(mod: nn.Module) -> type:
    """The class whose rule applies: a ``parametrize`` subclass is generated from it."""
    t = type(mod)
    return t.__bases__[0] if parametrize.is_parametrized(mod) else t


def activation_name(node) -> str:
    """The name of the activation a ``call_function``/``call_method`` node of kind
    ``"activation"`` computes (``"leaky_relu"``, ``"neg"``, ...)."""
    name = node.target if isinstance(node.target, str) else FUNCTION_NAMES[node.target]
    name = name.rstrip("_")
    return _SYNONYMS.get(name, name)


def op_name(node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def may_alias(gm, n) -> bool:
    """Whether the value of node ``n`` may share memory with its first argument."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return isinstance(mod, IDENTITY_MODULES) or bool(getattr(mod, "inplace", False))
    if n.op == "call_method":
        return n.target in ALIASING or (n.target.endswith("_") and not n.target.startswith("_"))
    if n.op == "call_function":
        name = FUNCTION_NAMES.get(n.target, "")
        return name in ALIASING or name.endswith("_") or bool(n.kwargs.get("inplace", False))
    return False
