"""Randomized smoothing against independent references.

References: statsmodels' Clopper–Pearson, mpmath's incomplete beta, and base classifiers
whose smoothed probabilities are known in closed form (a linear classifier: ``Φ`` of the
margin; three linear classes: a bivariate normal orthant probability). Statistical checks
count failures over many fixed-seed trials and allow a one-sided binomial slack at level
1e-4, so a bound that is too loose in the wrong direction fails them.
"""

import math
from types import SimpleNamespace

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from statsmodels.stats.proportion import proportion_confint

from gmfast import smoothing
from gmfast.smoothing import (
    Smooth,
    SmoothCertificate,
    clopper_pearson_interval,
    clopper_pearson_lower,
)


def max_failures(trials, alpha, p=1e-4):
    """Largest failure count consistent with a failure rate <= alpha (one-sided, level p)."""
    return int(stats.binom.isf(p, trials, alpha))


class Linear:
    """Affine classifier on R^d: logits (w·x + b) per class; records what it was fed."""

    def __init__(self, W, b):
        self.W = torch.as_tensor(W, dtype=torch.float64)
        self.b = torch.as_tensor(b, dtype=torch.float64)
        self.max_batch = 0
        self.calls = 0
        self.dtypes = set()
        self.devices = set()

    def __call__(self, x):
        self.max_batch = max(self.max_batch, x.shape[0])
        self.calls += 1
        self.dtypes.add(x.dtype)
        self.devices.add(x.device)
        return x.double() @ self.W.T.to(x.device) + self.b.to(x.device)


def binary_linear(w, b):
    """Two classes: class 1 iff w·x + b > 0. Smoothed p_A = Φ(|w·x + b| / (σ‖w‖))."""
    w = np.asarray(w, dtype=np.float64)
    return Linear(np.stack([-w, w]) / 2, [-b / 2, b / 2])


def points_at_distance(rng, w, b, dist):
    """Random points whose signed distance to {w·x + b = 0} is ``dist`` (array)."""
    x = rng.standard_normal((len(dist), len(w)))
    s = x @ w + b
    x += ((dist * np.linalg.norm(w) - s) / (w @ w))[:, None] * w
    return torch.from_numpy(x)


# ---------------------------------------------------------------------------------------
# Clopper–Pearson
# ---------------------------------------------------------------------------------------

GRID_N = [1, 2, 3, 7, 10, 100, 1000, 100_000]


def grid():
    for n in GRID_N:
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            yield k, n


@pytest.mark.parametrize("alpha", [1e-3, 0.01, 0.05, 0.3])
def test_clopper_pearson_lower_matches_beta_quantile_and_statsmodels(alpha):
    k, n = map(np.array, zip(*grid()))
    lo = clopper_pearson_lower(k, n, alpha)
    expected = np.where(k == 0, 0.0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1))
    sm = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
    # The bound sits below the quantile by a relative 1e-12 of alpha (betainc's rounding).
    np.testing.assert_allclose(lo, expected, rtol=1e-11, atol=0)
    np.testing.assert_allclose(lo, sm, rtol=1e-11, atol=0)
    assert np.all(lo <= expected)
    full = k == n
    np.testing.assert_allclose(lo[full], alpha ** (1.0 / n[full]), rtol=1e-11)
    assert np.all(lo[full] <= alpha ** (1.0 / n[full]))
    assert np.all(lo[k == 0] == 0.0)
    # scalar in, scalar out
    assert isinstance(float(clopper_pearson_lower(3, 10, alpha)), float)
    assert np.ndim(clopper_pearson_lower(3, 10, alpha)) == 0


