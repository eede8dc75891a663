"""Multi-prototype heads: EM fit, the sound best-component radius, attacks."""

import math

import numpy as np
import pytest
import torch

from gmfast import GaussianMixtureHead as Head
from gmfast.multiproto import MultiPrototypeHead, compare_prototypes


def two_modes(n, seed):
    """Three classes, each two well-separated isotropic clusters, in 2-D."""
    rng = np.random.default_rng(seed)
    centers = np.array([[[0, 0], [6, 6]], [[6, 0], [0, 6]], [[3, 12], [12, 3]]], dtype=float)
    y = rng.integers(0, 3, n)
    m = rng.integers(0, 2, n)
    return centers[y, m] + rng.normal(size=(n, 2)), y


def test_two_components_fit_better_and_classify_better():
    Z, y = two_modes(3000, 0)
    Zt, yt = two_modes(3000, 1)
    rows = compare_prototypes(Z, y, Zt, yt, Ms=(1, 2), radii=(0.0, 0.5))
    one, two = rows
    assert two["loglik"] > one["loglik"] + 0.5  # a much closer fit
    assert two["accuracy"][0] > 0.97 > one["accuracy"][0]  # one Gaussian per class cannot separate
    head = MultiPrototypeHead(2).fit(Z, y)
    assert head.n_iter_ < 200 and torch.allclose(head.weights_.sum(1), torch.ones(3, dtype=torch.float64))


def test_one_component_is_the_tied_head():
    Z, y = two_modes(800, 2)
    mp = MultiPrototypeHead(1).fit(Z, y)
    tied = Head("tied").fit(Z, y)
    a, b = mp.certify(torch.tensor(Z)), tied.certify(torch.tensor(Z))
    assert torch.equal(a.prediction, b.prediction)
    np.testing.assert_allclose(a.radius.numpy(), b.radius.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", [2, math.inf])
def test_radius_is_never_beaten(norm):
    Z, y = two_modes(2000, 3)
    head = MultiPrototypeHead(2).fit(Z, y)
    Zt, _ = two_modes(150, 4)
    X = torch.tensor(Zt)
    cert = head.certify(X, norm=norm)
    rng = np.random.default_rng(0)
    comp = head._components.classifier_params
    for i in range(X.shape[0]):
        R, c = cert.radius[i].item(), cert.prediction[i].item()
        if R == 0:
            continue
        dirs = rng.normal(size=(150, 2))
        # the worst direction toward every facet of the certified polyhedron
        star = int(head._components.predict(X[i:i + 1]).item())
        da = comp.A[star] - comp.A
        extra = -np.sign(da.numpy()) if norm == math.inf else -da.numpy()
        dirs = np.concatenate([dirs, extra[np.abs(extra).sum(1) > 0]])
        if norm == 2:
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        else:
            dirs /= np.abs(dirs).max(1, keepdims=True)
        inside = torch.tensor(Zt[i] + 0.9999 * R * dirs)
        assert (head.predict(inside) == c).all(), f"row {i}: flipped inside the certified radius"
        # the radius is a lower bound on the true distance: along every direction the first
        # crossing of the decision boundary (fine line search) is at least R
        ts = np.linspace(0, 3 * R, 121)[1:]
        pts = torch.tensor(Zt[i][None, None, :] + ts[None, :, None] * dirs[:, None, :]).reshape(-1, 2)
        flips = (head.predict(pts) != c).reshape(len(dirs), len(ts)).numpy()
        first = np.where(flips.any(1), ts[flips.argmax(1)], np.inf)
        assert first.min() >= R * (1 - 1e-9)


def test_errors():
    with pytest.raises(ValueError, match="n_components"):
        MultiPrototypeHead(0)
    with pytest.raises(ValueError, match="at least n_components"):
        MultiPrototypeHead(4).fit(np.random.default_rng(0).normal(size=(9, 2)), np.array([0, 0, 0, 1, 1, 1, 1, 1, 1]))
