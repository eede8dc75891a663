"""gmfast.train's data augmentation (``Recipe.augment``: random integer translations, zero
fill): each output is a shift of its input within the range, against an independent numpy
reference; seeded; off by default without touching the training path; bad values refused;
and the benchmark's ``--reuse-smoothing`` refuses base models trained with another pipeline."""

import json

import numpy as np
import pytest
import torch
from helpers import benchmark_module

from gmfast.train import recipe, train
from gmfast.train.layers import mlp_architecture
from gmfast.train.recipe import translate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shifted(x, dy, dx):
    """numpy reference: out[i, j] = x[i - dy, j - dx] where that pixel exists, else 0."""
    C, H, W = x.shape
    out = np.zeros_like(x)
    for i in range(H):
        for j in range(W):
            if 0 <= i - dy < H and 0 <= j - dx < W:
                out[:, i, j] = x[:, i - dy, j - dx]
    return out


def _images(n, C=2, H=7, W=9, seed=0):
    # distinct positive values, so the shift that produced an output is identifiable
    g = torch.Generator().manual_seed(seed)
    return 0.05 + 0.9 * torch.rand(n, C, H, W, generator=g)


@pytest.mark.parametrize("a", [1, 2, 3])
def test_translate_is_a_shift_within_range_with_zero_fill(a):
    x = _images(200)
    out = translate(x, a, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= float(x.max())  # no new pixel values
    seen = set()
    for xi, oi in zip(x.numpy(), out.numpy()):
        match = [(dy, dx) for dy in range(-a, a + 1) for dx in range(-a, a + 1)
                 if np.array_equal(oi, _shifted(xi, dy, dx))]
        assert len(match) == 1, "each output is exactly one shift of its own input"
        seen.add(match[0])
        assert set(np.unique(oi)) <= set(np.unique(xi)) | {0.0}
    # 200 draws of a uniform choice among (2a+1)^2 shifts: all of them appear (a = 3: 49
    # shifts, P(some shift missed) < 49 (48/49)^200 ~ 0.8%; fixed seed, so deterministic)
    assert seen == {(dy, dx) for dy in range(-a, a + 1) for dx in range(-a, a + 1)}


def test_translate_is_seeded_and_zero_is_the_identity():
    x = _images(64)
    o1 = translate(x, 2, torch.Generator().manual_seed(5))
    o2 = translate(x, 2, torch.Generator().manual_seed(5))
    o3 = translate(x, 2, torch.Generator().manual_seed(6))
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert translate(x, 0, g) is x and torch.equal(g.get_state(), state)  # no draw when off
    with pytest.raises(ValueError, match=r"\(n, C, H, W\).*got \(64, 126\)"):
        translate(x.reshape(64, -1), 1, g)
    with pytest.raises(ValueError, match="shift 7"):
        translate(x, 7, g)


def test_augment_values_are_checked():
    assert recipe("digits").augment == 0 and recipe("mnist").augment == 1  # MNIST: 1-pixel shifts (round 9)
    assert recipe("mnist", augment=2).augment == 2
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"augment must be an int >= 0.*got"):
            recipe("digits", augment=bad)
    with pytest.raises(ValueError, match=r"input_shape \(1, 8, 8\), augment 8"):
        recipe("digits", augment=8)
    with pytest.raises(ValueError, match=r"input_shape \(64,\), augment 1"):
        recipe("digits", input_shape=(64,), augment=1)


def _small(**kw):
    from gmfast.train.data import load_split

    Xtr, ytr, _, _ = load_split("digits")
    r = recipe("digits", architecture=mlp_architecture(64, [32], 8), latent=8, **(dict(epochs=2) | kw))
    return r, Xtr[:300], ytr[:300]


