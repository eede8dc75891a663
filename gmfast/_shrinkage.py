"""``shrinkage="auto"``: a covariance estimate that exists on rank-deficient data.

Raw features are often rank-deficient: constant pixels (scikit-learn's digits), redundant
columns (``make_classification(n_redundant > 0)``), more features than samples. The
maximum-likelihood covariance is then singular and the Bayes rule is undefined. ``"auto"``
resolves, at fit time, to

* ``"ledoit-wolf"`` for ``tied`` and ``full`` (Ledoit & Wolf 2004, computed by the head:
  on the class-centred residuals for ``tied``, per class for ``full``);
* for ``diag`` and ``spherical``, the float intensity Ledoit–Wolf picks for the pooled
  class-centred residuals (the ``tied`` estimate's intensity), applied to every class's
  variances, so a feature that is constant within a class gets a positive variance.

Why the certificate stays sound: a radius is a statement about the classifier the head
stores (its float64 means, covariances and priors, after shrinkage), evaluated at the test
point; the radius computation takes those parameters as given and never assumes they
are the maximum-likelihood ones. How the shrinkage intensity was chosen, even from the
training data, changes which classifier is certified, not whether its radii are lower
bounds. Test points play no part in the choice.

Used by :class:`gmfast.sklearn.GaussianMixtureClassifier` and ``gmfast fit``; kept free of
scikit-learn so the command line does not need it.
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


def resolve_shrinkage(shrinkage, covariance_type: str, Z, y):
    """The value to hand :class:`gmfast.GaussianMixtureHead` for ``shrinkage``.

    ``Z`` (n, d) and ``y`` (n,) labels ``0..K-1`` are the training data; they are read
    only when ``shrinkage == "auto"`` and the covariance type is ``diag``/``spherical``.
    """
    shrinkage = parse_shrinkage(shrinkage)
    if shrinkage != "auto":
        return shrinkage
    if covariance_type in ("tied", "full"):
        return "ledoit-wolf"
    from gmfast.head import GaussianMixtureHead

    try:
        return GaussianMixtureHead("tied", shrinkage="ledoit-wolf").fit(Z, y).shrinkage_
    except ValueError as exc:
        raise ValueError(f"shrinkage='auto' could not estimate an intensity ({exc}); pass a float "
                         "shrinkage in (0, 1]") from None
