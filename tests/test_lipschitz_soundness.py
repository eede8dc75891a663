"""Regression tests for the soundness holes of issue 13 (parts 2–4) and 18.7: modules whose
calls the trace cannot see, rules that ignore torch's arguments, casts, batch coupling, and
the train-mode check. Each case is attacked (observed quotients, Jacobian norms, ascent):
it must be refused with a clear error or bounded soundly."""

import importlib
import types

import pytest
import torch
from lipschitz_attack import as_float64, observed_ratio, sound_or_refused
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as module_globals
from torch.nn.utils import parametrize

from gmfast.lipschitz import UnsupportedOpError, lipschitz_bound


def spec(W):
    return torch.linalg.matrix_norm(W.detach().double(), 2).item()


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


# ----------------------------------------------------------------------------- 13.2: hidden calls


def _hooked(kind):
    m = net()
    lin = m[2]
    if kind == "forward hook":
        lin.register_forward_hook(lambda mod, inp, out: 50.0 * out)
    elif kind == "forward hook with kwargs":
        lin.register_forward_hook(lambda mod, args, kwargs, out: 50.0 * out, with_kwargs=True)
    elif kind == "forward hook always called":
        lin.register_forward_hook(lambda mod, inp, out: 50.0 * out, always_call=True)
    elif kind == "pre-hook":
        lin.register_forward_pre_hook(lambda mod, inp: (50.0 * inp[0],))
    elif kind == "pre-hook with kwargs":
        lin.register_forward_pre_hook(lambda mod, args, kwargs: ((50.0 * args[0],), kwargs), with_kwargs=True)
    elif kind == "in-place hook":
        lin.register_forward_hook(lambda mod, inp, out: (out.mul_(50.0), None)[1])
    elif kind == "instance forward":
        lin.forward = types.MethodType(lambda self, x: 50.0 * F.linear(x, self.weight, self.bias), lin)
    elif kind == "instance _call_impl":
        lin._call_impl = types.MethodType(lambda self, x: 50.0 * F.linear(x, self.weight, self.bias), lin)
    return m


HIDDEN = ["forward hook", "forward hook with kwargs", "forward hook always called", "pre-hook",
          "pre-hook with kwargs", "in-place hook", "instance forward", "instance _call_impl"]


@pytest.mark.parametrize("kind", HIDDEN)
def test_calls_the_trace_cannot_see_are_refused(kind):
    m = _hooked(kind)
    with pytest.raises(UnsupportedOpError, match=r"(hook|instance attribute).*remove it before bounding") as info:
        lipschitz_bound(m, (4,))
    assert "module '2' (Linear)" in str(info.value)
    # what the old code certified, ‖W₁‖‖W₂‖, is far below what the hooked module does
    plain = spec(m[0].weight) * spec(m[2].weight)
    assert observed_ratio(as_float64(m), (4,), ascent_steps=0) > 5 * plain


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = net()

    def forward(self, x):
        return self.inner(x)


def test_hooks_and_overrides_of_traced_modules_are_in_the_graph():
    # a module that is not a leaf is traced through its call: hooks and instance forward show
    m = net()
    m.register_forward_hook(lambda mod, inp, out: 50.0 * out)
    plain = spec(m[0].weight) * spec(m[2].weight)
    assert sound_or_refused(m, (4,)) == pytest.approx(50 * plain, rel=1e-9)
    outer = _Outer()
    outer.forward = types.MethodType(lambda self, x: 50.0 * self.inner(x), outer)
    assert sound_or_refused(outer.eval(), (4,)) == pytest.approx(50 * plain, rel=1e-9)
    bare = nn.Module()  # torch's own class: a leaf, so its instance forward is hidden from the trace
    bare.forward = types.MethodType(lambda self, x: 50.0 * x, bare)
    with pytest.raises(UnsupportedOpError, match="instance attribute 'forward'"):
        lipschitz_bound(bare.eval(), (4,))
    loud = nn.Sequential(_LoudCall(3, 3)).eval()  # not a leaf: its __call__ is traced
    assert sound_or_refused(loud, (3,)) == pytest.approx(50 * spec(loud[0].weight), rel=1e-9)