def _weights(enc, proto):
    return [t.detach().clone() for t in list(enc.state_dict().values()) + list(proto.state_dict().values())]


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_training_with_augment_is_seeded_and_off_leaves_training_unchanged(loss, monkeypatch):
    r, X, y = _small(loss=loss, noise=0.1 if loss == "ce" else 0.0)
    base = _weights(*train(r, X, y, progress=False)[:2])
    aug = _weights(*train(r.replace(augment=1), X, y, progress=False)[:2])
    aug2 = _weights(*train(r.replace(augment=1), X, y, progress=False)[:2])
    assert all(torch.equal(a, b) for a, b in zip(aug, aug2))  # same seed, same weights
    assert not all(torch.equal(a, b) for a, b in zip(base, aug))  # it changes the training data

    # off (the default): the training path never reaches the augmentation, so no generator
    # draw moves and the weights are those of the unaugmented loop, bit for bit
    import sys

    recipe_module = sys.modules["gmfast.train.recipe"]  # the module (gmfast.train.recipe is the function)

    def refuse(*args, **kw):
        raise AssertionError("translate called with augment = 0")

    monkeypatch.setattr(recipe_module, "translate", refuse)
    again = _weights(*train(r, X, y, progress=False)[:2])
    assert all(torch.equal(a, b) for a, b in zip(base, again))
    with pytest.raises(AssertionError, match="augment = 0"):
        train(r.replace(augment=1), X, y, progress=False)


def test_recipe_json_keeps_augment(tmp_path):
    from gmfast.train import load, save
    from gmfast.train.recipe import Recipe

    r, X, y = _small(augment=1, epochs=1)
    assert Recipe(**r.to_json()) == r
    enc, proto, _ = train(r, X, y, progress=False)
    import gmfast

    save(tmp_path, enc, gmfast.train.fit_tied_head(enc, X, y, r.shrinkage), r)
    assert json.loads((tmp_path / "encoder.json").read_text())["recipe"]["augment"] == 1
    load(tmp_path)


def _benchmark():
    return benchmark_module("certified_accuracy")


class StoredSmoothing:
    """A stored σ = 0.25 smoothing run (TSV and JSON record) in ``tmp_path`` as
    ``--reuse-smoothing`` reads it, and the benchmark's ``smoothing_rows`` on it."""

    def __init__(self, tmp_path, monkeypatch):
        from gmfast.tsv import write_certification_tsv

        self.bench, self.dir = _benchmark(), tmp_path
        monkeypatch.setitem(self.bench.PER_CLASS, "mnist", 2)
        monkeypatch.setattr(self.bench, "RUN_SIGMAS", [0.25])
        monkeypatch.setattr(self.bench, "EXTRA_BASES", {})  # the recipe's base only, unless a test adds some
        self.yte = torch.arange(10).repeat_interleave(3)
        self.sub = self.bench.subset(self.yte, 2)
        self.plan = dict(per_class=2, size=len(self.sub), n=100_000, n0=self.bench.N0, alpha=self.bench.ALPHA)
        self.tsv("", torch.full((len(self.sub),), 0.3))

    def tsv(self, tag, radius):
        """The stored TSV of base ``tag`` (``""``: the recipe's): every prediction right, ``radius``."""
        from gmfast.tsv import write_certification_tsv

        write_certification_tsv(self.dir / f"{self.bench.smoothing_stem('mnist', tag, 0.25)}.tsv",
                                (self.yte[self.sub], radius), self.yte[self.sub], idx=self.sub, seconds=1.0)

    def record(self, r, tag="", **fields):
        """The JSON record of a base model trained with ``r``'s budget, plus ``fields``."""
        m = dict(accuracy_subset=[1.0], seconds_per_input=1.0, evaluations=100_100, max_radius=0.95,
                 base_clean_accuracy=1.0, epochs=r.epochs, batch_size=r.batch_size) | fields
        (self.dir / f"{self.bench.smoothing_stem('mnist', tag, 0.25)}.json").write_text(json.dumps(
            dict(smoothing_subset=self.plan, methods={self.bench.smoothing_name(tag, 0.25): m})))

    def rows(self, r):
        res = dict(methods={})
        self.bench.smoothing_rows("mnist", r, None, None, None, self.yte, self.dir, False, lambda s: None, res, {},
                                  True)
        return res


