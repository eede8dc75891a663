"""benchmarks/multiproto_probe.py: the trained nearest-prototype classifier is certified by the
library's multi-prototype head (same predictions as the nearest prototype, radii that hold
against sampling in float64 and the probe's attack), the training margins are the recipe's
for one prototype per class, and the command line runs end to end."""

import json

import pytest
import torch
from helpers import benchmark_module

from gmfast.train.loss import normalised_margins

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _probe():
    return benchmark_module("multiproto_probe")


def test_head_predicts_the_nearest_prototype_and_its_radius_holds():
    probe = _probe()
    g = torch.Generator().manual_seed(0)
    K, M, d = 4, 3, 5
    protos = torch.randn(K * M, d, generator=g, dtype=torch.float64)
    owner = torch.arange(K).repeat_interleave(M)
    head = probe.as_head(protos, owner)
    z = 1.5 * torch.randn(400, d, generator=g, dtype=torch.float64)
    cert = head.certify(z)
    nearest = owner[torch.cdist(z, protos).argmin(1)]
    assert torch.equal(cert.prediction, nearest)
    # independent check in float64: points inside the ball keep the nearest prototype's class
    for i in range(0, 400, 8):
        r = float(cert.radius[i])
        if r <= 0:
            continue
        u = torch.randn(2000, d, generator=g, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True) * r * torch.rand(2000, 1, generator=g, dtype=torch.float64) ** (1 / d)
        pts = z[i] + 0.999999 * u
        assert torch.all(owner[torch.cdist(pts, protos).argmin(1)] == nearest[i])


def test_one_prototype_per_class_has_the_recipes_margins():
    probe = _probe()
    g = torch.Generator().manual_seed(1)
    K, d = 5, 6
    protos = torch.randn(K, d, generator=g)
    z, y = torch.randn(50, d, generator=g), torch.randint(0, K, (50,), generator=g)
    r, pstar = probe.margins(z, protos, torch.arange(K), y)
    ref = normalised_margins(z, y, protos, -0.5 * (protos ** 2).sum(1))  # the tied head, equal priors
    assert torch.equal(pstar, y)
    assert torch.allclose(r, ref, rtol=1e-4, atol=1e-5)


def test_command_line_end_to_end(tmp_path):
    probe = _probe()
    from gmfast.train.layers import mlp_architecture

    over = dict(architecture=mlp_architecture(784, [16], 8, "cayley_linear"), latent=8, epochs=1)  # shifts on
    out = tmp_path / "probe.json"
    assert probe.main(["--per-class", "2", "--overrides", json.dumps(over), "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["per_class"] == 2 and rec["validation"]["pgd_flips"] == 0 and rec["lipschitz_bound"] < 1.0001
    for split in ("validation", "fit"):
        ca = rec[split]["certified_accuracy"]
        assert all(a >= b for a, b in zip(ca, ca[1:])) and ca[0] > 0.3  # one epoch is far above chance


def test_command_line_refuses_options_it_does_not_train_with(tmp_path):
    probe = _probe()
    with pytest.raises(ValueError, match=r"the recipe has loss 'margin' and \{'noise': 0.25\}"):
        probe.main(["--per-class", "2", "--overrides", '{"noise": 0.25}', "--out", str(tmp_path / "x.json")])