@pytest.mark.parametrize("alpha", [1e-3, 0.05, 0.2])
def test_clopper_pearson_interval_matches_statsmodels(alpha):
    k, n = map(np.array, zip(*grid()))
    lo, hi = clopper_pearson_interval(k, n, alpha)
    sm_lo, sm_hi = proportion_confint(k, n, alpha=alpha, method="beta")
    np.testing.assert_allclose(lo, sm_lo, rtol=1e-11, atol=0)
    # 1 - lower(n-k) loses relative precision only where the upper bound is tiny.
    np.testing.assert_allclose(hi, sm_hi, rtol=1e-10, atol=1e-15)
    assert np.all(hi >= sm_hi - 1e-15)
    assert np.all(hi[k == n] == 1.0) and np.all(lo[k == 0] == 0.0)
    assert np.all((0 <= lo) & (lo < hi) & (hi <= 1))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 2_000_000),
    frac=st.floats(0, 1),
    log_alpha=st.floats(-12, math.log(0.5)),
)
def test_clopper_pearson_lower_is_valid_and_tight(n, frac, log_alpha):
    k = int(round(frac * n))
    alpha = math.exp(log_alpha)
    lo = float(clopper_pearson_lower(k, n, alpha))
    if k == 0:
        assert lo == 0.0
        return
    # valid: P(Binom(n, lo) >= k) <= alpha
    assert special.betainc(k, n - k + 1, lo) <= alpha
    assert stats.binom.sf(k - 1, n, lo) <= alpha * (1 + 1e-9)
    # tight: a hair above lo is no longer a valid bound
    assert special.betainc(k, n - k + 1, min(lo * (1 + 1e-8), 1.0)) > alpha


@pytest.mark.parametrize(
    "k,n,alpha", [(1, 1, 0.05), (3, 10, 0.01), (57, 60, 0.001), (499, 1000, 0.05)]
)
def test_clopper_pearson_lower_against_mpmath(k, n, alpha):
    lo = float(clopper_pearson_lower(k, n, alpha))
    mpmath.mp.dps = 50

    def tail(p):  # P(Binom(n, p) >= k), exactly
        return mpmath.betainc(k, n - k + 1, 0, p, regularized=True)

    assert tail(mpmath.mpf(lo)) <= alpha
    exact = mpmath.findroot(lambda p: tail(p) - alpha, lo)
    assert abs(lo - float(exact)) <= 1e-11 * float(exact)


def test_clopper_pearson_lower_steps_down_when_the_quantile_is_too_high(monkeypatch):
    """A ppf that overshoots (or fails) must not leak an invalid bound."""
    true_ppf = stats.beta.ppf
    overshoot = lambda a, p, q: true_ppf(a, p, q) * (1 + 1e-7)  # noqa: E731
    failure = lambda a, p, q: np.full_like(a, np.nan)  # noqa: E731
    for bad in (overshoot, failure):
        fake = SimpleNamespace(beta=SimpleNamespace(ppf=bad), norm=stats.norm)
        monkeypatch.setattr(smoothing, "stats", fake)
        k, n = np.array([1, 5, 500, 99_999]), np.array([10, 10, 1000, 100_000])
        lo = clopper_pearson_lower(k, n, 0.01)
        monkeypatch.undo()
        assert np.all(special.betainc(k, n - k + 1, lo) <= 0.01)
        np.testing.assert_allclose(lo, true_ppf(0.01, k, n - k + 1), rtol=1e-11)


def test_clopper_pearson_invalid_arguments_are_nan():
    k, n = [11, -1, 3, 2.5, 3], [10, 10, 0, 10, 10]
    lo = clopper_pearson_lower(k, n, [0.05, 0.05, 0.05, 0.05, 1.0])
    assert np.all(np.isnan(lo))


# ---------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------


def test_count_matches_a_loop_and_drops_non_classes():
    g = torch.Generator().manual_seed(0)
    B, K, N = 7, 5, 1000
    labels = torch.randint(-1, K + 1, (N,), generator=g)  # -1 and K are not classes
    owner = torch.randint(0, B, (N,), generator=g)
    expected = torch.zeros(B, K, dtype=torch.int64)
    for lab, o in zip(labels.tolist(), owner.tolist()):
        if 0 <= lab < K:
            expected[o, lab] += 1
    got = smoothing._count(labels, owner, B, K)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------
