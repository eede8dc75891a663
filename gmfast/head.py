"""``GaussianMixtureHead``: one Gaussian per class on latents, Bayes rule, certified radii."""

from __future__ import annotations

import threading

import torch
from torch import nn

from gmfast._fp import round_down_to
from gmfast._validate import (
    COVARIANCE_TYPES,
    CURVATURES,
    ON_NONFINITE,
    PRIORS,
    NotFittedError,
    as_float_matrix,
    as_labels,
    canonical_norm,
    check_choice,
    check_finite_fit,
    report_abstentions,
    validated_params,
)
from gmfast.certificate import Certificate
from gmfast.io import invalid_file, read_head_file, write_head_file
from gmfast.ops import BACKENDS
from gmfast.ops import certify as ops
from gmfast.params import (perclass_log_joint, prepare_perclass, prepare_tied, tied_linear_logits, tied_log_joint,
                           working_dtype)
from gmfast.stats import SufficientStats, finalize_params

__all__ = ["StatisticalHead", "GaussianMixtureHead", "COVARIANCE_TYPES", "PRIORS", "CURVATURES"]


class StatisticalHead(nn.Module):
    """Base of heads fitted by statistics rather than gradients.

    They have no training-time behaviour, so they always report eval mode (wrappers that
    refuse train-mode modules, such as randomized smoothing, accept them), and a property's
    own AttributeError (not fitted, wrong covariance type) reaches the user instead of
    ``nn.Module``'s generic "has no attribute".

    The base owns the fitted state and what is derived from it, for every head:

    * ``_state``: a dict, ``None`` until fitted; every head stores ``priors`` (K,),
      ``n_features``, ``shrinkage`` and ``classifier`` (the float64 derived parameters of
      the certified classifier) in it. :meth:`_set_state` replaces it.
    * the working copies of the classifier, one per ``(device, dtype)``, built on first use
      by :meth:`_working_copy` (which a head overrides to say what its kernels take) and
      cached; concurrent callers build each copy once (double-checked under a lock), and
      :meth:`_set_state` drops them all.
    """

    #: how to fit this head, for the not-fitted error
    _how_to_fit = "call fit(Z, y)"

    def __init__(self):
        super().__init__()
        self._state = None
        self._work = {}  # (device, dtype) -> working copy of the classifier
        self._lock = threading.Lock()

    def train(self, mode: bool = True):
        return super().train(False)

    def __getstate__(self):
        # copy/pickle: a lock cannot be copied, and the working copies are a cache
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_work"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def __getattr__(self, name):
        # An AttributeError raised inside a property makes Python fall back to
        # nn.Module.__getattr__, which would replace our message: run the property again.
        prop = getattr(type(self), name, None)
        if isinstance(prop, property):
            return prop.fget(self)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ state

    def _fitted(self) -> dict:
        if self._state is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; {self._how_to_fit}")
        return self._state

    def _set_state(self, state: dict | None) -> None:
        with self._lock:
            self._state = state
            self._work = {}

    def _working_copy(self, device: torch.device, dtype: torch.dtype):
        """The classifier in ``dtype`` on ``device`` (heads whose kernels take more override)."""
        return self._state["classifier"].to(device, dtype)

    def _cached_copy(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        work = self._work.get(key)
        if work is None:
            with self._lock:
                work = self._work.get(key)
                if work is None:
                    work = self._working_copy(device, dtype)
                    self._work[key] = work
        return work

    def _prepare(self, Z):
        """Validate ``Z``; return (Z in its working dtype, working copy, Z's own dtype).

        A float32 copy whose parameters do not round to float32 with a relative error
        (subnormal or overflowing values: ``cast_ok`` false, docs/DESIGN.md §1.5.3) defines a
        different classifier, so such heads work in float64 (the input is exact there)."""
        self._fitted()
        Z = as_float_matrix(Z, "Z", n_features=self.n_features_in_)
        T = working_dtype(Z)
        work = self._cached_copy(Z.device, T)
        if T != torch.float64 and not getattr(work, "cast_ok", True):
            T = torch.float64
            work = self._cached_copy(Z.device, T)
        return Z.to(T), work, Z.dtype

    def prepared(self, Z):
        """``Z`` as the head's kernels take it: ``(Z_work, work, in_dtype)``.

        ``Z`` (n, d) is validated (a floating matrix with ``n_features_in_`` columns) and cast
        to the working dtype (float64 for float64 input, or where the float32 copy of the
        parameters would define a different classifier, docs/DESIGN.md §1.5.3); ``work`` is
        the cached working copy of the classifier in that dtype on ``Z``'s device (for a tied
        head its ``A`` (K, d) and ``beta`` (K,)), and ``in_dtype`` is ``Z``'s own dtype. For
        code that runs its own kernel on the head's classifier (randomized smoothing's fused
        counting) exactly as :meth:`forward` would."""
        return self._prepare(Z)

    # ------------------------------------------------------------------ attributes

    @property
    def priors_(self) -> torch.Tensor:
        return self._fitted()["priors"]

    @property
    def shrinkage_(self):
        lam = self._fitted()["shrinkage"]
        return float(lam) if isinstance(lam, torch.Tensor) and lam.dim() == 0 else lam

    @property
    def n_features_in_(self) -> int:
        return int(self._fitted()["n_features"])

    @property
    def n_classes_(self) -> int:
        return int(self._fitted()["priors"].shape[0])

    @property
    def classifier_params(self):
        """The float64 derived parameters that define the certified classifier."""
        return self._fitted()["classifier"]


class GaussianMixtureHead(StatisticalHead):
    """Gaussian class-conditional classifier with closed-form certified radii.

    Fits ``N(μ_k, Σ_k)`` per class on latents ``z`` and classifies with the Bayes rule
    ``argmax_k log π_k + log N(z; μ_k, Σ_k)``. ``certify`` returns, per row, a radius ``R``
    such that no perturbation ``δ`` of the latent with ``‖δ‖ < R`` changes the prediction:
    exact for ``tied`` (shared covariance: linear boundaries), a sound lower bound for the
    per-class types. Radii are lower bounds on the true ones including floating-point
    rounding (``fp_sound=True``, the default).

    Parameters
    ----------
    covariance_type : {"tied", "full", "diag", "spherical"}
        As in scikit-learn's ``GaussianMixture``: one pooled covariance (LDA), one full
        covariance per class (QDA), diagonal per class, or ``σ_k² I`` per class.
    shrinkage : "auto" (default), "ledoit-wolf" or float in [0, 1]
        ``Σ ← (1−λ)Σ + λ (tr Σ/d) I``. ``"auto"`` and ``"ledoit-wolf"`` pick ``λ`` by
        Ledoit & Wolf (2004): ``tied`` on the class-centred residuals, ``full`` per class,
        ``diag``/``spherical`` the pooled (``tied``) intensity for every class. So the first
        fit works on rank-deficient data (constant pixels, redundant features); ``0.0`` is
        the maximum-likelihood fit (LDA/QDA). Radii certify the stored classifier whatever
        ``λ`` is (docs/DESIGN.md §1.1). Memory while fitting: ``K·d²`` for ``"auto"``
        (the per-class scatter and fourth moments), ``d²`` or ``K·d`` for a float.
    priors : {"empirical", "uniform"}
    num_classes : int, optional
        Number of classes ``K`` (labels are ``0..K-1``). Inferred from the labels if omitted.
    backend : {"auto", "reference", "cpu", "triton", "cuda"}
        Default kernel backend for ``predict``/``certify``.

    Attributes (after ``fit``)
    --------------------------
    means_ : (K, d) float64
    covariance_ : (d, d) float64, ``tied`` only
    covariances_ : (d, d) tied, (K, d, d) full, (K, d) diag, (K,) spherical
    priors_ : (K,) float64
    counts_ : (K,) float64, samples seen per class
    shrinkage_ : float (tied) or (K,) tensor: the intensity used
    n_features_in_ : int;  n_classes_ : int
    """

    _how_to_fit = "call fit(Z, y) or partial_fit(...) then finalize()"

    def __init__(self, covariance_type: str = "tied", shrinkage="auto", priors: str = "empirical", *,
                 num_classes: int | None = None, backend: str = "auto"):
        super().__init__()
        check_choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        check_choice("priors", priors, PRIORS)
        check_choice("backend", backend, BACKENDS)
        if isinstance(shrinkage, str):
            check_choice("shrinkage", shrinkage, ("auto", "ledoit-wolf"))
        elif isinstance(shrinkage, bool) or not (isinstance(shrinkage, (int, float))
                                                  and 0.0 <= float(shrinkage) <= 1.0):
            raise ValueError(f"shrinkage must be 'auto', 'ledoit-wolf' or a float in [0, 1]; got {shrinkage!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        self.covariance_type = covariance_type
        self.shrinkage = shrinkage
        self.priors = priors
        self.num_classes = num_classes
        self.backend = backend
        self._stats = None  # sufficient statistics while fitting
        self.train(False)

    # ------------------------------------------------------------------ fitting

    def _new_stats(self, d: int) -> SufficientStats:
        lw = self.shrinkage in ("auto", "ledoit-wolf")
        if self.covariance_type == "tied" and not lw:
            kind = "pooled"
        elif self.covariance_type in ("diag", "spherical") and not lw:
            kind = "diag"
        else:
            kind = "per_class"
        return SufficientStats(d, kind, fourth_moments=lw)

    def partial_fit(self, Z, y) -> "GaussianMixtureHead":
        """Accumulate a batch of latents ``Z`` (n, d) with labels ``y`` (n,); returns self.

        Statistics are float64 and merged stably (Chan et al.), so any batching gives the
        same fit as one call, up to float64 rounding. Call :meth:`finalize` when done.
        """
        d = self._stats.d if self._stats is not None else None
        Z = as_float_matrix(Z, "Z", n_features=d)
        y = as_labels(y, Z.shape[0])
        if self.num_classes is not None and y.numel() and int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must be < num_classes={self.num_classes}; got label {int(y.max())}")
        check_finite_fit(Z)
        if self._stats is None:
            self._stats = self._new_stats(Z.shape[1])
        self._stats.update(Z.detach(), y)
        self._set_state(None)
        return self

    def finalize(self) -> "GaussianMixtureHead":
        """Turn the accumulated statistics into the fitted classifier; returns self."""
        if self._stats is None:
            raise NotFittedError("finalize() called before any partial_fit(Z, y)")
        params = finalize_params(self._stats, self.covariance_type, self.shrinkage, self.priors,
                                     self.num_classes)
        self._set_params(params)
        return self

    def fit(self, Z, y) -> "GaussianMixtureHead":
        """Fit on latents ``Z`` (n, d) and labels ``y`` (n,) in ``0..K-1``; returns self."""
        self._stats = None
        return self.partial_fit(Z, y).finalize()

    @property
    def statistics(self) -> SufficientStats | None:
        """The float64 sufficient statistics accumulated by :meth:`partial_fit` (``None``
        before the first batch). :meth:`finalize` turns them into the fitted classifier; in
        distributed fitting each rank merges them across ranks first
        (``statistics.allreduce_()``, see :func:`gmfast.fit.fit_head`)."""
        return self._stats

    @classmethod
    def from_params(cls, means, covariance, priors, covariance_type: str = "tied", *,
                    backend: str = "auto") -> "GaussianMixtureHead":
        """Build a fitted head from explicit parameters (float64 copies are taken).

        ``means`` (K, d); ``covariance`` (d, d) for tied, (K, d, d) full, (K, d) diag,
        (K,) spherical; ``priors`` (K,) positive, summing to 1. Validated like a loaded file.
        """
        # straight to float64: a python list would otherwise become float32 first
        f64 = lambda t: torch.as_tensor(t, dtype=torch.float64, device="cpu").detach().clone()  # noqa: E731
        means, covariance, priors = f64(means), f64(covariance), f64(priors)
        if covariance_type in ("tied", "full") and covariance.dim() >= 2:
            # a covariance computed as X Xᵀ is symmetric only up to rounding: accept that much
            asym = (covariance - covariance.transpose(-1, -2)).abs().amax()
            if float(asym) > 1e-10 * float(covariance.abs().amax()):
                raise ValueError(f"covariance is not symmetric (max |Σ − Σᵀ| = {float(asym):.3g})")
            covariance = 0.5 * (covariance + covariance.transpose(-1, -2))
        K = means.shape[0] if means.dim() == 2 else 0
        params = dict(means=means, covariance=covariance, priors=priors, counts=torch.ones(K, dtype=torch.float64),
                      shrinkage=torch.zeros(() if covariance_type == "tied" else (K,), dtype=torch.float64))
        head = cls(covariance_type, backend=backend, num_classes=max(K, 2))
        head._set_params(validated_params(params, covariance_type))
        return head

    def _set_params(self, params: dict) -> None:
        if self.covariance_type == "tied":
            derived = prepare_tied(params["means"], params["covariance"], params["priors"])
        else:
            derived = prepare_perclass(self.covariance_type, params["means"], params["covariance"],
                                           params["priors"])
        parts = (derived.A, derived.beta) if self.covariance_type == "tied" else (derived.prec, derived.kappa,
                                                                                  derived.prec_mu)
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            raise ValueError("the classifier derived from these parameters is not finite (variances too small?)")
        self._set_state(dict(params, n_features=int(params["means"].shape[1]), classifier=derived))

    # ------------------------------------------------------------------ attributes

    @property
    def means_(self) -> torch.Tensor:
        return self._fitted()["means"]

    @property
    def covariance_(self) -> torch.Tensor:
        if self.covariance_type != "tied":
            raise AttributeError(
                f"covariance_ exists for covariance_type='tied'; this head is {self.covariance_type!r}: "
                "use covariances_"
            )
        return self._fitted()["covariance"]

    @property
    def covariances_(self) -> torch.Tensor:
        return self._fitted()["covariance"]

    @property
    def counts_(self) -> torch.Tensor:
        return self._fitted()["counts"]

    def extra_repr(self) -> str:
        fitted = "" if self._state is None else f", n_features={self.n_features_in_}, n_classes={self.n_classes_}"
        return f"covariance_type={self.covariance_type!r}, shrinkage={self.shrinkage!r}, priors={self.priors!r}{fitted}"

    # ------------------------------------------------------------------ evaluation

    def forward(self, Z) -> torch.Tensor:
        """Log-joint ``log π_k + log N(z; μ_k, Σ_k)``, shape (B, K), differentiable in ``Z``.

        Computed in ``Z``'s working precision (float32 unless ``Z`` is float64).
        """
        Zt, work, _ = self._prepare(Z)
        if self.covariance_type == "tied":
            return tied_log_joint(Zt, work)
        return perclass_log_joint(Zt, work)

    def _scores(self, Z) -> torch.Tensor:
        """Logits up to a per-row constant: the linear ``ℓ`` for tied, the log-joint otherwise."""
        Zt, work, _ = self._prepare(Z)
        if self.covariance_type == "tied":
            return tied_linear_logits(Zt, work)
        return perclass_log_joint(Zt, work)

    def predict_log_proba(self, Z) -> torch.Tensor:
        """Posterior log-probabilities (B, K) via a max-shifted log-sum-exp."""
        return torch.log_softmax(self._scores(Z), dim=1)

    def predict_proba(self, Z) -> torch.Tensor:
        """Posterior probabilities ``softmax(f)`` (B, K)."""
        return torch.softmax(self._scores(Z), dim=1)

    def predict(self, Z, *, backend: str | None = None) -> torch.Tensor:
        """Predicted class (B,) int64; ``-1`` for rows with NaN/Inf (with a warning)."""
        return self._run(Z, norm=2, fp_sound=False, need_radius=False, backend=backend,
                         on_nonfinite="abstain", curvature="auto").prediction

    def certify(self, Z, norm=2, *, fp_sound: bool = True, backend: str | None = None,
                on_nonfinite: str = "abstain", curvature: str = "auto") -> Certificate:
        """Predictions and certified radii for latents ``Z`` (B, d).

        Parameters
        ----------
        norm : 2 | 1 | float("inf") | "mahalanobis"
            Threat model ``‖δ‖_p < R`` in latent space. ``tied`` certifies all four exactly
            (Mahalanobis: ``δᵀΣ⁻¹δ < R²``); the per-class types certify ``2``.
        fp_sound : bool
            Lower every radius by a rigorous bound on the rounding error of its
            computation, so it never exceeds the exact radius (DESIGN 1.5).
        backend : str, optional
            Overrides the head's ``backend``.
        on_nonfinite : {"abstain", "raise"}
            Rows with NaN/Inf get prediction -1 and radius 0 (with a warning), or raise.
        curvature : {"auto", "exact", "weyl"}
            ``full`` only: how ``λ_max(P_c − P_j)`` is bounded (see
            :func:`gmfast.params.curvature_table`).

        Returns
        -------
        Certificate with ``prediction`` (B,) int64 and ``radius`` (B,) in ``Z``'s float
        dtype (float32 for half inputs), rounded down, on ``Z``'s device.
        """
        return self._run(Z, norm=norm, fp_sound=fp_sound, need_radius=True, backend=backend,
                         on_nonfinite=on_nonfinite, curvature=curvature)

    def _run(self, Z, *, norm, fp_sound, need_radius, backend, on_nonfinite, curvature) -> Certificate:
        check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        check_choice("curvature", curvature, CURVATURES)
        norm = canonical_norm(norm)
        if self.covariance_type != "tied" and norm != 2:
            raise ValueError(
                f"covariance_type={self.covariance_type!r} certifies norm=2 only; got norm={norm!r} "
                "(use covariance_type='tied' for l1, l-inf and Mahalanobis radii)"
            )
        Zt, work, in_dtype = self._prepare(Z)
        out_dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
        backend = self.backend if backend is None else backend
        # No pass over Z for NaN/Inf first (it would cost as much as the kernel on skinny
        # shapes): every backend returns prediction -1 and radius 0 for a row whose logits
        # are not all finite, which a NaN or Inf input always makes them. The abstained rows
        # are then told apart: non-finite input (warn or raise) or overflow.
        if self.covariance_type == "tied":
            pred, radius = ops.tied_certify(Zt, work, norm, fp_sound=fp_sound, need_radius=need_radius,
                                            backend=backend)
        else:
            pred, radius = ops.perclass_certify(Zt, work, fp_sound=fp_sound, need_radius=need_radius,
                                                backend=backend, curvature=curvature)
        if pred.numel() and int(pred.min()) < 0:  # a reduction first: nonzero costs more on a batch
            report_abstentions(Zt, (pred < 0).nonzero().reshape(-1), on_nonfinite)
        if radius is not None:
            radius = round_down_to(radius, out_dtype)
        return Certificate(prediction=pred, radius=radius, norm=norm)

    # ------------------------------------------------------------------ files

    def save(self, path) -> None:
        """Write the fitted head to ``path`` (safetensors + JSON metadata, no pickle; see
        :mod:`gmfast.io`)."""
        write_head_file(path, self._fitted(), covariance_type=self.covariance_type, shrinkage=self.shrinkage,
                        priors=self.priors)

    @classmethod
    def load(cls, path, *, backend: str = "auto") -> "GaussianMixtureHead":
        """Read a head written by :meth:`save`; every field is validated before use."""
        settings, params = read_head_file(path)
        head = cls(settings["covariance_type"], shrinkage=settings["shrinkage"], priors=settings["priors"],
                   num_classes=settings["n_classes"], backend=backend)
        try:
            head._set_params(params)
        except ValueError as exc:
            raise invalid_file(path, str(exc)) from None
        return head
