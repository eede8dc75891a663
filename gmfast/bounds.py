"""Compatibility module: the names ``gmfast.bounds`` has always exported, from their new homes.

``gmfast.bounds`` held both the distributional certificate and the diagnostics; they now live
in modules named for what they do:

* :mod:`gmfast.distributional`: ``CA_Q``, TV from KL, the lower bound on ``CA_P`` (a
  certificate, DESIGN 1.7);
* :mod:`gmfast.diagnostics`: held-out log-likelihood, KL estimates, Gaussianity (estimates,
  not guarantees);
* :mod:`gmfast.mixture`: the fitted mixture as a generative model (``sample_mixture``);
* :mod:`gmfast.report`: the report, its table and plots.

New code should import from those; this module stays for the public API
(``gmfast.bounds.certified_accuracy_gmm``, ``gmfast.bounds.tv_from_kl``); in the layering
(``tests/test_layout.py``) it sits with the entry points, so no library module can use it.
"""

from gmfast.diagnostics import heldout_log_likelihood, joint_kl_estimate, knn_kl_divergence, mahalanobis_gaussianity
from gmfast.distributional import CAResult, certified_accuracy_gmm, certified_accuracy_lower_bound, tv_from_kl
from gmfast.mixture import sample_mixture
from gmfast.report import format_report, plot_mahalanobis_qq, report

__all__ = [
    "CAResult", "certified_accuracy_gmm", "tv_from_kl", "certified_accuracy_lower_bound", "sample_mixture",
    "heldout_log_likelihood", "knn_kl_divergence", "joint_kl_estimate", "mahalanobis_gaussianity",
    "plot_mahalanobis_qq", "report", "format_report",
]
