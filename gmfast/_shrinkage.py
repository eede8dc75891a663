"""``shrinkage="auto"``: a covariance estimate that exists on rank-deficient data.

Raw features are often rank-deficient: constant pixels (scikit-learn's digits), redundant
columns (``make_classification(n_redundant > 0)``), more features than samples. The
maximum-likelihood covariance is then singular and the Bayes rule is undefined. ``"auto"``
(the default of the head, the estimator and ``gmfast fit``) is resolved by the head at fit
time (:func:`gmfast.stats.finalize_params`):

* Ledoit–Wolf (2004) for ``tied`` (on the class-centred residuals) and ``full`` (per class);
* for ``diag`` and ``spherical``, the intensity Ledoit–Wolf picks for the pooled
  class-centred residuals (the ``tied`` estimate's intensity), applied to every class's
  variances, so a feature that is constant within a class gets a positive variance.

Why the certificate stays sound: a radius is a statement about the classifier the head
stores (its float64 means, covariances and priors, after shrinkage), evaluated at the test
point; the radius computation takes those parameters as given and never assumes they
are the maximum-likelihood ones. How the shrinkage intensity was chosen, even from the
training data, changes which classifier is certified, not whether its radii are lower
bounds. Test points play no part in the choice.

:func:`parse_shrinkage` reads the value from the command line and the estimator's
parameters; it is kept free of scikit-learn so the command line does not need it.
"""

from __future__ import annotations

SHRINKAGE_HELP = "'auto' (Ledoit-Wolf), 'ledoit-wolf', or a float in [0, 1]"


def parse_shrinkage(value):
    """``"auto"``, ``"ledoit-wolf"`` or a float in [0, 1] (strings such as ``"0.1"`` too)."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("auto", "ledoit-wolf", "ledoit_wolf", "lw"):
            return "auto" if low == "auto" else "ledoit-wolf"
        try:
            value = float(low)
        except ValueError:
            raise ValueError(f"shrinkage must be {SHRINKAGE_HELP}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"shrinkage must be {SHRINKAGE_HELP}; got {value!r}")
    return float(value)
