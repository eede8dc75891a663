"""Sound Lipschitz bounds: against exact operator norms, attacks on the ratio, and rules."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gmfast
from gmfast.lipschitz import LipschitzBound, UnsupportedOpError, lipschitz_bound


def exact_linear_norm(module, input_shape):
    """‖A‖₂ of a *linear* module by its dense Jacobian (float64) and an SVD."""
    module = module.double().eval()
    x = torch.zeros((1,) + tuple(input_shape), dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: module(t).reshape(-1), x).reshape(-1, x.numel())
    return torch.linalg.matrix_norm(J, 2).item()


def test_linear_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(13, 7).eval()
    r = lipschitz_bound(lin, (13,))
    s = torch.linalg.matrix_norm(lin.weight.double(), 2).item()
    assert isinstance(r, LipschitzBound) and float(r) == r.bound
    assert s <= r.bound <= s * (1 + 1e-9)
    assert r.estimate == pytest.approx(s, rel=1e-5)  # a linear map: the Jacobian is the matrix


CONVS = [
    dict(cin=3, cout=5, k=3, stride=1, pad=1, dil=1, groups=1, shape=(3, 6, 7)),
    dict(cin=2, cout=4, k=3, stride=1, pad=0, dil=1, groups=1, shape=(2, 7, 5)),
    dict(cin=4, cout=4, k=3, stride=1, pad=2, dil=2, groups=2, shape=(4, 6, 6)),
    dict(cin=3, cout=6, k=2, stride=1, pad=1, dil=1, groups=3, shape=(3, 5, 8)),
    dict(cin=3, cout=5, k=3, stride=2, pad=1, dil=1, groups=1, shape=(3, 7, 7)),
    dict(cin=2, cout=3, k=5, stride=3, pad=2, dil=1, groups=1, shape=(2, 9, 6)),
]


@pytest.mark.parametrize("cfg", CONVS, ids=[str(i) for i in range(len(CONVS))])
def test_conv2d_bound_is_sound_and_tight(cfg):
    torch.manual_seed(1)
    conv = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["pad"],
                     dilation=cfg["dil"], groups=cfg["groups"], bias=True).eval()
    exact = exact_linear_norm(conv, cfg["shape"])
    auto = lipschitz_bound(conv, cfg["shape"], estimate=False).bound  # small: the dense SVD
    assert exact * (1 - 1e-12) <= auto <= exact * (1 + 1e-9)
    fft = lipschitz_bound(conv, cfg["shape"], estimate=False, conv_method="fft").bound
    assert fft >= exact * (1 - 1e-12)
    # the periodic-grid bound is loose only by boundary effects: tight on a larger input
    big = (cfg["shape"][0], 16, 16)
    if cfg["stride"] == 1:  # strided convolutions subsample: the stride-1 bound can be loose
        fft_big = lipschitz_bound(conv, big, estimate=False, conv_method="fft").bound
        exact_big = exact_linear_norm(conv, big)
        assert exact_big * (1 - 1e-12) <= fft_big <= 1.3 * exact_big, (fft_big, exact_big)


def test_conv1d_bound():
    torch.manual_seed(2)
    for stride, pad, dil in ((1, 1, 1), (2, 0, 1), (1, 3, 2)):
        conv = nn.Conv1d(3, 4, 3, stride=stride, padding=pad, dilation=dil).eval()
        exact = exact_linear_norm(conv, (3, 40))
        b = lipschitz_bound(conv, (3, 40), estimate=False, conv_method="fft").bound
        assert b >= exact * (1 - 1e-12)
        if stride == 1:
            assert b <= 1.3 * exact
        assert lipschitz_bound(conv, (3, 40), estimate=False).bound == pytest.approx(exact, rel=1e-9)


def test_batchnorm_eval_and_train_mode_error():
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_var.copy_(torch.linspace(0.1, 4, 6))
        bn.weight.copy_(torch.linspace(-2, 1, 6))
    with pytest.raises(ValueError, match="train mode"):
        lipschitz_bound(bn, (6,))
    bn.eval()
    want = (bn.weight.double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)).max().item()
    assert lipschitz_bound(bn, (6,)).bound == pytest.approx(want, rel=1e-12)
    assert lipschitz_bound(bn, (6,)).bound >= want


def test_composition_add_cat_pooling():
    torch.manual_seed(3)
    l1, l2 = nn.Linear(5, 8), nn.Linear(8, 3)
    seq = nn.Sequential(l1, nn.ReLU(), l2).eval()
    s1, s2 = (torch.linalg.matrix_norm(w.weight.double(), 2).item() for w in (l1, l2))
    assert lipschitz_bound(seq, (5,)).bound == pytest.approx(s1 * s2, rel=1e-9)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.cat([x + self.a(x), self.b(x) * 2.0], dim=1)

    res = Res().eval()
    sa, sb = (torch.linalg.matrix_norm(w.weight.double(), 2).item() for w in (res.a, res.b))
    assert lipschitz_bound(res, (4,)).bound == pytest.approx(math.hypot(1 + sa, 2 * sb), rel=1e-9)
    # average pooling is linear: compare with its exact norm
    for pool, shape in ((nn.AvgPool2d(2), (2, 6, 6)), (nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 5)),
                        (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7))):
        b = lipschitz_bound(pool.eval(), shape, estimate=False).bound
        assert b >= exact_linear_norm(pool, shape) * (1 - 1e-12)
    # max pooling: the bound beats every observed ratio
    mp = nn.MaxPool2d(3, stride=2).eval()
    b = lipschitz_bound(mp, (1, 7, 7), estimate=False).bound
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 1, 7, 7, generator=g), torch.randn(500, 1, 7, 7, generator=g)
    ratio = (mp(x) - mp(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= b


def resnet(normalise=True):
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.4, 0.5]).view(1, 2, 1, 1))
            self.register_buffer("std", torch.tensor([0.2, 0.3]).view(1, 2, 1, 1))
            self.stem = nn.Conv2d(2, 6, 3, padding=1)
            self.blocks = nn.Sequential(Block(6), Block(6))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            if normalise:
                x = (x - self.mean) / self.std
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(self.pool(x), 1))

    torch.manual_seed(4)
    net = Net()
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def test_resnet_bound_beats_every_observed_ratio():
    net = resnet().double()
    r = lipschitz_bound(net, (2, 8, 8))
    assert r.estimate <= r.bound
    g = torch.Generator().manual_seed(5)
    x = torch.rand(400, 2, 8, 8, generator=g, dtype=torch.float64)
    y = x + 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    ratio = (net(x) - net(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= r.bound
    # gradient ascent on the ratio from the worst pair
    i = int(ratio.argmax())
    a, b = x[i:i + 1].clone().requires_grad_(True), y[i:i + 1].clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=1e-3)
    best = 0.0
    for _ in range(200):
        q = (net(a) - net(b)).norm() / (a - b).norm()
        best = max(best, q.item())
        opt.zero_grad()
        (-q).backward()
        opt.step()
    assert best <= r.bound
    # the normalisation inside the encoder is part of the bound (1/std ≥ 3.3 here)
    assert r.bound > lipschitz_bound(resnet(normalise=False).double(), (2, 8, 8), estimate=False).bound * 3


def test_certifier_on_resnet_radius_is_latent_over_bound():
    net = resnet().double()
    enc = nn.Sequential(net).eval()  # the ResNet's 4 outputs serve as latents
    g = torch.Generator().manual_seed(6)
    X = torch.rand(300, 2, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        Z = enc(X)
    z0 = Z[:, 0].contiguous()
    y = torch.bucketize(z0, z0.quantile(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)))
    head = gmfast.GaussianMixtureHead("tied", shrinkage=0.2).fit(Z, y)
    cert = gmfast.Certifier(enc, head).certify(X)
    L = lipschitz_bound(enc, (2, 8, 8)).bound
    np.testing.assert_allclose(cert.radius.numpy(), cert.extra["latent_radius"].numpy() / L, rtol=1e-12)
    assert cert.extra["lipschitz"] == L


@pytest.mark.parametrize("act,const", [(F.gelu, 1.13), (torch.sigmoid, 0.25), (F.silu, 1.1), (torch.tanh, 1.0)])
def test_activation_constants_dominate_the_derivative(act, const):
    x = torch.linspace(-20, 20, 400_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x)
    assert g.abs().max().item() <= const


def test_unsupported_ops_are_named():
    class Sq(nn.Module):
        def forward(self, x):
            return x * x

    class Soft(nn.Module):
        def forward(self, x):
            return torch.softmax(x, 1)

    with pytest.raises(UnsupportedOpError, match="product of two input-dependent"):
        lipschitz_bound(Sq().eval(), (3,))
    with pytest.raises(UnsupportedOpError, match="softmax"):
        lipschitz_bound(Soft().eval(), (3,))
    with pytest.raises(UnsupportedOpError, match="LayerNorm"):
        lipschitz_bound(nn.Sequential(nn.LayerNorm(3)).eval(), (3,))
    with pytest.raises(UnsupportedOpError, match="padding_mode"):
        lipschitz_bound(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular").eval(), (1, 5, 5))


def test_cache_and_invalidation():
    lin = nn.Linear(4, 4).eval()
    a = lipschitz_bound(lin, (4,))
    assert lipschitz_bound(lin, (4,)) is a
    with torch.no_grad():
        lin.weight.mul_(2)
    b = lipschitz_bound(lin, (4,))
    assert b is not a and b.bound == pytest.approx(2 * a.bound, rel=1e-12)