# CERTIFY against closed forms
# ---------------------------------------------------------------------------------------

SIGMA = 0.5


def test_certify_binary_linear_is_sound_and_tight():
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal(5), 0.3
    base = binary_linear(w, b)
    trials, alpha = 200, 0.01
    true_r = SIGMA * rng.uniform(0.3, 2.5, trials)
    X = points_at_distance(rng, w, b, true_r * rng.choice([-1, 1], trials))
    smooth = Smooth(base, 2, SIGMA, seed=7)
    results = [smooth.certify(x, 100, 1000, alpha, 400) for x in X]
    pred = np.array([p for p, _ in results])
    radius = np.array([r for _, r in results])
    assert all(isinstance(p, int) and isinstance(r, float) for p, r in results)
    truth = (X.numpy() @ w + b > 0).astype(int)
    wrong = (radius > true_r) | ((pred != truth) & (pred != -1))
    assert wrong.sum() <= max_failures(trials, alpha)
    assert np.mean(radius / true_r) > 0.7  # abstentions count as 0
    assert base.max_batch <= 400


def test_certify_batch_binary_linear_is_sound_and_follows_the_paper():
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal(4), -0.2
    base = binary_linear(w, b)
    B, alpha, n0, n = 300, 0.01, 100, 1000
    true_r = SIGMA * rng.uniform(0.3, 2.5, B)
    X = points_at_distance(rng, w, b, true_r * rng.choice([-1, 1], B))
    cert = Smooth(base, 2, SIGMA, seed=3).certify_batch(X, n0, n, alpha, 512)
    assert isinstance(cert, SmoothCertificate)
    pred, radius = cert
    assert pred.dtype == torch.int64 and radius.dtype == torch.float64
    assert pred.shape == radius.shape == (B,) and len(cert) == B
    assert torch.equal(cert.samples, torch.full((B,), n0 + n))
    assert torch.equal(cert.counts_selection.sum(1), torch.full((B,), n0))
    assert torch.equal(cert.counts.sum(1), torch.full((B,), n))

    r = radius.numpy()
    wrong = (r > true_r) | ((pred.numpy() != (X.numpy() @ w + b > 0)) & (pred.numpy() != -1))
    assert wrong.sum() <= max_failures(B, alpha)
    assert np.mean(r / true_r) > 0.7

    # The paper's CERTIFY, recomputed from the reported counts.
    c_a = cert.counts_selection.numpy().argmax(1)
    n_a = cert.counts.numpy()[np.arange(B), c_a]
    p_a = np.where(n_a == 0, 0.0, stats.beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1))
    ok = p_a > 0.5
    np.testing.assert_array_equal(pred.numpy(), np.where(ok, c_a, -1))
    np.testing.assert_allclose(r[ok], SIGMA * stats.norm.ppf(p_a[ok]), rtol=1e-10)
    assert np.all(r[~ok] == 0.0) and np.all(r[ok] <= SIGMA * stats.norm.ppf(p_a[ok]))


def three_class_probabilities(W, b, x, sigma):
    """P(argmax W(x+δ)+b = c) for each c: a bivariate normal orthant probability."""
    out = []
    for c in range(3):
        others = [j for j in range(3) if j != c]
        D = W[c] - W[others]  # rows w_c - w_j
        margin = D @ x + (b[c] - b[others])
        cov = sigma**2 * D @ D.T
        # P(margin + Dδ > 0) = P(-Dδ < margin); -Dδ ~ N(0, cov)
        out.append(stats.multivariate_normal(mean=np.zeros(2), cov=cov).cdf(margin))
    return np.array(out)


