"""Lipschitz bounds: against exact operator norms (dense Jacobian + float64 SVD), attacks on
the ratio ‖f(x) − f(y)‖/‖x − y‖, brute-force counts, and the composition rules."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gmfast.lipschitz import LipschitzBound, UnsupportedOpError, clear_cache, lipschitz_bound

NO_RULE = "no Lipschitz rule; pass lipschitz=<float> explicitly or wrap it"


def exact_norm(module, input_shape):
    """‖A‖₂ of a linear (or affine) module on inputs of ``input_shape``: its dense Jacobian in
    float64 (one column per input entry) and an SVD. Independent of gmfast's code paths."""
    module = module.double().eval()
    x = torch.zeros((1,) + tuple(input_shape), dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: module(t).reshape(-1), x).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(J, 2).item()


def spec(W):
    return torch.linalg.matrix_norm(W.detach().double(), 2).item()


def worst_ratio(f, input_shape, n_pairs=300, ascent_steps=150, seed=0):
    """Largest ‖f(x) − f(y)‖/‖x − y‖ over random pairs (far and near), then Adam ascent on the
    ratio from the best pair (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n_pairs,) + input_shape, generator=g, dtype=torch.float64)
    far = torch.randn((n_pairs,) + input_shape, generator=g, dtype=torch.float64)
    near = x + 1e-3 * torch.randn((n_pairs,) + input_shape, generator=g, dtype=torch.float64)
    best, start = 0.0, None
    with torch.no_grad():
        for y in (far, near):
            r = (f(x) - f(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
            i = int(r.argmax())
            if r[i].item() > best:
                best, start = r[i].item(), (x[i:i + 1].clone(), y[i:i + 1].clone())
    a, b = (t.requires_grad_(True) for t in start)
    opt = torch.optim.Adam([a, b], lr=1e-2)
    for _ in range(ascent_steps):
        q = (f(a) - f(b)).norm() / (a - b).norm()
        best = max(best, q.item())
        opt.zero_grad()
        (-q).backward()
        opt.step()
    return best


# ----------------------------------------------------------------------------- linear layers


def test_linear_is_the_exact_spectral_norm():
    torch.manual_seed(0)
    lin = nn.Linear(13, 7).eval()
    r = lipschitz_bound(lin, (13,))
    s = spec(lin.weight)
    assert isinstance(r, LipschitzBound) and float(r) == r.bound
    assert s <= r.bound <= s * (1 + 1e-9)
    # the Jacobian of a linear map is the matrix: power iteration approaches its norm from below
    assert 0.95 * s <= r.estimate <= r.bound
    assert r.gap == pytest.approx(r.bound / r.estimate) and r.gap >= 1
    assert len(r.layers) == 1 and r.layers[0][2] == pytest.approx(r.bound, rel=1e-14)


def test_composition_multiplies_spectral_norms():
    torch.manual_seed(3)
    l1, l2 = nn.Linear(5, 8), nn.Linear(8, 3)
    seq = nn.Sequential(l1, nn.ReLU(), l2).eval()
    assert lipschitz_bound(seq, (5,)).bound == pytest.approx(spec(l1.weight) * spec(l2.weight), rel=1e-9)
    assert lipschitz_bound(seq, (5,)).bound >= spec(l1.weight) * spec(l2.weight)


def test_spectral_norm_parametrization_uses_the_effective_weight():
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(8)
    net = nn.Sequential(spectral_norm(nn.Linear(6, 9)), nn.ReLU(), spectral_norm(nn.Linear(9, 3))).eval()
    want = spec(net[0].weight) * spec(net[2].weight)  # weight: what forward uses (≈ 1 each)
    assert want <= lipschitz_bound(net, (6,)).bound <= want * (1 + 1e-9)


# ----------------------------------------------------------------------------- convolutions

# (c_in, c_out, kernel, stride, padding, dilation, groups, padding_mode)
CONV2D = [
    (3, 5, 3, 1, 1, 1, 1, "zeros"),
    (2, 4, 3, 1, 0, 1, 1, "zeros"),
    (4, 4, 3, 1, 2, 2, 2, "zeros"),
    (3, 6, 2, 1, 1, 1, 3, "zeros"),
    (4, 6, 3, 1, 0, 2, 1, "zeros"),
    (2, 3, (3, 5), 1, (1, 2), 1, 1, "zeros"),
    (2, 3, (3, 5), 1, "same", (2, 1), 1, "zeros"),
    (3, 5, 3, 2, 1, 1, 1, "zeros"),
    (2, 3, 5, 3, 2, 1, 1, "zeros"),
    (4, 2, 3, 2, 1, 2, 2, "zeros"),
    (3, 4, 3, 1, 1, 1, 1, "circular"),
    (3, 4, 3, 1, 1, 1, 1, "reflect"),
    (2, 3, 3, 1, 2, 1, 1, "replicate"),
]


@pytest.mark.parametrize("cfg", CONV2D, ids=[str(i) for i in range(len(CONV2D))])
def test_conv2d_bound_is_sound_and_tight(cfg):
    c_in, c_out, k, stride, pad, dil, groups, mode = cfg
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                     padding_mode=mode).eval()
    small, large = (c_in, 6, 7), (c_in, 12, 11)  # non-square on purpose
    exact = exact_norm(conv, small)
    fft = lipschitz_bound(conv, small, estimate=False).bound
    gram = lipschitz_bound(conv, small, estimate=False, conv_method="gram").bound
    dense = lipschitz_bound(conv, small, estimate=False, conv_method="dense").bound
    assert fft >= exact and gram >= exact and dense >= exact
    assert dense <= exact * (1 + 1e-7)  # the dense operator's SVD is exact up to rounding slack
    assert gram == pytest.approx(fft, rel=2e-3)
    if stride == 1 and mode in ("zeros", "circular"):
        # the periodic-grid bound is loose only by boundary effects. On 6x7 a dilated 3x3
        # kernel (5x5 effective) covers most of the input and the bound can reach ~1.5x, so
        # tightness is checked there only without dilation, and on 12x11 for every config.
        # Strided convolutions are bounded by their stride-1 parent (up to ~2x loose here);
        # reflect/replicate pay √(copies) of the padding (~1.9x here): soundness only.
        if dil == 1:
            assert fft <= 1.3 * exact, fft / exact
        exact_l = exact_norm(conv, large)
        fft_l = lipschitz_bound(conv, large, estimate=False).bound
        assert exact_l <= fft_l <= 1.3 * exact_l, fft_l / exact_l


# Kernels whose frequency response peaks between the points of too small a periodic grid:
# the difference kernel [1, −1] on n = 7 has norm 2cos(π/16) with padding 1, but its DFT on
# Z_7 peaks at 2cos(π/14) < that. Random kernels have flat responses and would not notice.
ADVERSARIAL = [
    ([1.0, -1.0], 1, 1, 7),
    ([1.0, -2.0, 1.0], 2, 1, 9),
    ([1.0, -1.0], 2, 2, 7),
    ([1.0, -1.0, 1.0, -1.0], "same", 1, 8),  # asymmetric: 1 left, 2 right; Z_9 is too small
    ([1.0, -1.0], "same", 1, 7),  # 0 left, 1 right: Z_7 is too small, Z_8 is not
    ([1.0, -1.0, 1.0], (0, 3), 1, 5),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kernel,pad,dil,n", ADVERSARIAL, ids=[str(i) for i in range(len(ADVERSARIAL))])
@pytest.mark.parametrize("method", ["fft", "gram"])
def test_conv_bound_on_adversarial_kernels(kernel, pad, dil, n, method):
    w = torch.tensor(kernel, dtype=torch.float64)
    if isinstance(pad, tuple):  # a 2-D kernel: outer product, padding per axis
        conv = nn.Conv2d(2, 1, len(kernel), padding=pad, dilation=dil, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.stack([torch.outer(w, w), -torch.outer(w, w)])[None])
        shape = (2, n, n + 2)
    else:
        conv = nn.Conv1d(1, 1, len(kernel), padding=pad, dilation=dil, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w.view(1, 1, -1))
        shape = (1, n)
    conv = conv.double().eval()
    exact = exact_norm(conv, shape)
    assert exact <= lipschitz_bound(conv, shape, estimate=False, conv_method=method).bound <= 1.3 * exact


@pytest.mark.parametrize("stride,pad,dil,groups", [(1, 1, 1, 1), (1, 0, 2, 1), (2, 0, 1, 1), (1, 3, 2, 2),
                                                   (3, 2, 1, 2)])
def test_conv1d_bound(stride, pad, dil, groups):
    torch.manual_seed(2)
    conv = nn.Conv1d(4, 6, 3, stride=stride, padding=pad, dilation=dil, groups=groups).eval()
    for n in (9, 40):
        exact = exact_norm(conv, (4, n))
        b = lipschitz_bound(conv, (4, n), estimate=False).bound
        assert b >= exact
        if stride == 1 and n == 40:
            assert b <= 1.3 * exact, b / exact
        assert lipschitz_bound(conv, (4, n), estimate=False, conv_method="dense").bound == pytest.approx(exact,
                                                                                                          rel=1e-7)


def test_conv3d_bound():
    torch.manual_seed(3)
    conv = nn.Conv3d(2, 3, (3, 2, 3), padding=1, dilation=(1, 2, 1)).eval()
    exact = exact_norm(conv, (2, 5, 4, 6))
    b = lipschitz_bound(conv, (2, 5, 4, 6), estimate=False).bound
    assert exact <= b <= 1.5 * exact


def test_functional_conv_and_linear_match_the_modules():
    torch.manual_seed(4)
    conv, lin = nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.Linear(3 * 5 * 5, 4)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.v = nn.Parameter(conv.weight.clone()), nn.Parameter(lin.weight.clone())

        def forward(self, x):
            h = F.relu(F.conv2d(x, self.w, None, 1, 2, 2))
            return F.linear(torch.flatten(h, 1), self.v)

    modular = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin).eval()
    a = lipschitz_bound(Functional().eval(), (2, 5, 5), estimate=False).bound
    b = lipschitz_bound(modular, (2, 5, 5), estimate=False).bound
    assert a == pytest.approx(b, rel=1e-12)


# ----------------------------------------------------------------------------- batch norm


def test_batchnorm_eval_is_the_exact_max_ratio():
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_var.copy_(torch.linspace(0.1, 4, 6))
        bn.weight.copy_(torch.linspace(-2, 1, 6))
    bn.eval()
    want = exact_norm(nn.Sequential(bn), (6,))  # a diagonal map: max |γ|/√(var + ε)
    r = lipschitz_bound(bn, (6,))
    assert want <= r.bound <= want * (1 + 1e-12)
    no_affine = nn.BatchNorm2d(3, affine=False).eval()
    with torch.no_grad():
        no_affine.running_var.copy_(torch.tensor([0.5, 2.0, 0.25]))
    assert lipschitz_bound(no_affine, (3, 4, 4)).bound == pytest.approx(1 / math.sqrt(0.25 + 1e-5), rel=1e-12)
    with pytest.raises(UnsupportedOpError, match="track_running_stats"):
        lipschitz_bound(nn.BatchNorm1d(6, track_running_stats=False).eval(), (6,))


def test_train_mode_is_an_error_naming_the_submodule():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())

        def forward(self, x):
            return self.features(x)

    net = Net().eval()
    net.features[1].train()
    with pytest.raises(ValueError, match=r"module 'features\.1' \(BatchNorm1d\) is in train mode; call \.eval\(\)"):
        lipschitz_bound(net, (4,))
    with pytest.raises(ValueError, match="the root"):
        lipschitz_bound(nn.BatchNorm1d(3), (3,))


# ----------------------------------------------------------------------------- networks


def small_cnn():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 5),
    )
    _randomise_bn(net)
    return net.eval().double()


def _randomise_bn(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_var.uniform_(0.3, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += identity  # torchvision style: traced out of place, no other reader
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, normalise=True):
        super().__init__()
        self.normalise = normalise
        self.register_buffer("mean", torch.tensor([0.4, 0.5]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.3]).view(1, 2, 1, 1))
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if self.normalise:
            x = (x - self.mean) / self.std
        x = F.relu(self.down(self.blocks(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet(normalise=True):
    torch.manual_seed(6)
    net = ResNet(normalise)
    _randomise_bn(net)
    return net.eval().double()


@pytest.mark.parametrize("make,shape", [(small_cnn, (1, 8, 8)), (resnet, (2, 8, 8))], ids=["cnn", "resnet"])
def test_network_bound_beats_every_observed_ratio(make, shape):
    net = make()
    r = lipschitz_bound(net, shape)
    assert 0 < r.estimate <= r.bound
    assert worst_ratio(net, shape) <= r.bound


def test_residual_and_normalisation_factors():
    with_norm, without = resnet(True), resnet(False)
    a = lipschitz_bound(with_norm, (2, 8, 8), estimate=False)
    b = lipschitz_bound(without, (2, 8, 8), estimate=False)
    # (x − mean)/std with constant buffers: factor max 1/|std| (≈ 5), in the encoder's input scale
    inv_std = 1 / with_norm.std.min().item()
    assert a.bound == pytest.approx(inv_std * b.bound, rel=1e-12)
    desc = {n: (d, f) for n, d, f in a.layers}
    assert desc["truediv"][1] == pytest.approx(inv_std, rel=1e-12)
    # each residual add: 1 + L(branch), recorded as L(out)/max(L(inputs))
    adds = [(d, f) for n, d, f in a.layers if n.startswith("add")]
    assert len(adds) == 2 and all(f > 1 for _, f in adds)


def test_estimate_at_given_points_and_report():
    net = small_cnn()
    g = torch.Generator().manual_seed(9)
    points = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    r = lipschitz_bound(net, (1, 8, 8), points=points, n_iter=20)
    assert lipschitz_bound(net, (1, 8, 8), points=points, n_iter=20) is not r  # not cached
    # the estimate is the largest ‖J v‖ found: at most the largest Jacobian norm at those points
    jac = [torch.autograd.functional.jacobian(lambda t: net(t[None])[0], p).reshape(5, -1) for p in points]
    top = max(torch.linalg.matrix_norm(J, 2).item() for J in jac)
    assert 0.99 * top <= r.estimate <= top * (1 + 1e-9)
    text = r.report()
    assert "Conv2d" in text and "bound" in text and "gap" in text
    gram = lipschitz_bound(net, (1, 8, 8), estimate=False, conv_method="gram").bound
    assert gram == pytest.approx(r.bound, rel=1e-3)


# ----------------------------------------------------------------------------- combination rules


def test_add_sub_cat_stack_rules():
    torch.manual_seed(7)

    class Combine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            u = x + self.a(x)
            v = torch.sub(x, self.b(x), alpha=3.0)
            return torch.cat([u, 2.0 * v, self.a(x) - 1.0], dim=1)

    m = Combine().eval()
    sa, sb = spec(m.a.weight), spec(m.b.weight)
    want = math.sqrt((1 + sa) ** 2 + (2 * (1 + 3 * sb)) ** 2 + sa ** 2)
    assert lipschitz_bound(m, (4,), estimate=False).bound == pytest.approx(want, rel=1e-12)

    class Stack(nn.Module):
        def forward(self, x):
            return torch.stack([x, x, x / 4], dim=1)

    assert lipschitz_bound(Stack().eval(), (3,), estimate=False).bound == pytest.approx(math.sqrt(2 + 1 / 16))


def test_copies_are_counted():
    class Index(nn.Module):
        def forward(self, x):
            return torch.cat([x[:, [0, 0, 2, 0]], x[:, 1:3]], dim=1)  # entry 0 three times, then 1, 2

    assert lipschitz_bound(Index().eval(), (4,)).bound == pytest.approx(math.hypot(math.sqrt(3), 1.0))

    class Broadcast(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1) + torch.zeros(1, 3, 1)  # each entry copied 3 times

    b = lipschitz_bound(Broadcast().eval(), (5,), estimate=False).bound
    assert b == pytest.approx(math.sqrt(3)) and b >= math.sqrt(3)

    class Expand(nn.Module):
        def forward(self, x):
            return x[:, :, None].expand(-1, -1, x.size(1)).flatten(1)

    assert lipschitz_bound(Expand().eval(), (4,), estimate=False).bound == pytest.approx(2.0)

    class Pad(nn.Module):
        def forward(self, x):
            return F.pad(x, (2, 2), mode="replicate")  # the edge entries appear 3 times

    assert lipschitz_bound(Pad().eval(), (1, 6), estimate=False).bound == pytest.approx(math.sqrt(3))


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("k,s,d,p", [(2, 2, 1, 0), (3, 1, 1, 1), (3, 2, 1, 1), (2, 1, 2, 1), (2, 2, 3, 0),
                                     (3, 2, 2, 1), (4, 3, 1, 2)])
def test_maxpool_overlap_count_and_ratio(k, s, d, p):
    pool = nn.MaxPool2d(k, stride=s, dilation=d, padding=p).eval()
    b = lipschitz_bound(pool, (1, 30, 30), estimate=False).bound
    # brute force: how many windows hold each entry (unfold an index image)
    idx = torch.arange(1, 901, dtype=torch.float64).reshape(1, 1, 30, 30)
    cols = F.unfold(F.pad(idx, (p, p, p, p)), k, dilation=d, stride=s)
    count = torch.bincount(cols.reshape(-1).long(), minlength=901)[1:].max().item()
    assert b == pytest.approx(math.sqrt(count), rel=1e-12) and b >= math.sqrt(count)
    small = nn.MaxPool2d(k, stride=s, dilation=d, padding=p).eval()
    assert worst_ratio(small, (1, 7, 7), ascent_steps=50) <= lipschitz_bound(small, (1, 7, 7)).bound


@pytest.mark.parametrize("pool,shape", [
    (nn.AvgPool2d(2), (2, 6, 6)),
    (nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True), (1, 7, 6)),
    (nn.AvgPool1d(4, stride=2), (2, 11)),
    (nn.AvgPool2d(2, divisor_override=1), (1, 6, 4)),  # sum pooling: row sums 4, column sums 1
    (nn.AvgPool2d(3, stride=2, padding=1, divisor_override=2), (1, 7, 5)),
    (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)),
    (nn.AdaptiveAvgPool2d(1), (3, 4, 5)),
    (nn.Upsample(scale_factor=2, mode="bilinear"), (1, 3, 4)),
    (nn.Upsample(scale_factor=3, mode="nearest"), (1, 3, 4)),
])
def test_average_pooling_and_interpolation_against_their_exact_norm(pool, shape):
    exact = exact_norm(pool, shape)
    b = lipschitz_bound(pool.eval(), shape, estimate=False).bound
    assert exact <= b <= 1.5 * exact, b / exact


def test_global_mean_is_exact():
    class Gap(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    assert lipschitz_bound(Gap().eval(), (3, 4, 5), estimate=False).bound == pytest.approx(1 / math.sqrt(20))


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.SiLU(), nn.Mish(),
                                 nn.Tanh(), nn.ELU(0.5), nn.ELU(2.0), nn.SELU(), nn.Softplus(beta=3.0),
                                 nn.Hardswish(), nn.Hardsigmoid(), nn.LeakyReLU(0.2), nn.LeakyReLU(-1.5),
                                 nn.CELU(0.7), nn.ReLU6(), nn.LogSigmoid()], ids=lambda a: repr(a))
def test_activation_constants_dominate_the_derivative(act):
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    top = g.abs().max().item()
    bound = lipschitz_bound(act.eval(), (1,), estimate=False).bound
    # 1e-7: PyTorch's backward of hardsigmoid and celu uses float32 constants (their float64
    # forwards are exact); the constants themselves are rounded up by 1e-4 or more
    assert top <= bound * (1 + 1e-7)
    assert bound <= 1.01 * top  # and not loose


def test_functional_activations():
    class Acts(nn.Module):
        def forward(self, x):
            return torch.sigmoid(F.gelu(x.relu()).tanh())

    assert lipschitz_bound(Acts().eval(), (3,), estimate=False).bound == pytest.approx(0.25 * 1.13)


# ----------------------------------------------------------------------------- errors


def test_unsupported_ops_are_named():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    class Sort(nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=1).values

    class DivByInput(nn.Module):
        def forward(self, x):
            return 1.0 / x

    class RandomDropout(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5)

    class BatchMean(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=0)

    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(dim=1).float()

    cases = [
        (Square(), "'mul'.*product of two input-dependent"),
        (Sort(), "'sort'.*function sort"),
        (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), "'1'.*module Softmax"),
        (nn.Sequential(nn.LayerNorm(3)), "module LayerNorm"),
        (DivByInput(), "division by an input-dependent"),
        (RandomDropout(), "training=True"),
        (BatchMean(), "batch dimension"),
        (Argmax(), "argmax"),
    ]
    for mod, pattern in cases:
        with pytest.raises(UnsupportedOpError, match=pattern) as info:
            lipschitz_bound(mod.eval(), (3,))
        assert NO_RULE in str(info.value)
        assert isinstance(info.value, ValueError)


def test_inplace_updates_seen_by_other_nodes_are_refused():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            z = y.view(-1, 3)
            y.mul_(3.0)  # z sees it
            return z

    class Stale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            z = y
            y += y  # traced as an out-of-place add, but the module doubles z too
            return z

    with pytest.raises(UnsupportedOpError, match="in-place"):
        lipschitz_bound(Aliased().eval(), (3,))
    with pytest.raises(UnsupportedOpError, match="different function"):
        lipschitz_bound(Stale().eval(), (3,))


def test_wrapping_a_part_with_a_known_constant():
    class Normalised(nn.Module):
        lipschitz_constant = 2.0  # the caller vouches for it

        def forward(self, x):
            return 2.0 * F.normalize(x, dim=1)

    net = nn.Sequential(nn.Linear(4, 4), Normalised()).eval()
    assert lipschitz_bound(net, (4,), estimate=False).bound == pytest.approx(2 * spec(net[0].weight))


def test_argument_validation():
    lin = nn.Linear(3, 3).eval()
    with pytest.raises(ValueError, match="conv_method"):
        lipschitz_bound(lin, (3,), conv_method="svd")
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_bound(lin, (0,))
    with pytest.raises(ValueError, match="failed on an input of shape"):
        lipschitz_bound(lin, (4,))


# ----------------------------------------------------------------------------- cache


def test_cache_and_invalidation():
    clear_cache()
    lin = nn.Linear(4, 4).eval()
    a = lipschitz_bound(lin, (4,))
    assert lipschitz_bound(lin, (4,)) is a
    assert lipschitz_bound(lin, (4,), cache=False) is not a
    assert lipschitz_bound(lin, (4,), conv_method="gram") is not a  # another key
    with torch.no_grad():
        lin.weight.mul_(2)
    b = lipschitz_bound(lin, (4,))
    assert b is not a and b.bound == pytest.approx(2 * a.bound, rel=1e-12)
    lin.weight = nn.Parameter(lin.weight.detach() / 2)  # a replaced parameter
    c = lipschitz_bound(lin, (4,))
    assert c is not b and c.bound == pytest.approx(a.bound, rel=1e-12)

    act = nn.Sequential(nn.LeakyReLU(0.1)).eval()
    assert lipschitz_bound(act, (2,)).bound == pytest.approx(1.0, rel=1e-12)
    act[0].negative_slope = 3.0  # a scalar attribute
    assert lipschitz_bound(act, (2,)).bound == pytest.approx(3.0, rel=1e-12)
