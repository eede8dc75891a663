"""The smoothing-counts contract (gmfast.ops.smoothing): every backend against an independent
numpy histogram of the tied head's argmax, and the dispatch rules."""

import os

import numpy as np
import pytest
import torch
from helpers import random_head

from gmfast.ops import smoothing as ops_smoothing


def numpy_counts(Z, owner, num_inputs, A, beta):
    """counts[owner, argmax(Z Aᵀ + β)] in float64 numpy; non-finite rows and bad owners dropped."""
    L = Z.double().numpy() @ A.double().numpy().T + beta.double().numpy()
    out = np.zeros((num_inputs, A.shape[0]), dtype=np.int64)
    for n in range(L.shape[0]):
        o = int(owner[n])
        if np.isfinite(L[n]).all() and 0 <= o < num_inputs:
            out[o, int(L[n].argmax())] += 1
    return out


def backends():
    out = ["reference"]
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not importable: the fused backend is not tested here")
        return out
    if os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counts_match_numpy(backend, dtype):
    p = random_head("tied", 6, 5, seed=4).classifier_params.to("cpu", dtype)
    g = torch.Generator().manual_seed(2)
    inputs = 7
    Z = (torch.randn(90, 6, generator=g, dtype=torch.float64) * 3).to(dtype)
    owner = torch.randint(0, inputs, (90,), generator=g).sort().values
    Z[5, 1] = float("nan")  # not a class
    owner[11] = inputs  # out of range
    expect = numpy_counts(Z, owner, inputs, p.A, p.beta)
    got = ops_smoothing.smoothing_counts(Z, owner, inputs, p.A, p.beta, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (inputs, 5)
    np.testing.assert_array_equal(got.numpy(), expect)
    assert int(got.sum()) == 88
    again = ops_smoothing.smoothing_counts(Z, owner, inputs, p.A, p.beta, got.clone(), backend=backend)
    np.testing.assert_array_equal(again.numpy(), 2 * expect)


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    assert ops_smoothing.fused_backend(cpu) is None  # auto never runs the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops_smoothing.fused_backend(cpu, allow_interpreter=True) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops_smoothing.fused_backend(cpu, allow_interpreter=True) is None
    p = random_head("tied", 2, 3, seed=0).classifier_params
    with pytest.raises(ValueError, match="backend must be 'reference' or one of"):
        ops_smoothing.smoothing_counts(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.int64), 1,
                                       p.A, p.beta, backend="cpu")