def test_certify_three_class_linear_against_orthant_probabilities():
    rng = np.random.default_rng(3)
    d = 4
    W, b = rng.standard_normal((3, d)), rng.standard_normal(3) * 0.3
    base = Linear(W, b)
    X = rng.standard_normal((200, d)) * 0.8
    p_true = np.array([three_class_probabilities(W, b, x, SIGMA) for x in X])
    np.testing.assert_allclose(p_true.sum(1), 1.0, atol=1e-5)

    alpha = 0.01
    smooth = Smooth(base, 3, SIGMA, seed=11)
    cert = smooth.certify_batch(torch.from_numpy(X), 100, 2000, alpha, 1000)
    pred, radius = (t.numpy() for t in cert)
    certified = pred >= 0
    assert certified.mean() > 0.5
    p_pred = p_true[np.arange(len(X)), np.maximum(pred, 0)]
    # Tolerance for the numerical integration (abseps ~1e-5): shrink the reference a hair.
    ref = SIGMA * stats.norm.ppf(np.clip(p_pred + 1e-5, 0, 1))
    wrong = certified & (radius > ref)
    assert wrong.sum() <= max_failures(len(X), alpha)

    # The estimation counts are Binom(n, p_true) per class: checks the histogram itself.
    n = 2000
    freq = cert.counts.numpy() / n
    z = (freq - p_true) / np.sqrt(np.maximum(p_true * (1 - p_true), 1e-12) / n)
    assert np.abs(z).max() < 5.5


def test_coin_flip_base_abstains():
    """At x = 0 the sign of the first coordinate is a fair coin: p_A = 1/2 exactly."""
    base = Linear([[-1.0, 0.0], [1.0, 0.0]], [0.0, 0.0])
    x = torch.zeros(2)
    alpha = 1e-3
    singles = [Smooth(base, 2, 1.0, seed=s).certify(x, 100, 2000, alpha, 1000) for s in range(20)]
    assert all(r == (-1, 0.0) for r in singles)
    cert = Smooth(base, 2, 1.0, seed=99).certify_batch(torch.zeros(500, 2), 100, 2000, alpha, 4096)
    assert int((cert.prediction != -1).sum()) <= max_failures(500, alpha)
    assert torch.all(cert.radius[cert.prediction == -1] == 0.0)
    # PREDICT: the two-sided test rarely rejects p = 1/2 either.
    preds = [Smooth(base, 2, 1.0, seed=s).predict(x, 1000, alpha, 500) for s in range(20)]
    assert sum(p != -1 for p in preds) <= max_failures(20, alpha)


def test_predict_clear_point_and_paper_test():
    w = np.array([1.0, -2.0, 0.5])
    base = binary_linear(w, 0.0)
    x_pos = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)  # margin 3 / ||w|| >> sigma
    smooth = Smooth(base, 2, SIGMA, seed=5)
    assert smooth.predict(x_pos, 500, 0.001, 200) == 1
    assert smooth.predict(-x_pos, 500, 0.001, 200) == 0
    out = smooth.predict_batch(torch.stack([x_pos, -x_pos]), 500, 0.001, 200)
    assert out.tolist() == [1, 0]


# ---------------------------------------------------------------------------------------
# Batching, devices, seeds, base kinds
# ---------------------------------------------------------------------------------------


