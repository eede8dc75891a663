"""Files (safetensors, validated, no pickle) and the public API's edges."""

import json
import math
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from helpers import blobs, bound_reference, dense_params, linear_radius_bruteforce
from safetensors.torch import save_file

import gmfast
from gmfast import GaussianMixtureHead as Head
from gmfast._validate import NonFiniteWarning

KINDS = ["tied", "full", "diag", "spherical"]


def test_version_and_lazy_exports():
    import re

    assert re.fullmatch(r"\d+\.\d+\.\d+", gmfast.__version__)
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'provider = "scikit_build_core.metadata.regex"' in text  # the one version source
    assert gmfast.GaussianMixtureHead is Head
    assert callable(gmfast.certified_accuracy)
    with pytest.raises(AttributeError):
        gmfast.not_a_thing  # noqa: B018
    assert gmfast.available_backends()["cpu"] == "ok"


@pytest.mark.parametrize("kind,shrinkage", [(k, s) for k in KINDS for s in (0.0, 0.2)]
                         + [("tied", "ledoit-wolf"), ("full", "ledoit-wolf")])
def test_save_load_bit_exact(tmp_path, kind, shrinkage):
    Z, y = blobs(300, 3, 5, seed=71, per_class_cov=True)
    head = Head(kind, shrinkage=shrinkage, priors="uniform").fit(Z, y)
    path = tmp_path / "head.safetensors"
    head.save(path)
    back = Head.load(path)
    assert (back.covariance_type, back.shrinkage, back.priors) == (kind, shrinkage, "uniform")
    for name in ("means_", "covariances_", "priors_", "counts_"):
        assert torch.equal(getattr(back, name), getattr(head, name)), name
    Zt = torch.tensor(Z, dtype=torch.float32)
    a, b = head.certify(Zt), back.certify(Zt)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.radius, b.radius)
    assert torch.equal(head(Zt), back(Zt))
    # the file has no pickle opcodes: it is a JSON header plus raw little-endian buffers
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert json.loads(header["__metadata__"]["gmfast"])["format"] == "gmfast.GaussianMixtureHead"


def _saved(tmp_path):
    Z, y = blobs(200, 3, 4, seed=72)
    path = tmp_path / "h.safetensors"
    Head("tied", shrinkage=0.0).fit(Z, y).save(path)
    return path


def test_load_rejects_bad_files(tmp_path):
    good = _saved(tmp_path)
    raw = good.read_bytes()
    cases = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "garbage": b"\x00" * 100,
        "pickle": pickle.dumps({"means": np.zeros((3, 4))}),
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(ValueError, match="not a valid gmfast head file"):
            Head.load(p)
    with pytest.raises(FileNotFoundError):
        Head.load(tmp_path / "missing.safetensors")


def _write(tmp_path, tensors, meta):
    p = tmp_path / "t.safetensors"
    save_file(tensors, str(p), metadata=None if meta is None else {"gmfast": json.dumps(meta)})
    return p


