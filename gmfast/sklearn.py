"""A scikit-learn estimator around :class:`gmfast.GaussianMixtureHead`.

:class:`GaussianMixtureClassifier` is the head for numpy users: any hashable labels
(``classes_``), numpy in and out, ``score``, ``decision_function``, ``predict_proba``,
parameters for ``clone``/``Pipeline``/``GridSearchCV``, and ``certify`` returning certified
radii. It fits one :class:`~gmfast.GaussianMixtureHead` (``head_``) and calls it, so the
math, the kernels and the soundness argument are the head's; the estimator only encodes
labels, validates input the scikit-learn way and converts results to numpy.

Torch users keep the ``nn.Module`` head (differentiable, device-aware, certificates as
tensors).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)

from gmfast._shrinkage import parse_shrinkage
from gmfast._validate import NonFiniteWarning

__all__ = ["GaussianMixtureClassifier"]


def _writable(X: np.ndarray) -> np.ndarray:
    """A C-contiguous array torch can wrap: read-only inputs (memmaps) are copied."""
    X = np.ascontiguousarray(X)
    return X if X.flags.writeable else X.copy()


class GaussianMixtureClassifier(ClassifierMixin, BaseEstimator):
    """Gaussian class-conditional classifier (LDA/QDA family) with certified radii.

    Fits ``N(μ_k, Σ_k)`` per class and predicts with the Bayes rule, like scikit-learn's
    ``LinearDiscriminantAnalysis`` (``tied``) and ``QuadraticDiscriminantAnalysis``
    (``full``). :meth:`certify` returns, per row, a radius ``R`` such that no perturbation
    ``δ`` of the row with ``‖δ‖ < R`` changes the prediction (exact for ``tied``, a sound
    lower bound otherwise; floating-point rounding included).

    Parameters
    ----------
    covariance_type : {"tied", "full", "diag", "spherical"}, default="tied"
    shrinkage : "auto", "ledoit-wolf" or float in [0, 1], default="auto"
        ``Σ ← (1−λ)Σ + λ (tr Σ/d) I``. ``"auto"`` is Ledoit–Wolf (``tied``, ``full``) or the
        Ledoit–Wolf intensity of the pooled residuals (``diag``, ``spherical``), so
        rank-deficient data (constant or redundant features) fits. ``0`` is the
        maximum-likelihood covariance (as ``LinearDiscriminantAnalysis``' default).
    priors : {"empirical", "uniform"}, default="empirical"
    backend : {"auto", "reference", "cpu", "triton", "cuda"}, default="auto"

    Attributes
    ----------
    classes_ : ndarray (K,)
        The labels seen in ``fit``, sorted; column ``k`` of every output is ``classes_[k]``.
    head_ : GaussianMixtureHead
        The fitted head (labels ``0..K-1`` index ``classes_``).
    shrinkage_ : float or ndarray (K,)
        The intensity used.
    means_ : ndarray (K, d);  covariance_ : (d, d), ``tied`` only;  priors_ : (K,)
    n_features_in_ : int;  feature_names_in_ : ndarray, when ``X`` had column names

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> clf = make_pipeline(StandardScaler(), GaussianMixtureClassifier()).fit(X, y)  # doctest: +SKIP
    >>> radii = clf[-1].certify(clf[:-1].transform(X))  # doctest: +SKIP
    """

    def __init__(self, covariance_type="tied", shrinkage="auto", priors="empirical", backend="auto"):
        self.covariance_type = covariance_type
        self.shrinkage = shrinkage
        self.priors = priors
        self.backend = backend

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y):
        """Fit on ``X`` (n, d) and labels ``y`` (n,) of any hashable type; returns self."""
        from gmfast.head import GaussianMixtureHead

        X, y = _validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2)
        X = _writable(X)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"a classifier needs at least 2 classes; y has only one: {self.classes_[0]!r}")
        codes = codes.reshape(-1).astype(np.int64)
        self.head_ = GaussianMixtureHead(self.covariance_type, shrinkage=parse_shrinkage(self.shrinkage), priors=self.priors,
                                         num_classes=len(self.classes_), backend=self.backend).fit(X, codes)
        lam = self.head_.shrinkage_
        self.shrinkage_ = lam if isinstance(lam, float) else lam.numpy().copy()
        return self

    def __getstate__(self):
        # the head holds a lock and a kernel cache: pickle its fitted float64 parameters
        # instead (what GaussianMixtureHead.save writes) and rebuild it on load
        state = self.__dict__.copy()
        head = state.pop("head_", None)
        if head is not None:
            state["_head_state"] = dict(
                covariance_type=head.covariance_type, shrinkage=head.shrinkage, priors=head.priors,
                num_classes=head.num_classes, backend=head.backend,
                params={k: v.clone() for k, v in head._fitted().items() if isinstance(v, torch.Tensor)})
        return state

    def __setstate__(self, state):
        from gmfast.head import GaussianMixtureHead
        from gmfast._validate import validated_params

        hs = state.pop("_head_state", None)
        self.__dict__.update(state)
        if hs is not None:
            head = GaussianMixtureHead(hs["covariance_type"], shrinkage=hs["shrinkage"], priors=hs["priors"],
                                       num_classes=hs["num_classes"], backend=hs["backend"])
            head._set_params(validated_params(hs["params"], hs["covariance_type"]))
            self.head_ = head

    # ------------------------------------------------------------------ attributes

    @property
    def means_(self) -> np.ndarray:
        check_is_fitted(self)
        return self.head_.means_.numpy()

    @property
    def covariance_(self) -> np.ndarray:
        check_is_fitted(self)
        return self.head_.covariance_.numpy()

    @property
    def priors_(self) -> np.ndarray:
        check_is_fitted(self)
        return self.head_.priors_.numpy()

    # ------------------------------------------------------------------ evaluation

    def _check(self, X) -> torch.Tensor:
        check_is_fitted(self)
        X = _validate_data(self, X, dtype=np.float64, reset=False)
        return torch.from_numpy(_writable(X))

    def _certificate(self, Z, norm, need_radius):
        """Run the head; rows whose logits overflow are an error here (scikit-learn has no
        abstention): scale the features, e.g. with StandardScaler."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWarning)
            if need_radius:
                cert = self.head_.certify(Z, norm=norm)
                pred, rad = cert.prediction, cert.radius
            else:
                pred, rad = self.head_.predict(Z), None
        bad = np.flatnonzero(pred.numpy() < 0)
        if bad.size:
            raise ValueError(f"{bad.size} row(s) of X (first: row {int(bad[0])}) are so large that their "
                             "log-likelihoods overflow; scale the features (e.g. StandardScaler)")
        return pred.numpy(), rad

    def predict(self, X) -> np.ndarray:
        """Predicted labels (n,), elements of ``classes_``."""
        pred, _ = self._certificate(self._check(X), 2, need_radius=False)
        return self.classes_[pred]

    def predict_log_proba(self, X) -> np.ndarray:
        """Posterior log-probabilities (n, K), columns in ``classes_`` order."""
        Z = self._check(X)
        return self.head_.predict_log_proba(Z).numpy()

    def predict_proba(self, X) -> np.ndarray:
        """Posterior probabilities (n, K), columns in ``classes_`` order."""
        return np.exp(self.predict_log_proba(X))

    def decision_function(self, X) -> np.ndarray:
        """Posterior log-probabilities (n, K); for two classes the log-odds of ``classes_[1]`` (n,)."""
        logp = self.predict_log_proba(X)
        return logp[:, 1] - logp[:, 0] if logp.shape[1] == 2 else logp

    def certify(self, X, norm=2, *, return_prediction: bool = False):
        """Certified radii of ``X`` (n, d): no ``δ`` with ``‖δ‖ < R`` changes the prediction.

        Parameters
        ----------
        norm : 2 | 1 | float("inf") | "mahalanobis"
            Threat model, in the units of ``X`` as given to this estimator (inside a
            ``Pipeline``, after the preceding steps). ``tied`` certifies all four exactly,
            the per-class covariance types ``2``.
        return_prediction : bool
            Also return the predicted labels.

        Returns
        -------
        radius : ndarray (n,) float64, lower bounds on the exact radii (``0``: not
        certified); or ``(prediction, radius)`` with ``return_prediction=True``.
        """
        pred, rad = self._certificate(self._check(X), norm, need_radius=True)
        rad = rad.numpy().astype(np.float64, copy=False)
        return (self.classes_[pred], rad) if return_prediction else rad