def test_batch_size_is_respected_and_inputs_share_forward_passes():
    base = Linear(np.eye(3), np.zeros(3))
    smooth = Smooth(base, 3, 0.3, seed=0)
    smooth.certify(torch.zeros(3), 10, 1000, 0.01, 64)
    assert base.max_batch == 64  # never all n copies in one pass
    base.max_batch, base.calls = 0, 0
    B, n0, n, bs = 7, 50, 300, 64
    smooth.certify_batch(torch.randn(B, 3), n0, n, 0.01, bs)
    assert base.max_batch <= bs
    # Packed: exactly as many passes as the sample count needs, not one set per input.
    assert base.calls == math.ceil(B * n0 / bs) + math.ceil(B * n / bs)
    base.max_batch = 0
    smooth.certify_adaptive(torch.randn(5, 3), 0.01, radius=0.1, n_max=2000, batch_size=100)
    assert base.max_batch <= 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_has_the_input_dtype_and_device(dtype):
    base = Linear(np.eye(2), np.zeros(2))
    Smooth(base, 2, 0.5, seed=0).certify(torch.zeros(2, dtype=dtype), 10, 100, 0.01, 32)
    assert base.dtypes == {dtype} and base.devices == {torch.device("cpu")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_noise_on_cuda_device():
    base = Linear(np.eye(2), np.zeros(2))
    x = torch.zeros(4, 2, dtype=torch.float64, device="cuda")
    cert = Smooth(base, 2, 0.5, seed=0).certify_batch(x, 10, 100, 0.01, 32)
    assert base.devices == {x.device} and base.dtypes == {torch.float64}
    assert cert.counts.sum() == 400
    with pytest.raises(ValueError, match="generator"):
        Smooth(base, 2, 0.5, generator=torch.Generator()).certify_batch(x, 10, 100, 0.01, 32)


def test_seed_and_generator_reproduce():
    base = Linear(np.eye(3), np.zeros(3))
    X = torch.randn(4, 3)

    def run(**kw):
        return Smooth(base, 3, 1.0, **kw).certify_batch(X, 50, 500, 0.01, 128).counts

    assert torch.equal(run(seed=3), run(seed=3))
    assert torch.equal(run(seed=3), run(generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(run(seed=3), run(seed=4))
    torch.manual_seed(1)
    a = run()
    torch.manual_seed(1)
    assert torch.equal(a, run())
    with pytest.raises(ValueError, match="seed or generator"):
        Smooth(base, 3, 1.0, seed=1, generator=torch.Generator())


class PredictOnly:
    """An object exposing only ``predict``: calling it as a logits function fails."""

    def __init__(self, W):
        self.W = torch.as_tensor(W, dtype=torch.float64)

    def predict(self, z):
        return (z.double() @ self.W.T).argmax(1)

    def __call__(self, z):
        raise AssertionError("predict() must be preferred over logits")


def test_predict_method_and_encoder_head_tuple_match_logits():
    W = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    X = torch.randn(6, 2, dtype=torch.float64)
    kw = dict(n0=50, n=400, alpha=0.01, batch_size=100)
    ref = Smooth(Linear(W, np.zeros(3)), 3, 0.4, seed=2).certify_batch(X, **kw)
    via_predict = Smooth(PredictOnly(W), 3, 0.4, seed=2).certify_batch(X, **kw)
    assert torch.equal(ref.counts, via_predict.counts)

    encoder = torch.nn.Linear(2, 2, bias=False, dtype=torch.float64).eval()
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(2))
    for head in (PredictOnly(W), Linear(W, np.zeros(3))):
        cert = Smooth((encoder, head), 3, 0.4, seed=2).certify_batch(X, **kw)
        assert torch.equal(ref.counts, cert.counts)
        assert torch.equal(ref.counts_selection, cert.counts_selection)


def test_train_mode_module_is_rejected():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    with pytest.raises(ValueError, match="eval"):
        Smooth(net, 2, 0.5)
    smooth = Smooth(net.eval(), 2, 0.5, seed=0)
    smooth.certify(torch.zeros(3), 10, 100, 0.01, 50)
    net[1].train()  # one submodule switched back after construction
    with pytest.raises(ValueError, match="Dropout|'1'"):
        smooth.certify(torch.zeros(3), 10, 100, 0.01, 50)
    encoder = torch.nn.BatchNorm1d(3)  # train mode
    with pytest.raises(ValueError, match="eval"):
        Smooth((encoder, PredictOnly(np.eye(3))), 3, 0.5)


def test_train_mode_is_refused_only_where_it_changes_the_function():
    from torch.nn.utils.parametrizations import spectral_norm

    from gmfast._validate import mode_dependent_modules

    # a plain Linear/ReLU stack computes the same function in both modes: accepted
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Dropout(0.0)).train()
    assert mode_dependent_modules(net) == []
    x = torch.randn(3)
    a = Smooth(net, 3, 0.5, seed=0).certify(x, 10, 200, 0.01, 100)
    b = Smooth(net.eval(), 3, 0.5, seed=0).certify(x, 10, 200, 0.01, 100)
    assert a == b
    # everything whose forward reads `training` is refused in train mode, and named
    class Custom(torch.nn.Module):
        def forward(self, z):
            return z * 2 if self.training else z

    for mod in (torch.nn.Dropout(0.1), torch.nn.BatchNorm1d(3), torch.nn.RReLU(), spectral_norm(torch.nn.Linear(3, 3)),
                torch.nn.utils.spectral_norm(torch.nn.Linear(3, 3)), Custom()):
        net = torch.nn.Sequential(torch.nn.Linear(3, 3), mod).train()
        names = [n for n, _ in mode_dependent_modules(net)]
        assert names and names[0].startswith("1"), (mod, names)
        with pytest.raises(ValueError, match=r"training mode \(submodule '1"):
            Smooth(net, 3, 0.5)
        Smooth(net.eval(), 3, 0.5)  # accepted in eval mode
    # instance norm without running statistics uses the input's statistics in both modes
    assert mode_dependent_modules(torch.nn.InstanceNorm1d(3)) == []
    assert mode_dependent_modules(torch.nn.InstanceNorm1d(3, track_running_stats=True)) != []


def test_certify_given_a_batch_says_to_use_certify_batch():
    smooth = Smooth(torch.nn.Linear(4, 3).eval(), 3, 0.5, seed=0)
    X = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"one input without a batch dimension.*certify_batch"):
        smooth.certify(X, 10, 100, 0.01, 50)
    with pytest.raises(ValueError, match=r"predict_batch"):
        smooth.predict(X, 100, 0.01, 50)
    pred, radius = smooth.certify(X[0], 10, 100, 0.01, 50)  # a single input works
    assert isinstance(pred, int) and isinstance(radius, float)


