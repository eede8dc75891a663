"""gmfast.sklearn.GaussianMixtureClassifier: a scikit-learn estimator sharing the head's math."""

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import blobs, bound_reference, dense_params, linear_radius_bruteforce
from sklearn.base import clone
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import SkipTestWarning
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import gmfast
from gmfast.sklearn import GaussianMixtureClassifier as GMC

KINDS = ("tied", "full", "diag", "spherical")


def _check_estimator(est):
    with warnings.catch_warnings():
        # array-API checks skip themselves (SCIPY_ARRAY_API unset): not a failure of ours
        warnings.simplefilter("ignore", SkipTestWarning)
        results = check_estimator(est, on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])[:300]) for r in results if r["status"] == "failed"]
    assert not failed, failed
    assert sum(r["status"] == "passed" for r in results) >= 50  # the checks really ran


@pytest.mark.parametrize("kind", KINDS)
def test_check_estimator(kind):
    _check_estimator(GMC(kind))


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "emu"]), np.array([5, 7, 9]), np.array([-1.0, 2.0, 30.0]),
                                    np.array([True, False])], ids=["str", "579", "float", "bool"])
def test_any_hashable_labels(labels):
    K = len(labels)
    Z, codes = blobs(300, K, 4, seed=7)
    y = labels[codes]
    est = GMC().fit(Z, y)
    assert list(est.classes_) == sorted(labels.tolist())
    head = gmfast.GaussianMixtureHead(shrinkage="ledoit-wolf").fit(Z, np.searchsorted(est.classes_, y))
    pred = est.predict(Z)
    assert isinstance(pred, np.ndarray) and pred.dtype == est.classes_.dtype
    np.testing.assert_array_equal(pred, est.classes_[head.predict(Z).numpy()])
    np.testing.assert_allclose(est.predict_proba(Z), head.predict_proba(torch.tensor(Z)).numpy(), rtol=1e-12,
                               atol=1e-300)
    assert est.score(Z, y) == pytest.approx(np.mean(pred == y))
    assert est.score(Z, y) > 0.9
    dec = est.decision_function(Z)
    assert dec.shape == ((len(Z),) if K == 2 else (len(Z), K))
    if K == 2:
        np.testing.assert_array_equal(est.classes_[(dec > 0).astype(int)], pred)
    else:
        np.testing.assert_array_equal(est.classes_[dec.argmax(1)], pred)


@pytest.mark.parametrize("kind,norm", [(k, 2) for k in KINDS] + [("tied", math.inf), ("tied", 1)])
def test_certify_radii_equal_the_heads(kind, norm):
    Z, y = blobs(400, 3, 5, seed=11, per_class_cov=True)
    names = np.array(["a", "b", "c"])
    est = GMC(kind, shrinkage=0.1).fit(Z, names[y])
    head = gmfast.GaussianMixtureHead(kind, shrinkage=0.1).fit(Z, y)
    cert = head.certify(torch.tensor(Z), norm=norm)
    r = est.certify(Z, norm=norm)
    assert isinstance(r, np.ndarray) and r.dtype == np.float64
    np.testing.assert_array_equal(r, cert.radius.numpy())
    pred, r2 = est.certify(Z, norm=norm, return_prediction=True)
    np.testing.assert_array_equal(pred, names[cert.prediction.numpy()])
    np.testing.assert_array_equal(r2, r)


def test_pipeline_clone_cross_val_grid_search():
    X, y = make_classification(400, 12, n_informative=6, n_redundant=3, n_classes=3, random_state=0)
    pipe = make_pipeline(StandardScaler(), GMC())
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.6
    c = clone(pipe)
    assert c.get_params()["gaussianmixtureclassifier__shrinkage"] == "auto"
    c.set_params(gaussianmixtureclassifier__covariance_type="full")
    assert c[-1].covariance_type == "full" and not hasattr(c[-1], "head_")
    grid = GridSearchCV(pipe, {"gaussianmixtureclassifier__shrinkage": ["auto", 0.1, 0.5],
                               "gaussianmixtureclassifier__covariance_type": ["tied", "full"]}, cv=3).fit(X, y)
    assert len(grid.cv_results_["params"]) == 6
    best = grid.best_estimator_
    # certify through the pipeline: radii in the scaled units the classifier sees
    r = best[-1].certify(best[:-1].transform(X))
    assert r.shape == (400,) and (r >= 0).all() and (r > 0).mean() > 0.5