def test_global_hooks_are_refused():
    m = net()
    for register in (module_globals.register_module_forward_hook, module_globals.register_module_forward_pre_hook):
        hook = (lambda mod, inp, out: None) if register is module_globals.register_module_forward_hook \
            else (lambda mod, inp: None)
        handle = register(hook)
        try:
            with pytest.raises(UnsupportedOpError, match="global module hook"):
                lipschitz_bound(m, (4,))
        finally:
            handle.remove()
    handle = module_globals.register_module_module_registration_hook(lambda mod, name, sub: sub)
    try:
        with pytest.raises(UnsupportedOpError, match="_global_module_registration_hooks"):
            lipschitz_bound(m, (4,))
    finally:
        handle.remove()
    assert lipschitz_bound(m, (4,), cache=False).bound > 0  # and nothing is left behind


def test_a_cached_result_is_not_returned_after_a_hook_is_added():
    m = net()
    lipschitz_bound(m, (4,))
    handle = m[0].register_forward_hook(lambda mod, inp, out: 50.0 * out)
    try:
        with pytest.raises(UnsupportedOpError, match="forward hook"):
            lipschitz_bound(m, (4,))
    finally:
        handle.remove()


class _LoudCall(nn.Linear):
    def __call__(self, x):
        return 50.0 * super().__call__(x)


class _LeafCall(nn.Linear):
    lipschitz_constant = 1.0  # a leaf: the rule (the vouched constant) is for its forward

    def __call__(self, x):
        return 50.0 * super().__call__(x)


def test_class_level_call_overrides_of_leaves_and_compiled_calls_are_refused():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedOpError, match="overrides __call__"):
        lipschitz_bound(nn.Sequential(_LeafCall(3, 3)).eval(), (3,))
    lin = nn.Linear(3, 3).eval()
    lin._compiled_call_impl = lambda x: 50.0 * F.linear(x, lin.weight, lin.bias)  # what .compile() sets
    with pytest.raises(UnsupportedOpError, match="compiled"):
        lipschitz_bound(lin, (3,))