def test_nan_outputs_abstain():
    """NaN logits on every sample, or on a few, make that input abstain; others certify."""

    def base(x):
        s = x[:, 0:1].double()
        logits = torch.cat([-s, s], 1)
        return torch.where(x[:, 1:2] > 2.0, torch.nan, logits)  # NaN when coordinate 1 > 2

    X = torch.tensor([[3.0, -10.0], [3.0, 10.0], [3.0, 0.0]])  # never / always / ~2% NaN
    smooth = Smooth(base, 2, 1.0, seed=0)
    cert = smooth.certify_batch(X, 100, 2000, 0.01, 1000)
    assert cert.prediction.tolist() == [1, -1, -1]
    assert cert.radius[0] > 1.0 and cert.radius[1] == 0.0 and cert.radius[2] == 0.0
    assert cert.invalid[0] == 0 and cert.invalid[1] > 0 and cert.invalid[2] > 0
    assert not torch.isnan(cert.radius).any() and not torch.isnan(cert.p_lower).any()
    assert smooth.certify(X[2], 100, 2000, 0.01, 1000) == (-1, 0.0)
    assert smooth.predict(X[2], 2000, 0.01, 1000) == -1
    ada = smooth.certify_adaptive(X, 0.01, radius=0.5, n_max=10_000)
    assert ada.prediction.tolist() == [1, -1, -1] and ada.radius[1:].eq(0).all()

    class AbstainingHead:  # e.g. a head that returns -1 for non-finite latents
        def predict(self, z):
            return torch.where(z[:, 1] > 2.0, -1, (z[:, 0] > 0).long())

    cert = Smooth(AbstainingHead(), 2, 1.0, seed=0).certify_batch(X, 100, 2000, 0.01, 1000)
    assert cert.prediction.tolist() == [1, -1, -1]