def test_pickle_round_trip():
    Z, y = blobs(200, 3, 4, seed=12)
    est = GMC("full").fit(Z, np.array(["x", "y", "z"])[y])
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.predict(Z), est.predict(Z))
    np.testing.assert_array_equal(back.certify(Z), est.certify(Z))


def _tied_reference_radii(est, X):
    """Exact l2 radii of the stored tied classifier, from its means/covariance/priors in
    float64 numpy (np.linalg.solve, not gmfast's derived parameters)."""
    mu, cov, pri = est.means_, est.covariance_, est.priors_
    W = np.linalg.solve(cov, mu.T).T
    b = np.log(pri) - 0.5 * (W * mu).sum(1)
    return linear_radius_bruteforce(X, W, b, 2)[:2]


@pytest.mark.parametrize("data", ["digits", "redundant"])
def test_default_fits_rank_deficient_data_and_certifies_soundly(data):
    if data == "digits":
        X, y = load_digits(return_X_y=True)  # constant pixels: the ML covariance is singular
        X, y = X[:600], y[:600]
    else:
        X, y = make_classification(500, 20, n_informative=5, n_redundant=5, random_state=0)
    with pytest.raises(ValueError, match="singular"):
        gmfast.GaussianMixtureHead(shrinkage=0.0).fit(X, y)  # the maximum-likelihood covariance
    est = GMC().fit(X, y)  # the defaults just work (sklearn's LDA does too)
    assert 0 < est.shrinkage_ < 1
    assert est.score(X, y) > 0.8
    r = est.certify(X)
    pred = est.predict(X)
    ref_pred, ref_r = _tied_reference_radii(est, X)
    ok = ref_r > 1e-6 * np.abs(X).max()  # rows not within float64 noise of a boundary
    np.testing.assert_array_equal(pred[ok], est.classes_[ref_pred[ok]])
    assert (r <= ref_r * (1 + 1e-9)).all()  # sound: never above the exact radius
    np.testing.assert_allclose(r[ok], ref_r[ok], rtol=1e-4)  # and tight (tied is exact)
    # attack: a step of 1.001 R along the worst direction of the binding pair flips the prediction
    mu, cov = est.means_, est.covariance_
    W = np.linalg.solve(cov, mu.T).T
    i = int(np.flatnonzero(ok)[0])
    c = int(np.searchsorted(est.classes_, pred[i]))
    logits = W @ X[i] + np.log(est.priors_) - 0.5 * (W * mu).sum(1)
    gaps = [((logits[c] - logits[j]) / np.linalg.norm(W[c] - W[j]), j) for j in range(len(mu)) if j != c]
    _, j = min(gaps)
    u = (W[j] - W[c]) / np.linalg.norm(W[j] - W[c])
    assert est.predict((X[i] + 1.001 * r[i] * u)[None])[0] != pred[i]
    assert est.predict((X[i] + 0.999 * r[i] * u)[None])[0] == pred[i]


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
def test_default_per_class_types_on_digits(kind):
    X, y = load_digits(return_X_y=True)
    X, y = X[:900], y[:900]
    est = GMC(kind).fit(X, y)
    assert est.score(X, y) > 0.7
    r = est.certify(X[:60])
    _, ref_r = bound_reference(X[:60], *dense_params(est.head_))
    assert (r <= ref_r * (1 + 1e-9)).all() and (r > 0).any()


def test_errors_say_what_to_do():
    Z, y = blobs(100, 2, 3, seed=1)
    with pytest.raises(ValueError, match="shrinkage must be 'auto'"):
        GMC(shrinkage="sometimes").fit(Z, y)
    with pytest.raises(ValueError, match="covariance_type"):
        GMC("banana").fit(Z, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        GMC().fit(Z, np.zeros(100))
    est = GMC().fit(Z, y)
    with pytest.raises(ValueError, match="3 features"):
        est.predict(Z[:, :2])
    with pytest.raises(ValueError, match="overflow"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est.predict(np.full((1, 3), 1.7e308))
    # the torch head's own label errors point here
    with pytest.raises(TypeError, match="gmfast.sklearn.GaussianMixtureClassifier"):
        gmfast.GaussianMixtureHead().fit(Z, np.array(["a", "b"])[y])
    with pytest.raises(ValueError, match="return_inverse"):
        gmfast.GaussianMixtureHead().fit(Z, np.array([5, 9])[y])
