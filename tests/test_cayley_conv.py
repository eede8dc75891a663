"""Orthogonal circular convolutions (``gmfast.train.CayleyConv2d`` on the
``PeriodicConv2d`` rule): the forward against a direct circular convolution of the layer's
own kernel (no FFT), orthogonality of the whole operator (its dense matrix in float64), the
sound bound against that matrix's SVD (float32 layers: the bound is the norm of the kernel
the forward uses, not 1), the rule's refusals, the architecture JSON, and certificates of an
encoder built from them (global route, local route refused with its reason, PGD)."""

import pytest
import torch
from torch import nn

import gmfast
from gmfast.lipschitz import UnsupportedOpError, lipschitz_bound
from gmfast.lipschitz.lipnet_rules import PeriodicConv2d
from gmfast.train import CayleyConv2d, MaxMin, build_encoder
from gmfast.train.attack import pgd_flips
from gmfast.train.layers import check_architecture, conv_architecture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = [(3, 3, 5, 3), (1, 4, 6, 3), (4, 2, 7, 3), (2, 2, 8, 1), (2, 5, 4, 3)]  # (in, out, size, k)


def _direct(K, x):
    """``y[:, o, p] = Σ_i Σ_m K[o, i, m] x[:, i, p − m]`` (indices mod n), by shifts: no FFT."""
    n = x.shape[-1]
    y = torch.zeros(x.shape[0], K.shape[0], n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            y += torch.einsum("oi,bipq->bopq", K[:, :, a, b].double(), torch.roll(x.double(), (a, b), (2, 3)))
    return y


def _dense(K):
    """The operator's matrix (float64) from its kernel, by the direct convolution."""
    c_in, n = K.shape[1], K.shape[-1]
    N = c_in * n * n
    return _direct(K, torch.eye(N, dtype=torch.float64).reshape(N, c_in, n, n)).reshape(N, -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_the_circular_convolution_and_orthogonal(shape):
    c_in, c_out, n, k = shape
    torch.manual_seed(0)
    m = CayleyConv2d(c_in, c_out, n, k).double().eval()
    with torch.no_grad():
        m.bias.normal_()
        x = torch.randn(3, c_in, n, n, dtype=torch.float64)
        K = m.kernel()
        assert K.shape == (c_out, c_in, n, n)
        torch.testing.assert_close(m(x), _direct(K, x) + m.bias[:, None, None], rtol=0, atol=1e-12)
    # every singular value 1: the kernel's rows (out <= in) or columns (out > in) are orthonormal
    sv = torch.linalg.svdvals(_dense(K))
    assert sv.shape[0] == min(c_in, c_out) * n * n
    torch.testing.assert_close(sv, torch.ones_like(sv), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_bound_is_the_norm_of_the_kernel_the_forward_uses(shape):
    c_in, c_out, n, k = shape
    torch.manual_seed(1)
    m = CayleyConv2d(c_in, c_out, n, k).eval()  # float32: K is orthogonal only to ~1e-7
    exact = torch.linalg.svdvals(_dense(m.kernel().detach())).max().item()
    b = lipschitz_bound(m, (c_in, n, n), estimate=False)
    assert exact <= float(b) <= exact * (1 + 1e-9) + 1e-12
    assert abs(float(b) - 1) < 1e-5
    # the rule reads the kernel itself: scaling it scales the bound
    scaled = _Scaled(m, 0.5)
    assert float(lipschitz_bound(scaled, (c_in, n, n), estimate=False)) == pytest.approx(0.5 * exact, rel=1e-9)


class _Scaled(PeriodicConv2d):
    def __init__(self, inner, s):
        super().__init__(inner.in_channels, inner.out_channels, inner.size, bias=False)
        self.inner, self.s = inner, s

    def kernel(self):
        return self.s * self.inner.kernel()


def test_rule_refusals_and_argument_errors():
    class Override(CayleyConv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(UnsupportedOpError, match="overrides PeriodicConv2d.forward"):
        lipschitz_bound(Override(2, 2, 4).eval(), (2, 4, 4), estimate=False)

    class WrongShape(CayleyConv2d):
        def kernel(self):
            return super().kernel()[:, :, :2, :2]

    with pytest.raises(ValueError, match=r"kernel\(\) has shape \(2, 2, 2, 2\); expected \(2, 2, 4, 4\)"):
        WrongShape(2, 2, 4)(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"WrongShape failed on an input of shape \(1, 2, 4, 4\)"):
        lipschitz_bound(WrongShape(2, 2, 4).eval(), (2, 4, 4), estimate=False)
    with pytest.raises(ValueError, match=r"expects \(N, 2, 4, 4\); got shape \(1, 2, 5, 5\)"):
        CayleyConv2d(2, 2, 4)(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="kernel_size must be an int in \\[1, size=4\\]; got 5"):
        CayleyConv2d(2, 2, 4, 5)
    with pytest.raises(ValueError, match="size must be a positive int; got 0"):
        CayleyConv2d(2, 2, 0)
    with pytest.raises(ValueError, match="conv must be 'aol_conv2d' or 'cayley_conv2d'"):
        conv_architecture(1, 8, [4], 8, 16, conv="sll")
    with pytest.raises(ValueError, match=r"cayley_conv2d\): expected fields \['in', 'k', 'out', 'size'\]"):
        check_architecture([{"type": "cayley_conv2d", "in": 1, "out": 2, "k": 3}])


def _encoder(seed=0):
    torch.manual_seed(seed)
    spec = conv_architecture(1, 8, [4], 8, 32, reduce=4, conv="cayley_conv2d", linear="cayley_linear")
    assert spec[0] == {"type": "cayley_conv2d", "in": 1, "out": 4, "k": 3, "size": 8}
    return build_encoder(spec).eval(), spec


def test_encoder_bound_round_trip_and_certificates(tmp_path):
    from gmfast.train import load, save, recipe
    from gmfast.train.data import load_split

    enc, spec = _encoder()
    b = lipschitz_bound(enc, (1, 8, 8))
    # orthogonal convs, isometric unshuffle, MaxMin, orthonormal linear rows: the product of
    # the layers' exact norms, each 1 up to float32 rounding
    assert 1 - 1e-5 < float(b) < 1 + 1e-5 and b.estimate <= float(b) * (1 + 1e-6)
    assert any("CayleyConv2d(1->4, 8x8) circular convolution" in str(line) for line in b.layers)
    Xtr, ytr, Xte, _ = load_split("digits")
    head = gmfast.fit_head(enc, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=256),
                           covariance_type="tied", shrinkage=1.0, progress=False)
    r = recipe("digits", architecture=spec, latent=8)
    save(tmp_path, enc, head, r)
    enc2, head2 = load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(enc2(Xte[:16]), enc(Xte[:16]), rtol=0, atol=0)
    cert = gmfast.Certifier(enc, head).certify(Xte)  # auto: global and margin routes
    # the local route has no relaxation of the leaf: auto says so and keeps the others
    assert "module CayleyConv2d): no linear relaxation" in cert.extra["skipped"]["local"]
    assert set(cert.extra["routes"]) == {"lipschitz", "margin"}
    glob = gmfast.Certifier(enc, head, method="lipschitz").certify(Xte)
    assert bool((cert.radius >= glob.radius).all()) and torch.equal(cert.prediction, glob.prediction)
    assert int((cert.radius > 0).sum()) > 100
    assert int(pgd_flips(enc, head, Xte, cert.prediction, cert.radius, steps=20, restarts=2).sum()) == 0
    with pytest.raises(UnsupportedOpError):
        gmfast.Certifier(enc, head, method="local").certify(Xte[:2])


def test_maxmin_between_cayley_convs_keeps_the_bound_multiplicative():
    """Two leaves and MaxMin in a Sequential: the bound is the product of the convs' factors."""
    torch.manual_seed(3)
    enc = nn.Sequential(CayleyConv2d(2, 2, 6), MaxMin(), CayleyConv2d(2, 2, 6)).eval()
    b = lipschitz_bound(enc, (2, 6, 6), estimate=False)
    parts = [float(lipschitz_bound(m, (2, 6, 6), estimate=False)) for m in (enc[0], enc[2])]
    # (each part alone carries its own output rounding, so the product is a hair above)
    assert float(b) == pytest.approx(parts[0] * parts[1], rel=1e-12)