def test_reuse_smoothing_requires_the_same_augmentation(tmp_path, monkeypatch):
    """``--reuse-smoothing`` compares the stored base model's budget and data pipeline with the
    recipe: a record without ``augment`` or ``ema`` (written before the option) counts as 0."""
    st = StoredSmoothing(tmp_path, monkeypatch)
    r = recipe("mnist", augment=0)
    st.record(r, architecture=r.architecture)  # an old record: trained without augmentation
    assert st.rows(r)["methods"]["smoothing σ=0.25"]["reused"]
    with pytest.raises(ValueError, match=r"trained with \{.*'augment': 0, 'ema': 0\}.*augment 2"):
        st.rows(r.replace(augment=2))
    st.record(r, architecture=r.architecture, augment=2)
    assert st.rows(r.replace(augment=2))["methods"]["smoothing σ=0.25"]["accuracy_subset"][0] == 1.0
    with pytest.raises(ValueError, match=r"'augment': 2, 'ema': 0\}.*augment 0"):
        st.rows(r)
    with pytest.raises(ValueError, match=r"'epochs': 200.*trains 100 epochs"):
        st.rows(r.replace(augment=2, epochs=100))
    # weight averaging is part of the training pipeline too (a record without it: none)
    with pytest.raises(ValueError, match=r"'ema': 0\}.*augment 2, ema 0.99 "):
        st.rows(r.replace(augment=2, ema=0.99))
    st.record(r, architecture=r.architecture, augment=2, ema=0.99)
    assert st.rows(r.replace(augment=2, ema=0.99))["methods"]["smoothing σ=0.25"]["reused"]


def test_reuse_smoothing_requires_the_same_architecture(tmp_path, monkeypatch):
    """A stored base model of another architecture is refused; a record without the field
    counts as the MLP the recipes used before it was recorded."""
    from gmfast.train.layers import conv_architecture, mlp_architecture

    st = StoredSmoothing(tmp_path, monkeypatch)
    mlp = recipe("mnist", architecture=mlp_architecture(784, [256, 256, 256], 64), augment=0)
    conv = recipe("mnist", architecture=conv_architecture(1, 28, [16, 32], 64, 256, reduce=32), augment=0)
    st.record(mlp)  # an old record: the MLP
    assert st.rows(mlp)["methods"]["smoothing σ=0.25"]["reused"]
    with pytest.raises(ValueError, match=r"architecture .*'aol_linear', 'in': 784.*the same architecture required"):
        st.rows(conv)
    st.record(mlp, architecture=conv.architecture)
    assert st.rows(conv)["methods"]["smoothing σ=0.25"]["reused"]
    with pytest.raises(ValueError, match="the same architecture required"):
        st.rows(mlp)


def test_benchmark_device_option(monkeypatch):
    """``--device``: cpu is taken as given; cuda where CUDA is absent is a clear error."""
    if torch.cuda.is_available():  # set_device would switch TF32 off for the whole test process
        pytest.skip("CUDA is available here: the refusal of --device cuda without CUDA cannot be shown")
    bench = _benchmark()
    monkeypatch.setitem(bench.DEVICE, "device", bench.DEVICE["device"])  # restored after the test
    assert bench.set_device("cpu") == torch.device("cpu") and bench.device() == torch.device("cpu")
    assert bench.set_device(None) == torch.device("cpu")  # no CUDA here: the default is the CPU
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        bench.set_device("cuda")