class _Loud(torch.Tensor):
    """A tensor subclass whose every op is 50 times larger."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) * 50.0 if func is F.linear else out


def test_replaced_class_forward_tensor_subclasses_and_hooks_inside_a_root_leaf_are_refused():
    from torch.nn.utils.parametrizations import orthogonal

    original = nn.Linear.forward
    nn.Linear.forward = lambda self, x: 50.0 * original(self, x)
    try:
        with pytest.raises(UnsupportedOpError, match=r"Linear.forward has been replaced"):
            lipschitz_bound(net(), (4,))
    finally:
        nn.Linear.forward = original
    m = net()
    m[0].weight = nn.Parameter(m[0].weight.detach().as_subclass(_Loud))
    with pytest.raises(UnsupportedOpError, match=r"tensor subclasses \[\('weight', '_Loud'\)\]"):
        lipschitz_bound(m, (4,))
    lin = orthogonal(nn.Linear(3, 3)).eval()  # the root is a leaf: its parametrization is inside it
    lin.parametrizations.weight[0].register_forward_hook(lambda mod, inp, out: 5.0 * out)
    with pytest.raises(UnsupportedOpError, match=r"'parametrizations.weight.0' \(_Orthogonal\) has a forward hook"):
        lipschitz_bound(lin, (3,))


def test_vouched_modules_with_hooks_are_refused():
    class Vouched(nn.Module):
        lipschitz_constant = 1.0

        def forward(self, x):
            return torch.tanh(x)

    v = Vouched()
    v.register_forward_hook(lambda mod, inp, out: 50.0 * out)
    with pytest.raises(UnsupportedOpError, match="forward hook"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), v).eval(), (3,))


def test_backward_hooks_do_not_change_the_bound():
    m = net()
    want = lipschitz_bound(m, (4,), estimate=False, cache=False).bound
    m[0].register_full_backward_hook(lambda mod, gi, go: None)
    assert lipschitz_bound(m, (4,), estimate=False, cache=False).bound == want


class _Noisy(nn.Module):
    def forward(self, W):
        return 50.0 * W


def test_parametrizations():
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm

    torch.manual_seed(2)
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", _Noisy())
    with pytest.raises(UnsupportedOpError, match=r"parametrization \['_Noisy'\] of 'weight'"):
        lipschitz_bound(nn.Sequential(lin).eval(), (4,))
    # torch's own are handled (the rule reads the parametrised weight)
    m = nn.Sequential(orthogonal(nn.Linear(4, 4)), nn.Tanh(), spectral_norm(nn.Linear(4, 2))).eval()
    b = lipschitz_bound(m, (4,), estimate=False, cache=False).bound
    assert b == pytest.approx(spec(m[0].weight) * spec(m[2].weight), rel=1e-9)
    assert sound_or_refused(m, (4,), n_pairs=16, ascent_steps=10) == b  # (orthogonal re-derives W per call)


def test_old_style_spectral_norm_hook_is_bounded_in_eval_and_refused_in_training():
    old_sn = importlib.import_module("torch.nn.utils.spectral_norm").spectral_norm
    torch.manual_seed(4)
    m = nn.Sequential(old_sn(nn.Linear(5, 5)), nn.ReLU(), nn.Linear(5, 2))
    m.train()
    for _ in range(20):
        m(torch.randn(3, 5))  # settle the power iteration
    m.eval()
    b = sound_or_refused(m, (5,))
    assert b is not None and b == pytest.approx(spec(m[0].weight) * spec(m[2].weight), rel=1e-9)
    m[0].train()
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) is in train mode"):
        lipschitz_bound(m, (5,))


def test_old_style_weight_norm_hook_is_bounded():
    import warnings

    old_wn = importlib.import_module("torch.nn.utils.weight_norm").weight_norm
    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of the parametrization
        lin = old_wn(nn.Linear(4, 3))
    with torch.no_grad():
        lin.weight_g.mul_(3.0)  # forward recomputes weight = g·v/‖v‖ from these
    m = nn.Sequential(lin).train()  # weight norm does not read the training flag
    lin(torch.zeros(1, 4))
    assert sound_or_refused(m, (4,)) == pytest.approx(spec(lin.weight), rel=1e-9)


# ----------------------------------------------------------------------------- 18.7: train mode


def test_only_mode_dependent_modules_are_refused_in_train_mode():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).train()
    assert lipschitz_bound(lin, (3,), cache=False).bound == pytest.approx(spec(lin.weight), rel=1e-9)
    plain = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4, 2)).train()
    assert sound_or_refused(plain, (1, 6)) is not None
    from torch.nn.utils.parametrizations import spectral_norm

    for mod, name in ((nn.BatchNorm1d(3), "BatchNorm1d"), (nn.Dropout(0.1), "Dropout"),
                      (nn.AlphaDropout(0.1), "AlphaDropout"), (nn.RReLU(), "RReLU"),
                      (spectral_norm(nn.Linear(3, 3)), "_SpectralNorm")):
        m = nn.Sequential(nn.Linear(3, 3), mod).eval()
        (m[1].parametrizations.weight[0] if name == "_SpectralNorm" else m[1]).train()
        with pytest.raises(ValueError, match=rf"\({name}\) is in train mode; call \.eval\(\)"):
            lipschitz_bound(m, (3,))


# ----------------------------------------------------------------------------- 13.3: arguments


class _Fn(nn.Module):
    """``Linear(3, 3)`` then ``fn`` (a functional form with its arguments)."""

    def __init__(self, fn, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3, 3).to(dtype)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


# (module or function, expected factor or None for a refusal, pattern of the refusal)
ACTIVATIONS = [
    (nn.Softplus(threshold=0.0), None, "jump of log"),
    (nn.Softplus(beta=0.5, threshold=2.0), None, "jump of log"),
    (nn.Softplus(beta=-2.0, threshold=0.0), None, "jump of log"),
    (nn.Softplus(beta=3.0), 1.0, ""),  # the default threshold: jump 7e-10, below float32 rounding
    (nn.Softplus(beta=-2.0, threshold=30.0), 1.0, ""),
    (nn.Threshold(0.5, 0.0), None, "jump of 0.5"),
    (nn.Threshold(-1.0, -1.0), 1.0, ""),
    (nn.LeakyReLU(3.0), 3.0, ""),
    (nn.LeakyReLU(-1.5), 1.5, ""),
    (nn.ELU(alpha=-2.0), 2.0, ""),
    (nn.ELU(alpha=0.3), 1.0, ""),
    (nn.CELU(alpha=-1.0), None, "alpha must be > 0"),
    (nn.CELU(alpha=0.2), 1.0, ""),
    (nn.RReLU(0.1, 3.0), 1.55, ""),  # eval: the mean slope
    (nn.Hardtanh(-0.5, 2.0), 1.0, ""),
    (nn.Softshrink(0.0), 1.0, ""),
    (nn.GELU(approximate="tanh"), 1.13, ""),
    (lambda t: F.softplus(t, 1.0, 0.0), None, "jump of log"),
    (lambda t: F.softplus(t, threshold=0.0), None, "jump of log"),
    (lambda t: F.softplus(t, beta=2.0), 1.0, ""),
    (lambda t: F.leaky_relu(t, 3.0), 3.0, ""),
    (lambda t: F.leaky_relu(t, negative_slope=-4.0), 4.0, ""),
    (lambda t: F.elu(t, alpha=-2.0), 2.0, ""),
    (lambda t: F.elu(t, 2.5), 2.5, ""),
    (lambda t: F.celu(t, -1.0), None, "alpha must be > 0"),
    (lambda t: torch.celu(t, alpha=0.5), 1.0, ""),
    (lambda t: F.threshold(t, 0.1, 2.0), None, "jump of 1.9"),
    (lambda t: F.threshold(t, threshold=0.1, value=0.1), 1.0, ""),
    (lambda t: torch.threshold(t, 0.0, 1.0), None, "jump of 1"),
    (lambda t: F.rrelu(t, 0.5, 2.5), 1.5, ""),
    (lambda t: F.rrelu(t, 0.5, 2.5, True), None, "training=True"),
    (lambda t: F.hardtanh(t, -2.0, 3.0), 1.0, ""),
    (lambda t: F.gelu(t, approximate="tanh"), 1.13, ""),
    (lambda t: F.softshrink(t, 0.25), 1.0, ""),
]


@pytest.mark.parametrize("act,want,pattern", ACTIVATIONS, ids=[str(i) for i in range(len(ACTIVATIONS))])
def test_activation_rules_read_their_arguments(act, want, pattern):
    m = _Fn(act).eval()
    Wn = spec(m.lin.weight)
    if want is None:
        with pytest.raises(UnsupportedOpError, match=pattern):
            lipschitz_bound(m, (3,), estimate=False, cache=False)
        return
    b = sound_or_refused(m, (3,))
    assert b == pytest.approx(want * Wn, rel=1e-6)


def test_a_discontinuous_softplus_breaks_a_factor_of_one():
    # the hole itself: with threshold=0 the quotient across the switch is ~log(2)/|x − y|
    m = nn.Sequential(nn.Softplus(threshold=0.0)).double()
    assert observed_ratio(m, (2,), ascent_steps=0) > 100


def test_softplus_switch_against_the_rounding_of_the_working_dtype():
    # default threshold 20: the jump 2.1e-9 is below float32 rounding at 20, above float64's
    assert lipschitz_bound(_Fn(nn.Softplus()).eval(), (3,), estimate=False).bound > 0
    with pytest.raises(UnsupportedOpError, match="rounding of torch.float64"):
        lipschitz_bound(_Fn(nn.Softplus(), torch.float64).eval(), (3,), estimate=False)
    assert lipschitz_bound(_Fn(nn.Softplus(threshold=40.0), torch.float64).eval(), (3,), estimate=False).bound > 0


def test_positional_inplace_activation_seen_by_another_node_is_refused():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            z = y.view(-1, 3)
            F.leaky_relu(y, 5.0, True)  # in place (positional; fx records it as a keyword): z sees it
            return z

    with pytest.raises(UnsupportedOpError, match="in-place"):
        lipschitz_bound(Aliased().eval(), (3,))


CASTS = [
    (lambda t: t.half().float(), torch.float32, "casts torch.float32 to torch.float16"),
    (lambda t: t.bfloat16().float(), torch.float32, "to torch.bfloat16"),
    (lambda t: t.to(torch.float16).float(), torch.float32, "to torch.float16"),
    (lambda t: t.to(dtype=torch.float16).float(), torch.float32, "to torch.float16"),
    (lambda t: t.to(t.device, torch.bfloat16).float(), torch.float32, "to torch.bfloat16"),
    (lambda t: t.type(torch.float16).float(), torch.float32, "to torch.float16"),
    (lambda t: t.type_as(torch.zeros(1, dtype=torch.float16)).float(), torch.float32, "to torch.float16"),
    (lambda t: t.float().double(), torch.float64, "casts torch.float64 to torch.float32"),
    (lambda t: t.to(torch.float32).to(torch.float64), torch.float64, "to torch.float32"),
    (lambda t: t.view(torch.int32).float(), torch.float32, r"view\(dtype\)"),
    (lambda t: t.view(dtype=torch.int32).float(), torch.float32, r"view\(dtype\)"),
]


@pytest.mark.parametrize("fn,dtype,pattern", CASTS, ids=[str(i) for i in range(len(CASTS))])
def test_narrowing_casts_are_refused(fn, dtype, pattern):
    with pytest.raises(UnsupportedOpError, match=pattern):
        lipschitz_bound(_Fn(fn, dtype).eval(), (3,), estimate=False, cache=False)


def test_widening_and_same_type_casts_are_the_identity():
    m = _Fn(lambda t: t.float().to(torch.float32).type(torch.float32).contiguous()).eval()
    assert sound_or_refused(m, (3,)) == pytest.approx(spec(m.lin.weight), rel=1e-9)
    up = _Fn(lambda t: t.double() * 2.0).eval()  # float32 -> float64 is exact
    assert sound_or_refused(up, (3,)) == pytest.approx(2 * spec(up.lin.weight), rel=1e-9)


# ----------------------------------------------------------------------------- 13.4: batch coupling


class _Batch(nn.Module):
    """``Linear`` then ``fn`` on the batch (inputs of shape (4,) or ``shape``)."""

    def __init__(self, fn, d=4):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(d, d)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


COUPLED = [
    lambda t: t - t.t().mean(1, keepdim=True).t(),  # the reported case
    lambda t: t.t().sum(dim=-1),
    lambda t: t.transpose(0, 1).amax(1, keepdim=True).transpose(0, 1).expand_as(t),
    lambda t: t.flip(0),
    lambda t: t.roll(1, 0),
    lambda t: t.t().flip(1).t(),
    lambda t: torch.cat([t, t], 0),
    lambda t: torch.cat([t[1:], t[:1]], 0),
    lambda t: t[[0]].expand_as(t),
    lambda t: F.conv1d(t[None], torch.ones(2, t.shape[0], 1)),  # the batch as channels
    lambda t: t.sum(0, keepdim=True) + t,
    lambda t: t @ torch.ones(4, 4) + t.t().t().mean(0),
    lambda t: t.reshape(-1)[:4].expand(t.shape[0], 4),
]


@pytest.mark.parametrize("fn", COUPLED, ids=[str(i) for i in range(len(COUPLED))])
def test_outputs_that_depend_on_other_rows_are_refused(fn):
    m = _Batch(fn).eval()
    with pytest.raises(UnsupportedOpError, match=r"mixes samples of the batch|fails on a batch of"):
        lipschitz_bound(m, (4,))  # with the default estimate: no raw RuntimeError either


def test_the_reported_coupling_changes_one_row_by_changing_another():
    # the hole: a bound per row ignores that each output moves with the other rows
    m = _Batch(COUPLED[0]).eval()
    x = torch.randn(3, 4)
    y = x.clone()
    y[1:] += 5.0
    assert (m(x)[0] - m(y)[0]).norm() > 1.0  # row 0's input did not change


INDEPENDENT = [
    (lambda t: t.t().t(), (4,)),
    (lambda t: t.transpose(0, 1).contiguous().transpose(0, 1) * 2.0, (4,)),
    (lambda t: t.view(t.size(0), 2, 2).flatten(1), (4,)),
    (lambda t: t.unsqueeze(1).squeeze(1).unsqueeze(0).squeeze(0), (4,)),
    (lambda t: t.permute(1, 0).mean(0), (4,)),  # a mean over features, after a transpose
    (lambda t: torch.stack([t, 2 * t], 0).sum(0), (4,)),
    (lambda t: torch.cat([t, t.flip(1)], 1), (4,)),
    (lambda t: t.unflatten(1, (2, 2)).transpose(0, 2).amax(1).t(), (4,)),
    (lambda t: t[:, [1, 1, 0]], (4,)),
    (lambda t: F.pad(t, (1, 2), mode="constant", value=3.0), (4,)),
]


@pytest.mark.parametrize("fn,shape", INDEPENDENT, ids=[str(i) for i in range(len(INDEPENDENT))])
def test_batch_axis_tracked_through_moves(fn, shape):
    assert sound_or_refused(_Batch(fn).eval(), shape) is not None


def test_estimate_failures_are_clear_errors():
    lin = nn.Linear(3, 3).eval()
    with pytest.raises(ValueError, match=r"points must have shape \(P, \*input_shape\) = \(P, 3\); got \(5,\)"):
        lipschitz_bound(lin, (3,), points=torch.randn(5))


def test_certifier_refuses_an_encoder_with_a_hidden_hook():
    # the reported attack: Certifier radii built on the hook-blind bound were broken by PGD
    import gmfast

    torch.manual_seed(5)
    enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    X = torch.randn(60, 4, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    with torch.no_grad():
        head = gmfast.GaussianMixtureHead("tied").fit(enc(X), y)
    enc[2].register_forward_hook(lambda mod, inp, out: 50.0 * out)
    with pytest.raises(UnsupportedOpError, match=r"module '2' \(Linear\) has a forward hook"):
        gmfast.Certifier(enc, head).certify(X[:5])


def _sweep():
    """Activations over a grid of their arguments (edge values included)."""
    edge = [-3.0, -1.0, -0.25, 0.0, 0.01, 0.5, 1.0, 2.0]
    mods = [nn.LeakyReLU(s) for s in edge] + [nn.ELU(a) for a in edge] + [nn.CELU(a) for a in edge if a != 0]
    mods += [nn.Hardtanh(lo, lo + w) for lo in (-2.0, 0.0, 0.5) for w in (0.01, 1.0)]
    mods += [nn.Threshold(t, t + dv) for t in (-1.0, 0.0, 0.5) for dv in (0.0, 0.3, -1.0)]
    mods += [nn.RReLU(lo, lo + w) for lo in (0.0, 0.5, 2.0) for w in (0.0, 1.0)]
    mods += [nn.Softshrink(lam) for lam in (0.0, 0.5, 2.0)]
    mods += [nn.Softplus(beta=b, threshold=t) for b in (-2.0, 0.5, 3.0) for t in (-1.0, 0.0, 5.0, 40.0)]
    mods += [nn.GELU(approximate="tanh"), nn.GELU(), nn.SiLU(), nn.Mish(), nn.Hardswish(), nn.Hardsigmoid(),
             nn.SELU(), nn.Softsign(), nn.LogSigmoid(), nn.Tanhshrink(), nn.Sigmoid(), nn.ReLU6()]
    return mods


@pytest.mark.parametrize("act", _sweep(), ids=repr)
def test_activation_factor_against_grid_quotients(act):
    # independent reference: the largest quotient between neighbours of a fine float64 grid
    # that contains every switch point (jumps show as quotients ~ jump / spacing)
    knots = torch.tensor([0.0, -1.0, 0.5, 0.3, -0.5, -2.0, 2.0, 5 / 3, -20.0, 80.0, -2.5, 10.0, -1 / 3, 40 / 3],
                         dtype=torch.float64)
    grid = torch.cat([torch.linspace(-40, 40, 200_001, dtype=torch.float64),
                      (knots[:, None] + torch.linspace(-1e-6, 1e-6, 41, dtype=torch.float64)).reshape(-1)])
    grid = grid.unique()
    grid = grid[torch.cat([torch.ones(1, dtype=torch.bool), grid[1:] - grid[:-1] > 1e-8])]  # no near-duplicates
    with torch.no_grad():
        y = act.double().eval()(grid)
    q = ((y[1:] - y[:-1]).abs() / (grid[1:] - grid[:-1])).max().item()
    try:
        bound = lipschitz_bound(nn.Sequential(act).double().eval(), (1,), estimate=False, cache=False).bound
    except (UnsupportedOpError, ValueError) as e:
        assert "no Lipschitz rule" in str(e)
        assert q > 10.0, f"refused, yet the grid finds at most {q}: {e}"  # refusals are for real jumps
        return
    assert q <= bound * (1 + 1e-6), f"grid quotient {q} > bound {bound}"
    assert bound <= 1.02 * q + 1e-12 or q == 0.0  # and not loose