def test_bad_base_output_and_arguments_raise():
    base = Linear(np.eye(3), np.zeros(3))
    with pytest.raises(ValueError, match="num_classes"):
        Smooth(base, 2, 0.5, seed=0).certify(torch.zeros(3), 10, 100, 0.01, 50)
    smooth = Smooth(base, 3, 0.5, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        smooth.certify(torch.zeros(3), 10, 100, 1.5, 50)
    with pytest.raises(ValueError, match="n0"):
        smooth.certify(torch.zeros(3), 0, 100, 0.01, 50)
    with pytest.raises(TypeError, match="floating"):
        smooth.certify(torch.zeros(3, dtype=torch.int64), 10, 100, 0.01, 50)
    with pytest.raises(ValueError, match="sigma"):
        Smooth(base, 3, 0.0)
    with pytest.raises(ValueError, match="schedule"):
        smooth.certify_adaptive(torch.zeros(1, 3), 0.01, n_max=1000, schedule=[100, 50, 1000])
    with pytest.raises(ValueError, match="schedule"):
        smooth.certify_adaptive(torch.zeros(1, 3), 0.01, n_max=1000, schedule=[100, 500])


def test_progress_bar_and_empty_batch(capsys):
    base = Linear(np.eye(2), np.zeros(2))
    X = torch.randn(3, 2)
    a = Smooth(base, 2, 0.5, seed=1, progress=True).certify_batch(X, 10, 300, 0.01, 64)
    b = Smooth(base, 2, 0.5, seed=1).certify_batch(X, 10, 300, 0.01, 64)
    assert torch.equal(a.counts, b.counts)
    assert "estimation" in capsys.readouterr().err
    empty = Smooth(base, 2, 0.5, seed=1).certify_batch(torch.zeros(0, 2), 10, 300, 0.01, 64)
    assert empty.prediction.shape == (0,) and empty.counts.shape == (0, 2)


# ---------------------------------------------------------------------------------------
# Adaptive sample sizes
# ---------------------------------------------------------------------------------------


def test_adaptive_with_target_radius_is_sound_and_saves_samples():
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal(4), 0.1
    base = binary_linear(w, b)
    alpha, r, n_max, n0 = 0.05, 0.25, 100_000, 100
    # Most points well inside or well outside the target, some straddling it.
    true_r = np.concatenate([
        rng.uniform(2.5 * r, 5 * r, 150),  # well inside
        rng.uniform(0.0, 0.4 * r, 150),  # well outside
        rng.uniform(0.8 * r, 1.2 * r, 40),  # hard: near the target
    ])
    X = points_at_distance(rng, w, b, true_r * rng.choice([-1, 1], len(true_r)))
    smooth = Smooth(base, 2, SIGMA, seed=21)
    cert = smooth.certify_adaptive(X, alpha, radius=r, n_max=n_max, n0=n0, batch_size=4096)
    radius, pred, samples = cert.radius.numpy(), cert.prediction.numpy(), cert.samples.numpy()
    truth = (X.numpy() @ w + b > 0).astype(int)
    wrong = (radius > true_r) | ((pred != truth) & (pred != -1))
    assert wrong.sum() <= max_failures(len(X), alpha)

    easy = slice(0, 300)
    savings = (n0 + n_max) / samples[easy].mean()
    print(f"adaptive savings vs fixed n={n_max}: {savings:.0f}x on easy inputs, "
          f"{(n0 + n_max) / samples.mean():.1f}x overall")
    assert savings >= 5
    assert np.all(radius[:150] >= r)  # decided correctly, certified at r
    assert np.all(radius[150:300] < r)

    # Every returned bound is the Clopper-Pearson bound at level alpha / m on the
    # estimation samples actually used, and stopping followed the rule.
    m = len(smoothing._checkpoints(None, n_max))
    c_a = cert.counts_selection.numpy().argmax(1)
    n_a = cert.counts.numpy()[np.arange(len(X)), c_a]
    used = samples - n0
    assert np.array_equal(cert.counts.numpy().sum(1), used)
    lo = clopper_pearson_lower(n_a, used, alpha / m)
    np.testing.assert_allclose(cert.p_lower.numpy(), lo, rtol=0, atol=0)
    _, hi = clopper_pearson_interval(n_a, used, 2 * alpha / m)
    t = stats.norm.cdf(r / SIGMA)
    early = used < n_max
    assert np.all((lo[early] >= t) | (hi[early] < t))
    assert set(used) <= set(smoothing._checkpoints(None, n_max))


def test_adaptive_without_target_converges_and_is_sound():
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal(3), 0.0
    base = binary_linear(w, b)
    alpha, n_max = 0.05, 100_000
    true_r = SIGMA * np.concatenate([rng.uniform(-0.1, 0.1, 40), rng.uniform(0.3, 1.5, 40)])
    X = points_at_distance(rng, w, b, true_r)
    cert = Smooth(base, 2, SIGMA, seed=8).certify_adaptive(X, alpha, rtol=0.1, n_max=n_max)
    radius = cert.radius.numpy()
    truth = (X.numpy() @ w + b > 0).astype(int)
    pred = cert.prediction.numpy()
    wrong = (radius > np.abs(true_r)) | ((pred != truth) & (pred != -1))
    assert wrong.sum() <= max_failures(len(X), alpha)
    assert np.all(radius[40:] > 0)
    # Inputs that stopped early did so because the radius converged to 10%: then the true
    # radius lies (w.h.p.) within the interval, so the certificate is within ~10% of it.
    samples = cert.samples.numpy()
    early = samples < 100 + n_max
    assert early[40:].sum() >= 10
    m = len(smoothing._checkpoints(None, n_max))
    n_a = cert.counts.numpy()[np.arange(len(X)), cert.counts_selection.numpy().argmax(1)]
    lo, hi = clopper_pearson_interval(n_a, samples - 100, 2 * alpha / m)
    converged = (lo > 0.5) & (stats.norm.ppf(lo) >= 0.9 * stats.norm.ppf(hi))
    assert np.all(converged[early] | (hi[early] <= 0.5))
    assert np.all(radius[40:][early[40:]] >= 0.8 * np.abs(true_r[40:][early[40:]]))
    saving = (100 + n_max) / samples[40:].mean()
    print(f"rtol=0.1 mode: {saving:.1f}x fewer samples than fixed n={n_max} on clear inputs")


def test_fused_counter_equals_unfused():
    """The Triton counter (argmax of a tied head fused with the histogram; under
    TRITON_INTERPRET on the CPU here) gives the same counts as head.predict + bincount."""
    import os

    from gmfast import GaussianMixtureHead

    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(300, 5, generator=g, dtype=torch.float64) + torch.arange(3).repeat(100)[:, None] * 1.5
    head = GaussianMixtureHead("tied").fit(Z, torch.arange(3).repeat(100))
    enc = torch.nn.Linear(5, 5).double().eval()
    X = torch.randn(4, 5, generator=g, dtype=torch.float64)
    plain = Smooth((enc, head), 3, 0.5, seed=7, fused=False).certify_batch(X, 10, 200, 0.01, 64)
    fused = Smooth((enc, head), 3, 0.5, seed=7, fused=True).certify_batch(X, 10, 200, 0.01, 64)
    assert torch.equal(plain.counts, fused.counts) and torch.equal(plain.counts_selection, fused.counts_selection)
    assert torch.equal(plain.prediction, fused.prediction) and torch.equal(plain.radius, fused.radius)
    with pytest.raises(RuntimeError, match="tied GaussianMixtureHead"):
        Smooth((enc, GaussianMixtureHead("diag").fit(Z, torch.arange(3).repeat(100))), 3, 0.5,
               fused=True).certify_batch(X, 10, 20, 0.01, 64)