def test_smoothing_of_every_base_and_the_best_per_radius(tmp_path, monkeypatch):
    """With an extra base architecture the benchmark reads (or runs) smoothing for it too,
    under its own file and name, and compares gmfast with the best model at each radius; a
    stored record of the wrong architecture for that base is refused."""
    from gmfast.train.layers import mlp_architecture

    st = StoredSmoothing(tmp_path, monkeypatch)
    r = recipe("mnist", augment=0)  # the records below have no augment field: trained without
    aol = mlp_architecture(784, [256, 256, 256], 64)
    assert r.architecture != aol  # the recipe is Cayley since round 6
    monkeypatch.setattr(st.bench, "EXTRA_BASES", {"mnist": {"aol": dict(architecture=aol)}})
    assert st.bench.smoothing_bases("mnist", r) == [("", r), ("aol", r.replace(architecture=aol))]
    assert st.bench.smoothing_bases("mnist", r.replace(architecture=aol)) == [("", r.replace(architecture=aol))]
    st.record(r, architecture=r.architecture)
    st.tsv("aol", torch.full((len(st.sub),), 0.6))  # the AOL base certifies larger radii here
    st.record(r, tag="aol", architecture=aol)
    res = st.rows(r)
    assert set(res["methods"]) == {"smoothing σ=0.25", "smoothing σ=0.25, AOL base"}
    radii = st.bench.RADII["mnist"]
    own = [float(e <= 0.3) for e in radii]
    other = [float(e <= 0.6) for e in radii]
    assert res["methods"]["smoothing σ=0.25"]["accuracy_subset"] == own
    assert res["methods"]["smoothing σ=0.25, AOL base"]["accuracy_subset"] == other
    assert res["smoothing_best"] == [max(a, b) for a, b in zip(own, other)]
    st.record(r, tag="aol", architecture=r.architecture)  # the AOL file holding a Cayley base
    with pytest.raises(ValueError, match=r"AOL base's base model has architecture .*cayley_linear.*the same "
                                         "architecture required"):
        st.rows(r)


def test_smoothing_variants_cover_architecture_and_augmentation(tmp_path, monkeypatch):
    """The benchmark's own variants: on MNIST the AOL base and, for a recipe that augments,
    both bases without the augmentation too (each variant once, none equal to the recipe),
    each under its own name and file; a stored record of the no-augmentation variant that
    was trained with the augmentation is refused."""
    from gmfast.train.layers import mlp_architecture

    bench = _benchmark()
    aol = mlp_architecture(784, [256, 256, 256], 64)
    r = recipe("mnist")
    tags = {t: (b.architecture == aol, b.augment) for t, b in bench.smoothing_bases("mnist", r.replace(augment=1))}
    assert tags == {"": (False, 1), "aol": (True, 1), "noaug": (False, 0), "aol_noaug": (True, 0)}
    tags0 = {t: (b.architecture == aol, b.augment) for t, b in bench.smoothing_bases("mnist", r.replace(augment=0))}
    assert tags0 == {"": (False, 0), "aol": (True, 0)}  # the no-augmentation variants are these same models
    assert [t for t, _ in bench.smoothing_bases("digits", recipe("digits"))] == ["", "aol"]
    assert bench.smoothing_name("aol_noaug", 0.5) == "smoothing σ=0.5, AOL base, no augmentation"
    assert bench.smoothing_stem("mnist", "aol_noaug", 0.25) == "mnist_smoothing_aol_noaug_sigma0.25"

    st = StoredSmoothing(tmp_path, monkeypatch)
    monkeypatch.setattr(st.bench, "EXTRA_BASES", {"mnist": {"noaug": dict(augment=0)}})
    ra = r.replace(augment=1)
    st.record(ra, architecture=ra.architecture, augment=1)
    st.tsv("noaug", torch.full((len(st.sub),), 0.6))
    st.record(ra, tag="noaug", architecture=ra.architecture)  # a record without the field: no augmentation
    res = st.rows(ra)
    assert set(res["methods"]) == {"smoothing σ=0.25", "smoothing σ=0.25, no augmentation"}
    assert res["smoothing_best"] == [float(e <= 0.6) for e in st.bench.RADII["mnist"]]
    st.record(ra, tag="noaug", architecture=ra.architecture, augment=1)  # the file holds an augmented base
    with pytest.raises(ValueError, match=r"no augmentation's base model was trained with .*'augment': 1.*augment 0"):
        st.rows(ra)