def test_load_validates_every_field(tmp_path):
    Z, y = blobs(200, 3, 4, seed=73)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    base = {k: head._fitted()[k].clone() for k in gmfast.io.TENSORS}
    meta = {"format": "gmfast.GaussianMixtureHead", "version": 1, "covariance_type": "tied", "shrinkage": 0.0,
            "priors": "empirical", "n_classes": 3, "n_features": 4, "gmfast_version": "0"}
    assert Head.load(_write(tmp_path, base, meta)).n_classes_ == 3

    def bad(match, tensors=None, **m):
        t = dict(base) if tensors is None else tensors
        mm = dict(meta, **m)
        with pytest.raises(ValueError, match=match):
            Head.load(_write(tmp_path, t, mm))

    bad("unsupported version", version=2)
    bad("format must be", format="other")
    bad("covariance_type must be one of", covariance_type="banana")
    bad("n_classes must be a positive integer", n_classes=-1)
    bad("means must have shape", n_classes=4)
    bad("must be float64", tensors=dict(base, priors=base["priors"].float()))
    bad("has NaN", tensors=dict(base, means=base["means"].clone().fill_(math.nan)))
    bad("sum to 1", tensors=dict(base, priors=base["priors"] * 2))
    asym = base["covariance"].clone()
    asym[0, 1] += 1.0
    bad("not symmetric", tensors=dict(base, covariance=asym))
    bad("singular", tensors=dict(base, covariance=torch.zeros(4, 4, dtype=torch.float64)))
    bad("expected tensors", tensors={k: v for k, v in base.items() if k != "counts"})
    with pytest.raises(ValueError, match="no 'gmfast' metadata"):
        Head.load(_write(tmp_path, base, None))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nonfinite_rows_abstain_or_raise(kind, backend):
    Z, y = blobs(300, 3, 4, seed=74, per_class_cov=True)
    head = Head(kind, shrinkage=0.0).fit(Z, y)
    X = torch.tensor(Z[:6], dtype=torch.float32)
    X[1, 2] = math.nan
    X[4, 0] = math.inf
    with pytest.warns(NonFiniteWarning, match="2 row"):
        cert = head.certify(X, backend=backend)
    assert cert.prediction[[1, 4]].tolist() == [-1, -1]
    assert cert.radius[[1, 4]].tolist() == [0.0, 0.0]
    good = head.certify(X[[0, 2, 3, 5]], backend=backend)
    assert torch.equal(cert.prediction[[0, 2, 3, 5]], good.prediction)
    assert torch.equal(cert.radius[[0, 2, 3, 5]], good.radius)
    with pytest.raises(ValueError, match="2 row"):
        head.certify(X, on_nonfinite="raise", backend=backend)
    # finite inputs near the float32 limit: a backend either abstains (its logits overflowed)
    # or returns a radius that the float64 formula confirms
    X = torch.full((2, 4), 3e38)
    X[1] *= -0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        huge = head.certify(X, backend=backend)
    overflowed = [w for w in caught if "overflowed" in str(w.message)]
    assert bool((huge.prediction == -1).any()) == bool(overflowed)  # an abstention is always explained
    if kind == "tied":
        p = head.classifier_params
        pred_ref, r_ref, _, _ = linear_radius_bruteforce(X.double().numpy(), p.A.numpy(), p.beta.numpy(), 2)
    else:
        pred_ref, r_ref = bound_reference(X.double().numpy(), *dense_params(head))
    for i in range(2):
        if huge.prediction[i] == -1:
            assert huge.radius[i] == 0
        else:
            assert huge.prediction[i] == pred_ref[i]
            assert huge.radius[i].item() <= r_ref[i] * (1 + 1e-9)


def test_forward_is_differentiable_and_matches_predict():
    Z, y = blobs(200, 3, 4, seed=75, per_class_cov=True)
    for kind in KINDS:
        head = Head(kind, shrinkage=0.0).fit(Z, y)
        X = torch.tensor(Z[:20], requires_grad=True)
        out = head(X)
        out.logsumexp(1).sum().backward()
        assert X.grad is not None and torch.isfinite(X.grad).all()
        assert torch.equal(out.argmax(1), head.predict(X.detach()))
    assert not head.training
    head.train()
    assert not head.training  # the head has no train-time behaviour


def test_certified_accuracy():
    pred = torch.tensor([0, 1, 2, -1, 1])
    rad = torch.tensor([0.5, 0.0, 1.0, 0.0, 2.0])
    labels = torch.tensor([0, 1, 1, 3, 1])
    ca = gmfast.certified_accuracy((pred, rad), labels, [0.0, 0.5, 1.5])
    np.testing.assert_allclose(ca, [3 / 5, 2 / 5, 1 / 5])
    with pytest.raises(ValueError, match="same length"):
        gmfast.certified_accuracy((pred, rad), labels[:3], [0.0])


def test_noncontiguous_and_numpy_inputs():
    Z, y = blobs(300, 4, 6, seed=76)
    head = Head("tied", shrinkage=0.0).fit(Z, y)
    big = torch.tensor(np.concatenate([Z, Z], 1))[:, ::2]  # strided view
    assert not big.is_contiguous()
    a = head.certify(big, backend="cpu")
    b = head.certify(big.contiguous(), backend="reference")
    assert torch.equal(a.prediction, b.prediction)
    np.testing.assert_allclose(a.radius.numpy(), b.radius.numpy(), rtol=1e-12)
    with pytest.raises(TypeError, match="floating"):
        head.certify(np.zeros((2, 6), dtype=np.int32))
    with pytest.raises(ValueError, match="must be 2-D"):
        head.certify(torch.zeros(6))
    with pytest.raises(ValueError, match="backend must be one of"):
        head.certify(Z[:2], backend="tpu")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        head.certify(Z[:2], backend="cuda")
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        head.certify(Z[:2], on_nonfinite="ignore")
