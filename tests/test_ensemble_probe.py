"""benchmarks/ensemble_probe.py: the logit-sum ensemble of prototype models is a tied head on a
1-Lipschitz encoder (same predictions as summing the members' logits; sound bound; attacked)."""

import pytest
import torch
from helpers import benchmark_module

import gmfast
from gmfast.head import GaussianMixtureHead
from gmfast.train.attack import pgd_flips
from gmfast.train.layers import CayleyLinear, build_encoder, mlp_architecture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _probe():
    return benchmark_module("ensemble_probe")


def _member(seed, K=3, d=8):
    torch.manual_seed(seed)
    enc = build_encoder(mlp_architecture(64, [32], d, "cayley_linear")).eval()
    with torch.no_grad():
        for m in enc:
            if isinstance(m, CayleyLinear):
                m.skew.normal_(0.0, 0.2)
    means = torch.randn(K, d, dtype=torch.float64)
    head = GaussianMixtureHead.from_params(means, torch.eye(d, dtype=torch.float64),
                                           torch.full((K,), 1.0 / K, dtype=torch.float64))
    return enc, head


def test_ensemble_is_the_logit_sum_and_its_certificate_holds():
    probe = _probe()
    members = [_member(0), _member(1), _member(2)]
    enc, head = probe.ensemble(members)
    x = torch.rand(300, 1, 8, 8)
    with torch.no_grad():  # independent reference: the members' tied logits, summed in float64
        ref = sum(e(x).double() @ h.means_.T - 0.5 * (h.means_ ** 2).sum(1) for e, h in members)
    certifier = gmfast.Certifier(enc, head, method="lipschitz")
    cert = certifier.certify(x)
    assert torch.equal(cert.prediction, ref.argmax(1))
    b = certifier.lipschitz_bound((1, 8, 8), points=x[:8])
    assert b.estimate <= b.bound <= 1 + 1e-5  # the concatenation / sqrt(S) is bounded in quadrature
    assert (cert.radius > 0).sum() > 100
    assert int(pgd_flips(enc, head, x, cert.prediction, cert.radius, steps=20, restarts=2).sum()) == 0


def test_ensemble_refuses_heads_that_are_not_prototype_heads():
    probe = _probe()
    enc, head = _member(0)
    skewed = GaussianMixtureHead.from_params(head.means_, torch.eye(8, dtype=torch.float64),
                                             torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="equal priors"):
        probe.ensemble([(enc, head), (enc, skewed)])
    scaled = GaussianMixtureHead.from_params(head.means_, 2 * torch.eye(8, dtype=torch.float64), head.priors_)
    with pytest.raises(ValueError, match="covariance I"):
        probe.ensemble([(enc, head), (enc, scaled)])
