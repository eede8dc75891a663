"""The head's public accessors for code outside it: ``statistics`` (what distributed fitting
merges across ranks) and ``prepared(Z)`` (what a fused kernel runs on), against float64
references computed here."""

import numpy as np
import pytest
import torch

from gmfast import GaussianMixtureHead
from gmfast.head import NotFittedError


def data(n=300, d=5, K=3, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, K, n)
    Z = g.normal(size=(n, d)) + 3.0 * np.eye(K, d)[y]
    return Z, y


def test_statistics_are_the_accumulated_counts_and_means():
    Z, y = data()
    head = GaussianMixtureHead("tied", shrinkage=0.0)
    assert head.statistics is None
    head.partial_fit(torch.as_tensor(Z[:120]), torch.as_tensor(y[:120]))
    head.partial_fit(torch.as_tensor(Z[120:]), torch.as_tensor(y[120:]))
    s = head.statistics
    np.testing.assert_array_equal(s.count.numpy(), np.bincount(y, minlength=3))
    ref = np.stack([Z[y == k].mean(0) for k in range(3)])
    np.testing.assert_allclose(s.mean.numpy(), ref, rtol=1e-12, atol=1e-12)
    head.finalize()
    np.testing.assert_allclose(head.means_.numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_gives_the_classifier_the_head_predicts_with(dtype):
    Z, y = data()
    head = GaussianMixtureHead("tied", shrinkage=0.0).fit(torch.as_tensor(Z), torch.as_tensor(y))
    Zq = torch.as_tensor(Z, dtype=dtype)
    Zt, work, in_dtype = head.prepared(Zq)
    assert in_dtype == dtype and Zt.dtype == dtype and Zt.shape == Zq.shape
    # independent float64 reference: the tied LDA discriminant from the fitted parameters
    mu, S, pri = (t.double().numpy() for t in (head.means_, head.covariance_, head.priors_))
    A = np.linalg.solve(S, mu.T).T
    beta = -0.5 * np.einsum("kd,kd->k", A, mu) + np.log(pri)
    np.testing.assert_allclose(work.A.double().numpy(), A, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(work.beta.double().numpy(), beta, rtol=1e-5, atol=1e-5)
    logits = Zt.double() @ work.A.double().T + work.beta.double()
    assert torch.equal(logits.argmax(1), head.predict(Zq))
    with pytest.raises(ValueError, match=r"has 3 features per row, but the head was fitted with 5"):
        head.prepared(torch.zeros(4, 3, dtype=dtype))
    with pytest.raises(NotFittedError):
        GaussianMixtureHead("tied").prepared(Zq)
